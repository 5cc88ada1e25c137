"""How well ``ESTCalculator(uncertainty=True)`` knows its own errors, and what it costs.

Sets, all labelled by ASE's EMT (the teacher of the shipped potential):

* in distribution: the validation recipe of the model card (``est generate --n-systems 24
  --seed 12``);
* out of distribution: the model card's three OOD sets (fcc(110) Cu-Pd, ternary alloys, unseen
  adsorbates; seeds 13, 15, 14), random 50/50 Au-Cu and Ni-Pd fcc bulk cells (32 atoms) at one
  host metal's EMT lattice constant, symmetric strain up to 3 % and 0.05 Å rattle ("strained
  alloys"), and pure-metal fcc bulk cells strained by 5-8 % ("strained bulk", training goes to
  3 %).

Per set: the Spearman rank correlation between predicted per-atom ``forces_std`` and the actual
error |F - F_EMT| over all atoms, the miscalibration area of the Gaussian calibration curve
(:func:`est_calc.training.uncertainty.miscalibration_area`; PNG with ``--plot``), and the share of
frames flagged: largest per-atom std above the threshold that 95 % of the in-distribution frames
stay under, and the same for the frame's RMS of the per-atom std (the recipes'
``uncertainty_rms_threshold``), and either of the two. Then the cost: one energy+forces(+stress)
call with every cache invalidated, plain versus ``uncertainty=True`` on the 66-atom CO/Cu(111)
slab and the 864-atom Cu bulk, alternating in rounds; the ratio is taken within each round.

Usage: python benchmarks/uncertainty.py [--quick] [--plot calibration.png]
       [--model default] [--committee a.pt b.pt c.pt] [--data-dir DIR] [--rounds N]
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import numpy as np
from _common import (base_parser, co_cu_slab, cu_bulk, fmt_ms, machine_info, markdown_table,
                     median_time, resolve_device)

#: (name, est generate options) of the generated sets: the model card's recipes.
GENERATED = (
    ("in distribution (val)", dict(seed=12)),
    ("OOD: fcc(110) Cu-Pd", dict(seed=13, facets=("110",), metals=("Cu", "Pd"),
                                 alloys_only=True)),
    ("OOD: ternary alloys", dict(seed=15, alloys_only=True, alloy_components=3,
                                 include_gas=False)),
    ("OOD: unseen adsorbates", dict(seed=14, adsorbates=("*O", "*CCO", "*CHCO", "*CCHO",
                                                         "*OHCH2CH3", "*ONN(CH3)2", "*NONH"),
                                    include_bulk=False, include_gas=False)),
)
ID_SET = GENERATED[0][0]
TARGET_SPEARMAN = 0.6
TARGET_COST = 1.5


def _labelled(atoms):
    """A Frame of ``atoms`` with EMT energy and forces."""
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    from est_calc.training.datasets._frame import frame_from_atoms

    atoms.calc = EMT()
    results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
    atoms.calc = SinglePointCalculator(atoms, **results)
    return frame_from_atoms(atoms)


def strained_alloys(n: int, seed: int = 5) -> list:
    """Random 50/50 Au-Cu and Ni-Pd fcc cells (2x2x2 cubic, 32 atoms) at one component's EMT
    lattice constant, symmetric strain up to 3 %, 0.05 Å rattle."""
    from ase.build import bulk
    from ase.data import atomic_numbers

    from est_calc.training.synthetic import emt_lattice_constant

    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        pair = (("Au", "Cu"), ("Ni", "Pd"))[k % 2]
        host = pair[int(rng.integers(2))]
        guest = pair[1] if host == pair[0] else pair[0]
        atoms = bulk(host, "fcc", a=emt_lattice_constant(host), cubic=True).repeat(2)
        atoms.numbers[rng.permutation(len(atoms))[: len(atoms) // 2]] = atomic_numbers[guest]
        eps = rng.uniform(-0.03, 0.03, (3, 3))
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + (eps + eps.T) / 2), scale_atoms=True)
        atoms.positions += rng.normal(0.0, 0.05, atoms.positions.shape)
        frames.append(_labelled(atoms))
    return frames


def strained_bulk(n: int, seed: int = 6) -> list:
    """Pure-metal fcc cells (2x2x2 cubic, 32 atoms) of the seven metals, strained by 5-8 %
    along random axes (sign random), 0.05 Å rattle."""
    from ase.build import bulk

    from est_calc.training.synthetic import DEFAULT_METALS, emt_lattice_constant

    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        metal = DEFAULT_METALS[k % len(DEFAULT_METALS)]
        atoms = bulk(metal, "fcc", a=emt_lattice_constant(metal), cubic=True).repeat(2)
        eps = np.diag(rng.choice([-1.0, 1.0], 3) * rng.uniform(0.05, 0.08, 3))
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
        atoms.positions += rng.normal(0.0, 0.05, atoms.positions.shape)
        frames.append(_labelled(atoms))
    return frames


def build_sets(data_dir: Path, quick: bool) -> dict:
    """name -> list of labelled frames (generated sets cached in ``data_dir``)."""
    from est_calc.training.datasets import open_dataset
    from est_calc.training.synthetic import generate

    n_systems, per_system, n_bulk = (2, 4, 4) if quick else (24, 10, 24)
    sets = {}
    for name, options in GENERATED:
        folder = data_dir / f"seed{options['seed']}-{n_systems}x{per_system}"
        if not (folder / "synthetic.h5").is_file():
            generate(folder, n_systems=n_systems, frames_per_system=per_system,
                     formats=("hdf5",), progress=False, **options)
        sets[name] = list(open_dataset(folder / "synthetic.h5"))
    sets["OOD: strained alloys"] = strained_alloys(n_bulk)
    sets["OOD: strained bulk (5-8 %)"] = strained_bulk(n_bulk)
    return sets


def predict(calc, frames, chunk: int = 16) -> dict:
    """Per-atom forces_std and |F - F_ref|, per-frame index, energy error and energy_std."""
    out = {"std": [], "err": [], "frame": [], "e_err": [], "e_std": []}
    for lo in range(0, len(frames), chunk):
        part = frames[lo:lo + chunk]
        atoms = [f.to_atoms() for f in part]
        results = calc.calculate_batch(atoms, ("energy", "forces", "forces_std"))
        for k, (f, r) in enumerate(zip(part, results)):
            out["std"].append(r["forces_std"])
            out["err"].append(np.linalg.norm(r["forces"] - f.forces, axis=1))
            out["frame"].append(np.full(f.n_atoms, lo + k))
            out["e_err"].append(r["energy"] - f.energy)
            out["e_std"].append(r["energy_std"])
    return {k: (np.concatenate(v) if k in ("std", "err", "frame") else np.array(v))
            for k, v in out.items()}


def accuracy_table(calc, sets: dict, label: str) -> tuple[str, dict, float]:
    """Markdown table of one estimate on every set, the per-set predictions and the threshold
    of the largest per-atom std (the frame-RMS threshold is in the text)."""
    from est_calc.training.uncertainty import flag_thresholds, miscalibration_area, spearman
    from est_calc.uncertainty import frame_statistics

    preds = {name: predict(calc, frames) for name, frames in sets.items()}
    ref = preds[ID_SET]
    flags = flag_thresholds(ref["std"], ref["frame"])
    threshold, rms_threshold = flags["max"], flags["rms"]
    rows = []
    for name, p in preds.items():
        area, _, _ = miscalibration_area(p["std"], p["err"])
        largest, rms = frame_statistics(p["std"], p["frame"])
        over_max, over_rms = largest > threshold, rms > rms_threshold
        e_rank = spearman(p["e_std"], np.abs(p["e_err"])) if len(p["e_err"]) > 2 else float("nan")
        rows.append([name, len(sets[name]), len(p["err"]),
                     f"{np.sqrt(np.mean(p['err'] ** 2)):.3f}",
                     f"{np.sqrt(np.mean(p['std'] ** 2)):.3f}",
                     f"{spearman(p['std'], p['err']):.3f}", f"{area:.3f}",
                     f"{100 * over_max.mean():.0f} %", f"{100 * over_rms.mean():.0f} %",
                     f"{100 * (over_max | over_rms).mean():.0f} %", f"{e_rank:.2f}"])
    table = markdown_table(
        ["set", "frames", "atoms", "RMS |dF| eV/Å", "RMS forces_std eV/Å",
         "Spearman (per atom)", "miscal. area", "frames flagged", "flagged (frame RMS)",
         "flagged (either)", "energy Spearman"], rows)
    text = (f"### {label}\n\nThresholds (95 % of in-distribution frames below each): largest "
            f"per-atom std {threshold:.4f} eV/Å (\"frames flagged\"), the frame's RMS per-atom "
            f"std {rms_threshold:.4f} eV/Å (\"flagged (frame RMS)\"; md_recipes' "
            f"uncertainty_rms_threshold)\n\n{table}\n")
    return text, preds, threshold


def plot_calibration(curves: dict, path: str) -> None:
    """Observed versus expected fraction inside the Gaussian p-ball, one line per set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from est_calc.training.uncertainty import miscalibration_area

    labels = list(curves)
    fig, axes = plt.subplots(1, len(labels), figsize=(5.5 * len(labels), 5), squeeze=False)
    for ax, label in zip(axes[0], labels):
        for name, p in curves[label].items():
            area, levels, observed = miscalibration_area(p["std"], p["err"])
            ax.plot(levels, observed, label=f"{name} ({area:.3f})")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_xlabel("expected fraction (Gaussian, forces_std / sqrt 3 per component)")
        ax.set_ylabel("observed fraction of atoms")
        ax.set_title(f"{label}: calibration (miscalibration area)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cost_table(model, device: str, dtype: str, rounds: int, repeats: int, quick: bool,
               committee=None) -> str:
    """Plain versus uncertainty=True on the 66-atom slab and the 864-atom bulk (108 with quick),
    and the committee's call when one is given."""
    from ase.calculators.calculator import all_changes

    from est_calc.calculator import ESTCalculator

    structs = {"CO/Cu(111) slab": co_cu_slab(), "Cu bulk": cu_bulk(3 if quick else 6)}
    plain = ESTCalculator(model, device=device, dtype=dtype)
    watched = ESTCalculator(model, device=device, dtype=dtype, uncertainty=True)
    calcs = [plain, watched]
    if committee:
        calcs.append(ESTCalculator(list(committee), device=device, dtype=dtype,
                                   uncertainty=True))
    props = ["energy", "forces", "stress"]

    def timed(calc, atoms):
        atoms = atoms.copy()
        return median_time(lambda: calc.calculate(atoms, props, all_changes), repeats=repeats,
                           warmup=1, device=device)

    times = {name: [[] for _ in calcs] for name in structs}
    for _ in range(rounds):
        for name, atoms in structs.items():
            for k, calc in enumerate(calcs):
                times[name][k].append(timed(calc, atoms))
    rows = []
    for name, atoms in structs.items():
        t0, t1 = times[name][0], times[name][1]
        ratio = [b / a for a, b in zip(t0, t1)]
        med = statistics.median(ratio)
        row = [name, len(atoms), fmt_ms(statistics.median(t0)), fmt_ms(statistics.median(t1)),
               f"{med:.3f}x", f"{min(ratio):.3f}-{max(ratio):.3f}x",
               "met" if med <= TARGET_COST else "NOT met"]
        if committee:
            t2 = times[name][2]
            row += [fmt_ms(statistics.median(t2)),
                    f"{statistics.median([c / a for a, c in zip(t0, t2)]):.2f}x"]
        rows.append(row)
    headers = ["system", "atoms", "plain ms", "uncertainty ms", "ratio (median)",
               "range over rounds", f"<= {TARGET_COST}x"]
    if committee:
        headers += [f"committee of {len(committee)} ms", "committee ratio"]
    return ("### Cost of uncertainty=True (latent distance)\n\n"
            f"{rounds} rounds x {repeats} calls (median after one warm-up), plain, "
            "uncertainty=True" + (" and the committee" if committee else "") + " alternating; "
            "energy+forces+stress, caches invalidated.\n\n"
            + markdown_table(headers, rows) + "\n")


