"""Numbers for a potential's model card: accuracy on held-out sets, rotation error, speed.

For each data set: the OC20 S2EF metrics (energy MAE per structure and per atom, force MAE over
free atoms, force cosine, EwT, EFwT) of ``est_calc.training.trainer.evaluate``. Rotation error:
every k-th frame of the first set is evaluated as is and under two random rotations (positions,
cell and forces rotated together); reported as the mean and 95th percentile of |F(Rx) - R F(x)|
per atom in eV/Å, next to the mean |F|. Speed: energy+forces+stress calls through
``ESTCalculator`` on the 66-atom CO/Cu(111) slab and the 864-atom Cu bulk of
``benchmarks/inference.py`` (median of 5 after a warm-up; for ratios against MACE run that
script, which measures the peer in the same run).

Usage:
    python benchmarks/model_card.py POTENTIAL --set "val=PATH" [--set "name=PATH" ...]
        [--json OUT.json] [--rotation-stride 4] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _common import co_cu_slab, cu_bulk  # noqa: E402

KEYS = [
    ("energy_per_atom_mae", "energy MAE (meV/atom)", 1000.0),
    ("energy_mae", "energy MAE (meV/structure)", 1000.0),
    ("forces_mae", "force MAE (meV/Å)", 1000.0),
    ("forces_cosine_similarity", "force cosine", 1.0),
    ("energy_within_threshold", "EwT (%)", 100.0),
    ("energy_forces_within_threshold", "EFwT (%)", 100.0),
]


def accuracy(potential, path: str) -> dict:
    from est_calc.training.datasets import open_dataset
    from est_calc.training.trainer import evaluate

    frames = open_dataset(path)
    metrics = evaluate(potential, frames, energy_mode="total", batch_size=8)
    metrics["n_frames"] = len(frames)
    metrics["n_atoms"] = int(sum(len(frames[i].numbers) for i in range(len(frames))))
    return metrics


def accuracy_by_kind(potential, path: str) -> dict:
    """The same metrics per frame kind (relax, md, rattle, bulk, gas) where frames carry it."""
    from est_calc.training.datasets import open_dataset
    from est_calc.training.trainer import evaluate

    frames = open_dataset(path)
    groups: dict = {}
    for i in range(len(frames)):
        groups.setdefault(str(frames[i].extra.get("kind", "unknown")), []).append(frames[i])
    out = {}
    for kind, items in sorted(groups.items()):
        m = evaluate(potential, items, energy_mode="total", batch_size=8)
        m["n_frames"] = len(items)
        out[kind] = m
    return out


def rotation_error(potential, path: str, stride: int, seed: int = 0) -> dict:
    import torch

    from est_calc.batch import AtomsBatch
    from est_calc.forces import energy_forces_stress
    from est_calc.geometry import random_rotations
    from est_calc.neighbors import build_graph
    from est_calc.training.datasets import open_dataset

    frames = open_dataset(path)
    gen = torch.Generator().manual_seed(seed)
    dtype = next(potential.parameters()).dtype
    diffs, mags, energy_diffs = [], [], []
    for k in range(0, len(frames), stride):
        fr = frames[k]
        batch = AtomsBatch.from_arrays([fr.positions], [fr.numbers], [fr.cell], [fr.pbc],
                                       dtype=dtype)
        p0 = energy_forces_stress(potential, batch, build_graph(batch, potential.cutoff_A))
        for _ in range(2):
            rot = random_rotations(1, dtype, generator=gen)[0]
            rb = batch.replace(positions=batch.positions @ rot.T, cell=batch.cell @ rot.T)
            p1 = energy_forces_stress(potential, rb, build_graph(rb, potential.cutoff_A))
            diffs.append((p1.forces - p0.forces @ rot.T).norm(dim=-1).detach())
            energy_diffs.append(float((p1.energy - p0.energy).abs().sum()) / batch.n_atoms)
        mags.append(p0.forces.norm(dim=-1).detach())
    d = torch.cat(diffs).double()
    return {
        "n_frames": len(range(0, len(frames), stride)),
        "force_rotation_error_mean_eV_per_A": float(d.mean()),
        "force_rotation_error_p95_eV_per_A": float(torch.quantile(d, 0.95)),
        "mean_force_norm_eV_per_A": float(torch.cat(mags).double().mean()),
        "energy_rotation_error_mean_meV_per_atom": 1000.0 * statistics.fmean(energy_diffs),
    }


def speed(potential_path: str) -> dict:
    from est_calc.calculator import ESTCalculator

    out = {}
    for name, atoms in (("CO/Cu(111) slab, 66 atoms", co_cu_slab()), ("Cu bulk, 864 atoms", cu_bulk(6))):
        calc = ESTCalculator(potential_path, device="cpu")
        times = []
        for rep in range(6):
            atoms.rattle(1e-3, seed=rep)  # a new configuration each call (no ASE cache hit)
            t0 = time.perf_counter()
            calc.calculate(atoms, ["energy", "forces", "stress"])
            times.append(time.perf_counter() - t0)
        out[name] = 1000.0 * statistics.median(times[1:])
    return out


def main(argv=None) -> int:
    import torch

    from est_calc.potential import load_potential

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("potential")
    p.add_argument("--set", action="append", default=[], metavar="NAME=PATH",
                   help="a labelled data set; the first one is also used for the rotation error")
    p.add_argument("--json", default=None, help="write every number to this JSON file")
    p.add_argument("--rotation-stride", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sets = []
    for item in args.set:
        if "=" not in item:
            p.error(f"--set needs NAME=PATH, got {item!r}")
        name, path = item.split("=", 1)
        sets.append((name, path))
    pot = load_potential(args.potential, dtype=torch.float32)
    report = {"potential": args.potential, "accuracy": {}, "torch_threads": torch.get_num_threads()}
    for name, path in sets:
        report["accuracy"][name] = accuracy(pot, path)
    if sets:
        report["by_kind"] = accuracy_by_kind(pot, sets[0][1])
        pot64 = load_potential(args.potential, dtype=torch.float64)
        report["rotation"] = rotation_error(pot64, sets[0][1], args.rotation_stride)
    report["speed_ms_per_call"] = speed(args.potential)

    print("| set | frames | " + " | ".join(label for _, label, _ in KEYS) + " |")
    print("|---|---|" + "---|" * len(KEYS))
    for name, m in report["accuracy"].items():
        cells = [f"{m[k] * scale:.3g}" if k in m else "n/a" for k, _, scale in KEYS]
        print(f"| {name} | {m['n_frames']} | " + " | ".join(cells) + " |")
    if report.get("by_kind"):
        print(f"\nby frame kind ({sets[0][0]}):\n")
        print("| kind | frames | energy MAE (meV/atom) | force MAE (meV/Å) | force cosine |")
        print("|---|---|---|---|---|")
        for kind, m in report["by_kind"].items():
            print(f"| {kind} | {m['n_frames']} | {1000 * m['energy_per_atom_mae']:.3g} | "
                  f"{1000 * m['forces_mae']:.3g} | {m['forces_cosine_similarity']:.3g} |")
    if "rotation" in report:
        r = report["rotation"]
        print(f"\nrotation error over {r['n_frames']} frames x 2 rotations (float64): mean "
              f"|F(Rx) - R F(x)| = {1000 * r['force_rotation_error_mean_eV_per_A']:.2f} meV/Å "
              f"(95th percentile {1000 * r['force_rotation_error_p95_eV_per_A']:.2f}; mean |F| "
              f"{r['mean_force_norm_eV_per_A']:.3f} eV/Å); energy "
              f"{r['energy_rotation_error_mean_meV_per_atom']:.3f} meV/atom")
    print("\nspeed (energy+forces+stress, float32, CPU, "
          f"{report['torch_threads']} threads): " + ", ".join(
              f"{k}: {v:.0f} ms" for k, v in report["speed_ms_per_call"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
