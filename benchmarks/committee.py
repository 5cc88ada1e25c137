"""Independently trained potentials as a committee, on a real-DFT split of benchmarks/accuracy.py.

``benchmarks/accuracy.py --est-seed N`` trains the same recipe from other initial weights and
batch orders; several such runs on one split are independently trained members (the committee
of issue 26 that fine-tuned copies of one potential could not stand in for: those share its
errors). This script asks two questions of them, on the split's evaluation sets:

* accuracy: each member's and the committee mean's energy and force RMSE (the mean is what
  ``ESTCalculator(model=[...])`` returns), and for each smaller size k the mean over every
  k-member subset of its mean's RMSE (what fewer members, i.e. less training, would give);
* uncertainty: frames flagged by the committee's largest and RMS per-atom ``forces_std`` (flag
  thresholds: the values 95 % of the split's validation frames stay under,
  :func:`est_calc.training.uncertainty.flag_thresholds`) and the Spearman rank correlation of
  ``forces_std`` with the committee mean's per-atom force error |F - F_ref| (sets with forces)
  or of ``energy_std`` with |E - E_ref| (energy-only sets); with ``--latent`` the same columns
  for the first member's latent-distance part (fitted as ``est train --uncertainty`` fits it:
  training frames as reference, validation frames as calibration), side by side.

Sets that mix molecules are also reported per chemical formula. Errors: RMSE per force
component (meV/Å) and per structure (meV), as in benchmarks/accuracy.py.

Usage: python benchmarks/committee.py --work runs/accuracy/eth-l3-15 \
           --members runs/accuracy/eth-l3-15{,-s1,-s2,-s3}/est/potential.pt [--latent]
           [--report committee.md]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import markdown_table


def _frames(path: Path):
    from ase.io import read

    return read(path, index=":")


def predict(calc, frames) -> dict:
    """Per frame: energy error (eV), per-atom force errors |dF| (eV/Å), per-component force
    differences, and (where the calculator has them) energy_std and per-atom forces_std."""
    out = {"de": [], "df": [], "dfc": [], "e_std": [], "std": [], "formula": [],
           "forces": frames[0].calc is not None and "forces" in frames[0].calc.results}
    for atoms in frames:
        ref_e = atoms.get_potential_energy()
        ref_f = atoms.calc.results.get("forces")
        work = atoms.copy()
        work.calc = calc
        out["de"].append(work.get_potential_energy() - ref_e)
        forces = work.get_forces()
        if ref_f is not None:
            out["dfc"].append((forces - ref_f).ravel())
            out["df"].append(np.linalg.norm(forces - ref_f, axis=1))
        if "forces_std" in calc.results:
            out["std"].append(np.asarray(calc.results["forces_std"], dtype=float))
            out["e_std"].append(float(calc.results["energy_std"]))
        out["formula"].append(atoms.get_chemical_formula())
    out["de"] = np.asarray(out["de"])
    return out


def _select(pred: dict, keep: np.ndarray) -> dict:
    """The frames ``keep`` (boolean per frame) of a prediction."""
    idx = np.flatnonzero(keep)
    sel = {"forces": pred["forces"], "de": pred["de"][idx],
           "formula": [pred["formula"][k] for k in idx]}
    for key in ("df", "dfc", "std"):
        sel[key] = [pred[key][k] for k in idx] if pred[key] else []
    sel["e_std"] = [pred["e_std"][k] for k in idx] if pred["e_std"] else []
    return sel


def errors(pred: dict) -> tuple[float, float]:
    """(energy RMSE meV, force RMSE per component meV/Å; nan without forces)."""
    e = 1000 * float(np.sqrt(np.mean(pred["de"] ** 2)))
    f = (1000 * float(np.sqrt(np.mean(np.concatenate(pred["dfc"]) ** 2)))
         if pred["dfc"] else float("nan"))
    return e, f


def subset_errors(parts: list[dict], k: int) -> tuple[float, float]:
    """Committees of ``k`` of the members: the mean over every k-subset of the RMSEs of the
    subset's mean prediction (its errors are the mean of its members' errors)."""
    from itertools import combinations

    found = []
    for subset in combinations(parts, k):
        mean = {"de": np.mean([p["de"] for p in subset], axis=0),
                "dfc": [np.mean(rows, axis=0) for rows in zip(*(p["dfc"] for p in subset))]}
        found.append(errors(mean))
    return tuple(float(v) for v in np.mean(found, axis=0))


def _frame_rows(pred: dict) -> tuple[np.ndarray, np.ndarray]:
    """Every atom's force std of a prediction in one array, and the frame index of each row."""
    frame = np.repeat(np.arange(len(pred["std"])), [len(s) for s in pred["std"]])
    return np.concatenate(pred["std"]), frame


def flags(pred: dict, thresholds: dict) -> tuple[float, float, float, float]:
    """(% flagged by the largest std, by the RMS std, by either; Spearman)."""
    from est_calc.training.uncertainty import spearman
    from est_calc.uncertainty import frame_statistics

    std, frame = _frame_rows(pred)
    largest, rms = frame_statistics(std, frame, len(pred["std"]))
    over_max, over_rms = largest > thresholds["max"], rms > thresholds["rms"]
    if pred["df"]:
        rank = spearman(std, np.concatenate(pred["df"]))
    elif len(pred["de"]) > 2:
        rank = spearman(np.asarray(pred["e_std"]), np.abs(pred["de"]))
    else:
        rank = float("nan")
    return (100 * over_max.mean(), 100 * over_rms.mean(), 100 * (over_max | over_rms).mean(),
            rank)


