"""Shared pieces of the benchmark scripts: structures, timing, the MACE peer runner, tables.

The peer (an untrained MACE with MACE-MP-0 "small" hyper-parameters) lives in its own virtual
env (``.venv-mace``, made by ``benchmarks/setup_mace_env.sh``) because mace-torch pins an older
e3nn. The scripts here run it through :func:`run_peer`, a subprocess with that env's python, on
the very structures they time themselves (written to an extxyz file), so EST and MACE are
measured in the same run on the same machine. When the env is missing or the peer fails, the
tables say "peer unavailable" instead of failing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "benchmarks"
PEER_SCRIPT = BENCH_DIR / "_peer_mace.py"
PEER_UNAVAILABLE = "peer unavailable"

if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------- arguments
def base_parser(description: str) -> argparse.ArgumentParser:
    """Argument parser with the flags every benchmark script shares.

    Flags: ``--quick`` (short version, the ``make bench`` default of run_all), ``--full``
    (everything, including slow CPU cases), ``--device`` (cpu | cuda | auto), ``--dtype``
    (float32 | float64), ``--no-peer`` (skip MACE).
    """
    p = argparse.ArgumentParser(description=description)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="short version (few sizes/repeats)")
    mode.add_argument("--full", action="store_true", help="every case, also the slow ones")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (CUDA when available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--no-peer", action="store_true", help="do not run the MACE peer")
    return p


def resolve_device(name: str) -> str:
    """The device ``--device`` names, as a string ("auto" -> "cuda" when available, else "cpu");
    one the machine lacks -> ValueError (:func:`est_calc.devices.resolve_device`)."""
    from est_calc.devices import resolve_device as resolve

    return str(resolve(name, what="--device"))


# ---------------------------------------------------------------------------- structures
def co_cu_slab():
    """CO on top of a Cu(111) slab: fcc111 Cu 4x4x4, 10 Å vacuum, CO ontop (66 atoms).

    Periodic in all three directions (the vacuum makes z harmless) so that stress is defined;
    rattled by 0.05 Å (seed 1) as in the peer anchor.
    """
    from ase import Atoms
    from ase.build import add_adsorbate, fcc111

    slab = fcc111("Cu", size=(4, 4, 4), vacuum=10.0)
    add_adsorbate(slab, Atoms("CO", positions=[(0, 0, 0), (0, 0, 1.15)]), 2.0, "ontop")  # C down
    slab.pbc = True
    slab.rattle(0.05, seed=1)
    return slab


def cu_bulk(n_rep: int, a_A: float = 3.6):
    """Cu fcc bulk: the 4-atom conventional cubic cell repeated n_rep^3 times (4 n_rep^3 atoms).

    Rattled by 0.05 Å (seed 1). n_rep = 6 gives the 864-atom cell of the peer anchor.
    """
    from ase.build import bulk

    if n_rep < 1:
        raise ValueError(f"n_rep must be >= 1, got {n_rep}")
    atoms = bulk("Cu", "fcc", a=a_A, cubic=True).repeat(n_rep)
    atoms.rattle(0.05, seed=1)
    return atoms


def cu_bulk_atoms(n_atoms: int, a_A: float = 3.61, option: str = "--atoms"):
    """Cu fcc bulk of exactly ``n_atoms`` atoms: the 4-atom cubic cell repeated (p, q, r) times,
    p <= q <= r with the smallest r / p; rattled by 0.05 Å (seed 1).

    Raises:
        ValueError: ``n_atoms`` is not a positive multiple of 4 (naming ``option``, the command
            line option it came from).
    """
    from ase.build import bulk

    if n_atoms < 4 or n_atoms % 4:
        raise ValueError(f"{option}: Cu fcc bulk has 4 atoms per cubic cell, got {n_atoms}")
    cells = n_atoms // 4
    best = None
    # p <= q <= r means p^3 <= cells and q^2 <= cells / p
    for p in range(1, round(cells ** (1 / 3)) + 2):
        if cells % p:
            continue
        for q in range(p, round((cells // p) ** 0.5) + 2):
            if (cells // p) % q == 0 and cells // (p * q) >= q:
                r = cells // (p * q)
                if best is None or r / p < best[2] / best[0]:
                    best = (p, q, r)
    atoms = bulk("Cu", "fcc", a=a_A, cubic=True).repeat(best)
    atoms.rattle(0.05, seed=1)
    return atoms


# ---------------------------------------------------------------------------- timing
def sync(device: str) -> None:
    """Wait for queued GPU work so wall-clock times are honest (no-op on CPU)."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], *, repeats: int, warmup: int = 1,
                device: str = "cpu") -> float:
    """Median wall time in seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------- the peer
def peer_python() -> Path:
    """Python of the MACE env: $EST_BENCH_MACE_PYTHON, else ``<repo>/.venv-mace/bin/python``.

    On the GPU machine (no registry) the peer is the system python with the MACE wheels in a
    target folder named by $EST_BENCH_MACE_PYTHONPATH (see ``benchmarks/gpu.py``)."""
    env = os.environ.get("EST_BENCH_MACE_PYTHON")
    return Path(env) if env else ROOT / ".venv-mace" / "bin" / "python"


def _peer_env() -> dict:
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", PYTHONWARNINGS="ignore")
    # A CPU ESTCalculator raises glibc's malloc thresholds in its own process, or keeps all freed
    # memory in retain mode (est_calc.allocator); the peer's process then gets the same setting,
    # so both sides run with the same allocator.
    from est_calc.allocator import malloc_env, mode

    if mode() is not None:
        env.update(malloc_env(retain=mode() == "retain"))
    env.pop("PYTHONPATH", None)  # keep est_calc's e3nn out of the peer's imports
    if os.environ.get("EST_BENCH_MACE_PYTHONPATH"):  # wheels installed into a target folder
        env["PYTHONPATH"] = os.environ["EST_BENCH_MACE_PYTHONPATH"]
    return env


class PeerSession:
    """The peer as one long-lived process (its ``serve`` task), for timings in rounds.

    ``with PeerSession(device, dtype) as peer: peer.infer(path, repeats)`` returns the same dict
    as ``run_peer("infer", ...)``. If the MACE env is missing or the peer fails, ``error`` says
    why and every request returns ``{"error": ...}`` (callers print :data:`PEER_UNAVAILABLE`).
    """

    def __init__(self, device: str, dtype: str):
        self.device, self.dtype = device, dtype
        self.proc = None
        self.error: str | None = None
        self.params: int | None = None

    def __enter__(self) -> "PeerSession":
        python = peer_python()
        if not python.exists():
            self.error = f"no MACE env at {python} (run benchmarks/setup_mace_env.sh)"
            return self
        cmd = [str(python), str(PEER_SCRIPT), "serve",
               json.dumps({"device": self.device, "dtype": self.dtype})]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=_peer_env(),
                                     cwd=str(BENCH_DIR))
        first = self._read()
        if "error" in first:
            self.error = first["error"]
        else:
            self.params = first.get("params")
        return self

    def _read(self) -> dict:
        # The peer prints JSON lines only on stdout (libraries may print other lines first).
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        self.proc.wait()
        tail = (self.proc.stderr.read().strip().splitlines() or ["no output"])[-1]
        return {"error": f"peer exited with {self.proc.returncode}: {tail[:200]}"}

    def infer(self, structures: Path, repeats: int, warmup: int = 1) -> dict:
        """Median seconds per structure of ``structures`` (extxyz), like the ``infer`` task."""
        if self.error is not None:
            return {"error": self.error}
        self.proc.stdin.write(json.dumps({"structures": str(structures), "repeats": repeats,
                                          "warmup": warmup}) + "\n")
        self.proc.stdin.flush()
        answer = self._read()
        if "error" in answer:
            self.error = answer["error"]
        return answer

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc.stdout.close()
            self.proc.stderr.close()


def run_peer(task: str, options: dict, *, timeout_s: float = 1800.0) -> dict:
    """Run one task of ``_peer_mace.py`` in the MACE env and return its JSON answer.

    Args:
        task: the peer's sub-command ("infer", "train").
        options: JSON-able dict handed to the peer (structure file, repeats, device, ...).
        timeout_s: wall-clock limit of the subprocess, s.

    Returns:
        The peer's dict on success; ``{"error": "<why>"}`` when the env is missing or the peer
        failed (callers print :data:`PEER_UNAVAILABLE` with the reason).
    """
    python = peer_python()
    if not python.exists():
        return {"error": f"no MACE env at {python} (run benchmarks/setup_mace_env.sh)"}
    env = _peer_env()
    cmd = [str(python), str(PEER_SCRIPT), task, json.dumps(options)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env,
                              cwd=str(BENCH_DIR))
    except subprocess.TimeoutExpired:
        return {"error": f"peer timed out after {timeout_s:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"peer exited with {proc.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])


def write_structures(path: Path, atoms_list: Sequence) -> Path:
    """Write structures to an extxyz file the peer reads back (positions, cell, pbc only)."""
    from ase.io import write

    clean = []
    for atoms in atoms_list:
        a = atoms.copy()
        a.calc = None
        a.info.pop("adsorbate_info", None)  # a dict of arrays; extxyz cannot store it
        clean.append(a)
    write(str(path), clean, format="extxyz")
    return path


# ---------------------------------------------------------------------------- output
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats are printed as given (format them before)."""
    out = ["| " + " | ".join(str(h) for h in headers) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def fmt_ms(seconds: float | None) -> str:
    """Seconds -> "12.3" ms text (3 significant digits), "-" for None."""
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def machine_info(device: str) -> str:
    """One markdown line: CPU count, torch threads, torch version, device (and GPU name)."""
    import torch

    parts = [f"CPUs: {os.cpu_count()}", f"torch threads: {torch.get_num_threads()}",
             f"torch {torch.__version__}", f"python {platform.python_version()}",
             f"device: {device}"]
    if str(device).startswith("cuda") and torch.cuda.is_available():
        parts.append(f"GPU: {torch.cuda.get_device_name()}")
    return " | ".join(parts)
