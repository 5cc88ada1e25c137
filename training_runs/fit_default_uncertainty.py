"""Fit the shipped default potential's uncertainty part and write it beside the potential file.

The latent-distance estimate (:mod:`est_calc.uncertainty`) of ``potentials/<default>.pt``:
reference features from the stage-1 training frames, calibration on a fresh in-distribution EMT
set (the training recipe with a seed no data set of the model card uses). The sidecar
``potentials/<stem>.uncertainty`` is bound to the potential file's sha256; the potential file
itself is not touched.

Usage: python training_runs/fit_default_uncertainty.py TRAIN.h5 [--calibration-systems 48]
(TRAIN.h5: ``est generate data/generated/train --n-systems 160 --seed 11 --formats hdf5``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CALIBRATION_SEED = 31


def main(argv: list[str] | None = None) -> int:
    from est_calc.potential import _resolve, load_potential
    from est_calc.training.datasets import open_dataset
    from est_calc.training.synthetic import generate
    from est_calc.training.uncertainty import fit_latent_distance
    from est_calc.uncertainty import save_uncertainty

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("train", help="reference frames (the stage-1 training set, HDF5)")
    p.add_argument("--calibration-systems", type=int, default=48)
    p.add_argument("--n-reference", type=int, default=2048)
    args = p.parse_args(argv)
    path = Path(_resolve("default"))
    pot = load_potential(str(path))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp, n_systems=args.calibration_systems, seed=CALIBRATION_SEED,
                 formats=("hdf5",), progress=False)
        calibration = list(open_dataset(Path(tmp) / "synthetic.h5"))
        reference = list(open_dataset(args.train))
        part, report = fit_latent_distance(pot, reference, calibration,
                                           n_reference=args.n_reference)
    recipe = (f"reference: {Path(args.train).parent.name}/{Path(args.train).name} ({report['n_reference_atoms']} atoms, "
              f"{args.n_reference} per element kept); calibration: est generate --n-systems "
              f"{args.calibration_systems} --seed {CALIBRATION_SEED} "
              f"({report['n_calibration_atoms']} atoms)")
    meta = {"kind": "latent_distance", "recipe": recipe,
            "fit": {k: v for k, v in report.items() if k != "bins"}}
    out = save_uncertainty(part, path, metadata=meta)
    print(json.dumps(meta, indent=1))
    print(f"wrote {out} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