def thresholds_of(pred: dict) -> dict:
    """The flag thresholds that this (in-distribution) prediction passes 95 % of the time."""
    from est_calc.training.uncertainty import flag_thresholds

    return flag_thresholds(*_frame_rows(pred))


def groups(pred: dict, label: str):
    """(name, prediction) for the whole set and, where it mixes formulas, for each formula."""
    yield label, pred
    formulas = sorted(set(pred["formula"]))
    if len(formulas) > 1:
        for formula in formulas:
            keep = np.array([f == formula for f in pred["formula"]])
            yield f"{label}: {formula}", _select(pred, keep)


def run(work: Path, members: list[Path], latent: bool, dtype: str = "float32") -> tuple[str, dict]:
    """The report (markdown) and its numbers."""
    from est_calc import ESTCalculator

    split = json.loads((work / "split.json").read_text())
    sets = {label: _frames(work / s["file"]) for label, s in split["evals"].items()}
    sets = {k: v for k, v in sets.items() if v}
    valid = _frames(work / "valid.xyz")
    committee = ESTCalculator(model=[str(m) for m in members], dtype=dtype, device="cpu",
                              uncertainty=True)
    estimates = {"committee": (committee, thresholds_of(predict(committee, valid)))}
    scratch = None
    if latent:
        from est_calc.training.uncertainty import fit_and_save
        from est_calc.uncertainty import load_uncertainty

        scratch = Path(tempfile.mkdtemp(prefix="committee_latent_"))
        path = scratch / "potential.pt"
        shutil.copyfile(members[0], path)          # the sidecar is bound to this copy
        fit_and_save(path, work / "train.xyz", work / "valid.xyz")
        part, _ = load_uncertainty(path)
        calc = ESTCalculator(model=str(path), dtype=dtype, device="cpu", uncertainty=True)
        estimates["latent (member 1)"] = (calc, dict(part.thresholds))
    try:
        result = {"members": [str(m) for m in members], "thresholds": {}, "sets": {}}
        acc_rows, unc_rows = [], []
        single = [ESTCalculator(model=str(m), dtype=dtype, device="cpu") for m in members]
        for label, frames in sets.items():
            preds = {name: predict(calc, frames) for name, (calc, _) in estimates.items()}
            alone = [predict(calc, frames) for calc in single]
            for (name, pred), parts in zip(groups(preds["committee"], label),
                                           zip(*(groups(p, label) for p in alone))):
                mean_e, mean_f = errors(pred)
                each = [errors(p) for _, p in parts]
                sizes = {k: subset_errors([p for _, p in parts], k)
                         for k in range(2, len(members))}
                entry = result["sets"].setdefault(name, {})
                entry["committee mean"], entry["members"] = [mean_e, mean_f], each
                entry["subsets"] = {str(k): list(v) for k, v in sizes.items()}
                col = 1 if pred["dfc"] else 0
                acc_rows.append([name, len(pred["de"]),
                                 " / ".join(f"{v[col]:.1f}" for v in each),
                                 f"{np.mean([v[col] for v in each]):.1f}",
                                 *(f"{v[col]:.1f}" for v in sizes.values()),
                                 f"**{(mean_f if col else mean_e):.1f}**",
                                 "F (meV/Å)" if col else "E (meV)"])
            for est, (_, th) in estimates.items():
                result["thresholds"][est] = th
                for name, pred in groups(preds[est], label):
                    fm, fr, fe, rank = flags(pred, th)
                    result["sets"].setdefault(name, {})[est] = {
                        "flagged_max": fm, "flagged_rms": fr, "flagged_either": fe,
                        "spearman": rank}
                    unc_rows.append([name, est, len(pred["de"]), f"{fm:.1f} %", f"{fr:.1f} %",
                                     f"{fe:.1f} %", f"{rank:.3f}"])
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    text = (f"Committee of {len(members)} independently trained potentials on {work}.\n\n"
            + markdown_table(["set", "frames", "members' RMSE", "their mean",
                              *(f"committees of {k} (mean)" for k in range(2, len(members))),
                              f"committee of {len(members)}", "quantity"], acc_rows)
            + "\n\nFlag thresholds (95 % of the validation frames under each, eV/Å): "
            + "; ".join(f"{k}: largest {v['max']:.4g}, RMS {v['rms']:.4g}"
                        for k, v in result["thresholds"].items())
            + ".\n\n"
            + markdown_table(["set", "estimate", "frames", "flagged: largest std",
                              "flagged: RMS std", "flagged: either",
                              ("Spearman (forces_std vs per-atom force error; energy-only "
                               "sets: energy_std vs energy error)")], unc_rows) + "\n")
    return text, result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="a work folder of benchmarks/accuracy.py "
                        "(split.json, valid.xyz, train.xyz, eval_*.xyz)")
    parser.add_argument("--members", nargs="+", required=True,
                        help="potential files of one architecture trained on that split")
    parser.add_argument("--latent", action="store_true",
                        help="also the first member's latent-distance part, side by side")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--report", default=None, help="also write the report here (markdown); "
                        "its numbers go beside it as .json")
    args = parser.parse_args(argv)
    work = Path(args.work)
    missing = [str(p) for p in [work / "split.json", work / "valid.xyz", *args.members]
               if not Path(p).is_file()]
    if missing:
        print(f"committee.py: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    if len(args.members) < 2:
        print("committee.py: a committee needs at least two --members", file=sys.stderr)
        return 2
    text, result = run(work, [Path(m) for m in args.members], args.latent, args.dtype)
    print(text)
    if args.report:
        report = Path(args.report)
        report.write_text(text)
        report.with_suffix(".json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
