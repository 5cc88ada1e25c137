"""Peak memory of one energy+forces+stress call of EST "small" versus system size (Cu fcc bulk).

Each size runs in a fresh subprocess (``memory.py --worker N_REP``), so the peak of one size does
not hide the next. On CPU the memory is the rise of the process's peak resident set size
(``getrusage(RUSAGE_SELF).ru_maxrss``) during the call above the resident size just before it;
torch's CPU allocations are invisible to tracemalloc. On CUDA it is
``torch.cuda.max_memory_allocated`` above what was allocated before the call. The scaling
exponent b of memory ~ N^b is a least-squares fit in log-log over the sizes of >= 500 atoms
(b = 1: linear). MACE-small is measured the same way (its own subprocess) on the smaller sizes.

Each size is also measured with ``ESTCalculator(low_memory=True)`` (per-layer activation
checkpointing: the same results, each layer recomputed during the backward pass).

Usage: python benchmarks/memory.py [--quick | --full] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from _common import (PEER_UNAVAILABLE, base_parser, cu_bulk, markdown_table, resolve_device,
                     run_peer, sync, write_structures)

QUICK_REPS = (3, 4, 6, 8, 10)  # 108 ... 4,000 atoms
FULL_REPS = (3, 4, 6, 8, 10, 13, 17)  # ... 8,788, 19,652 atoms
FIT_MIN_ATOMS = 500


def _rss_now_MB() -> float:
    """Current resident set size of this process, MB (Linux /proc; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(n_rep: int, device: str, dtype: str, low_memory: bool = False) -> dict:
    """Measure one size in this process; returns a JSON-able dict (MB)."""
    import torch
    from ase.calculators.calculator import all_changes

    from est_calc.calculator import ESTCalculator
    from est_calc.potential import Potential

    torch.manual_seed(0)
    calc = ESTCalculator(Potential.from_config("small", species=[29]), device=device, dtype=dtype,
                         low_memory=low_memory)
    calc.calculate(cu_bulk(1), ["energy", "forces", "stress"], all_changes)  # warm-up, 4 atoms
    atoms = cu_bulk(n_rep)
    sync(device)
    out = {"n_atoms": len(atoms)}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    rss_before = _rss_now_MB()
    calc.calculate(atoms, ["energy", "forces", "stress"], all_changes)
    sync(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    out["rss_delta_MB"] = max(peak - rss_before, 0.0)
    if device.startswith("cuda"):
        out["cuda_delta_MB"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    return out


def fit_exponent(n_atoms: list, mem_MB: list, min_atoms: int = FIT_MIN_ATOMS) -> float | None:
    """Slope b of log(mem) = a + b log(n) over sizes >= min_atoms (None with < 2 points)."""
    import numpy as np

    pts = [(n, m) for n, m in zip(n_atoms, mem_MB) if n >= min_atoms and m > 0]
    if len(pts) < 2:
        return None
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def run_size(n_rep: int, device: str, dtype: str, low_memory: bool = False) -> dict:
    """Run :func:`worker` for one size in a fresh python process."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(n_rep),
           "--device", device, "--dtype", dtype] + (["--low-memory"] if low_memory else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"n_atoms": 4 * n_rep**3, "error": tail[:200]}
    return json.loads(lines[-1])


def run(args) -> str:
    """The memory table as one markdown string."""
    import tempfile

    device = resolve_device(args.device)
    reps = FULL_REPS if args.full else QUICK_REPS
    peer_max_atoms = 4000 if args.full else 864
    key = "cuda_delta_MB" if device.startswith("cuda") else "rss_delta_MB"
    peer_key = "peak_cuda_MB" if device.startswith("cuda") else None
    rows, ns, mems, peer_ns, peer_mems, lean_ns, lean_mems = [], [], [], [], [], [], []
    peer_error = "skipped (--no-peer)" if args.no_peer else None
    for n_rep in reps:
        res = run_size(n_rep, device, args.dtype)
        n = res["n_atoms"]
        if "error" in res:
            rows.append([f"{n:,}", "failed: " + res["error"], "-", "-", "-", "-"])
            continue
        mem = res[key]
        ns.append(n)
        mems.append(mem)
        lean = run_size(n_rep, device, args.dtype, low_memory=True)
        lean_cell = "failed: " + lean["error"] if "error" in lean else f"{lean[key] / n:.4f}"
        if "error" not in lean:
            lean_ns.append(n)
            lean_mems.append(lean[key])
        peer_cell = PEER_UNAVAILABLE if peer_error else "-"
        if peer_error is None and n <= peer_max_atoms:
            with tempfile.TemporaryDirectory() as tmp:
                path = write_structures(Path(tmp) / "bulk.extxyz", [cu_bulk(n_rep)])
                pres = run_peer("memory", {"structures": str(path), "device": device,
                                           "dtype": args.dtype})
            if "error" in pres:
                peer_error = pres["error"]
                peer_cell = PEER_UNAVAILABLE
            else:
                pm = pres[peer_key] if peer_key else max(pres["peak_rss_MB"]
                                                         - pres["baseline_rss_MB"], 0.0)
                peer_ns.append(n)
                peer_mems.append(pm)
                peer_cell = f"{pm:,.1f} ({1e3 * pm / n:.2f} kB/atom)"
        rows.append([f"{n:,}", f"{mem:,.1f}", f"{1e3 * mem / n:.2f}", f"{mem / n:.4f}", lean_cell,
                     peer_cell])
    b = fit_exponent(ns, mems)
    what = "CUDA max_memory_allocated" if device.startswith("cuda") else "peak RSS rise"
    out = [f"### Peak memory of one energy+forces+stress call, EST-small, Cu bulk ({device}, "
           f"{args.dtype}; {what})", "",
           markdown_table(["atoms", "EST MB", "EST kB/atom", "EST MB/atom",
                           "EST low_memory MB/atom", "MACE-small MB"], rows), "",
           f"EST scaling exponent (log-log fit over >= {FIT_MIN_ATOMS} atoms): "
           + (f"{b:.2f}" if b is not None else "n/a (too few sizes)") + "."]
    lb = fit_exponent(lean_ns, lean_mems)
    if lb is not None:
        out.append(f"EST with low_memory=True (per-layer activation checkpointing): exponent "
                   f"{lb:.2f}.")
    pb = fit_exponent(peer_ns, peer_mems)
    if pb is not None:
        out.append(f"MACE-small scaling exponent (same fit): {pb:.2f}.")
    if peer_error:
        out.append(f"MACE-small: {PEER_UNAVAILABLE} ({peer_error}).")
    out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--low-memory", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        if args.worker < 1:
            raise ValueError(f"--worker needs a repeat count >= 1, got {args.worker}")
        print(json.dumps(worker(args.worker, resolve_device(args.device), args.dtype,
                                args.low_memory)))
        return 0
    print(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
