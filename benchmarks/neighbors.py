"""Neighbour-list benchmark: every backend plus ASE on Cu fcc and a non-periodic cluster.

Systems: Cu fcc (a = 3.61 Å) with ~4k, 32k and 256k atoms at a 6 Å cutoff, and a 2k-atom
non-periodic Cu cluster. Each backend is timed as the median of 5 runs (2 for ASE, 3 at 256k),
after one warm-up call; pair counts are checked equal across backends. ASE is skipped at 256k
atoms (tens of seconds per call). The table gives milliseconds and the ratio to vesin, followed
by the fitted exponent p of time ~ N^p for the torch backend over the periodic systems. Rows
are printed (and flushed) as soon as each system is done, so a partial table survives an
interrupted run. Backends run back to back in the same process, so on a shared machine compare
the ratios rather than the absolute times.

Usage:
    python benchmarks/neighbors.py [--device cpu|cuda] [--quick] [--threads N]

``--quick`` runs only the 4k periodic and 2k cluster systems; ``--threads`` sets
``torch.set_num_threads`` (default: leave torch's choice).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

# libgomp reads this when torch loads. With its default (active spin-waiting), every
# multi-threaded torch op becomes 10-60x slower once the cores are oversubscribed (measured on
# the shared 2-core machine: 4k atoms, 2 threads, 1407 ms instead of 22 ms), which would time
# the machine's load rather than the algorithm. Set OMP_WAIT_POLICY=ACTIVE to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from ase.build import bulk  # noqa: E402
from ase.neighborlist import neighbor_list as ase_neighbor_list  # noqa: E402

from est_calc.neighbors import neighbor_list  # noqa: E402
from est_calc.neighbors._adapters import vesin_available  # noqa: E402

CUTOFF_A = 6.0


def cu_fcc(reps: int):
    """Cubic Cu fcc repeated reps^3 times (4 reps^3 atoms), fully periodic."""
    return bulk("Cu", "fcc", a=3.61, cubic=True).repeat((reps, reps, reps))


def cu_cluster(n_target: int = 2000):
    """A roughly spherical non-periodic Cu cluster of about n_target atoms (zero cell)."""
    atoms = cu_fcc(9)
    centre = atoms.positions.mean(axis=0)
    r = np.linalg.norm(atoms.positions - centre, axis=1)
    keep = np.argsort(r)[:n_target]
    cluster = atoms[keep]
    cluster.set_pbc(False)
    cluster.set_cell(np.zeros((3, 3)))
    return cluster


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_backend(atoms, backend: str, device: str, repeats: int) -> tuple[float, int]:
    """Median wall time (ms) and pair count of one backend on one structure."""
    if backend == "ase":
        run = lambda: len(ase_neighbor_list("i", atoms, CUTOFF_A))  # noqa: E731
    else:
        pos = torch.tensor(atoms.positions, device=device)
        cell = torch.tensor(atoms.cell.array, device=device)
        pbc = torch.tensor(atoms.pbc, device=device)

        def run():
            ei, _ = neighbor_list(pos, cell, pbc, CUTOFF_A, backend=backend)
            return int(ei.shape[1])

    n_pairs = run()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        n_pairs = run()
        _sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times), n_pairs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="only the 4k and 2k systems")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    systems = [("Cu fcc 4k", cu_fcc(10)), ("Cu cluster 2k (no pbc)", cu_cluster())]
    if not args.quick:
        systems[1:1] = [("Cu fcc 32k", cu_fcc(20)), ("Cu fcc 256k", cu_fcc(40))]
    backends = ["torch"] + (["vesin"] if vesin_available() else [])
    if args.device == "cpu":
        backends += ["matscipy", "ase"]

    print(f"device={args.device} torch threads={torch.get_num_threads()} cutoff={CUTOFF_A} Å "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print("| system | atoms | backend | pairs | time (ms) | ratio to vesin |")
    print("|---|---|---|---|---|---|", flush=True)
    torch_times = []
    for name, atoms in systems:
        n = len(atoms)
        results = {}
        for backend in backends:
            if backend == "ase" and n > 100_000:
                print(f"| {name} | {n} | ase | - | skipped (too slow) | - |", flush=True)
                continue
            repeats = 2 if backend == "ase" else (3 if n > 100_000 else 5)
            results[backend] = time_backend(atoms, backend, args.device, repeats)
        counts = {b: c for b, (_, c) in results.items()}
        if len(set(counts.values())) != 1:
            raise SystemExit(f"pair counts differ on {name}: {counts}")
        ref = results.get("vesin", (float("nan"), 0))[0]
        for backend, (ms, count) in results.items():
            print(f"| {name} | {n} | {backend} | {count} | {ms:.1f} | {ms / ref:.2f} |",
                  flush=True)
        if all(atoms.pbc):
            torch_times.append((n, results["torch"][0]))
    if len(torch_times) >= 2:
        ns, ts = np.log([n for n, _ in torch_times]), np.log([t for _, t in torch_times])
        slope = np.polyfit(ns, ts, 1)[0]
        print(f"\ntorch backend: time ~ N^{slope:.2f} over {[n for n, _ in torch_times]} atoms")


if __name__ == "__main__":
    main()