def run(args) -> str:
    import torch

    from est_calc.calculator import ESTCalculator

    torch.manual_seed(0)
    device = resolve_device(args.device)
    rounds = args.rounds or (2 if args.quick else 5)
    repeats = args.repeats or (2 if args.quick else 5)
    data_dir = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="unc-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    sets = build_sets(data_dir, args.quick)
    out = [f"## Uncertainty ({device}, {args.dtype})", "", machine_info(device), ""]
    curves = {}
    latent = ESTCalculator(args.model, device=device, dtype=args.dtype, uncertainty=True)
    text, preds, _ = accuracy_table(latent, sets, f"Latent distance ({args.model})")
    out.append(text)
    curves["latent distance"] = preds
    if args.committee:
        committee = ESTCalculator(list(args.committee), device=device, dtype=args.dtype,
                                  uncertainty=True)
        text, preds, _ = accuracy_table(committee, sets,
                                        f"Committee of {len(args.committee)}")
        out.append(text)
        curves["committee"] = preds
    out.append(cost_table(args.model, device, args.dtype, rounds, repeats, args.quick,
                          args.committee))
    if args.plot:
        plot_calibration(curves, args.plot)
        out.append(f"calibration curves: {args.plot}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="potential with an uncertainty part")
    p.add_argument("--committee", nargs="+", default=None, metavar="PT",
                   help="also evaluate a committee of these potential files")
    p.add_argument("--plot", default=None, help="PNG path of the calibration curves")
    p.add_argument("--data-dir", default=None,
                   help="folder for the generated EMT sets (reused when present)")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (default 5, quick 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per round and case")
    args = p.parse_args(argv)
    print(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
