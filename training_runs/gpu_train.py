"""One prepared GPU training session for the default potential (issue 7), time-boxed.

Runs ``est train`` on a config (default ``training_runs/est-emt-small-gpu.yaml``: continue
stage 5 of the old chain, ``runs/est-emt-small-stage5/checkpoint.pt``, with larger batches)
inside a wall-clock budget (``train.time_budget_s``: the schedule is fitted to the steps that
fit), and leaves the run's ``checkpoint.pt``, ``potential.pt``, ``metrics.csv`` and a short
report under ``--out``.

The GPU machine has no registry and no ASE: ``bash benchmarks/gpu_wheels.sh`` downloads the
wheels here (``.whl/est``); the data is generated here and carried (a few tens of MB).

Usage with the device tool (after ``bash benchmarks/gpu_wheels.sh`` and the data commands in the
config's header), carrying ``.whl/est``, the data folders the config reads and the run folder
its ``train.init`` names (``runs/...``; run outputs are not in git)::

    python3 training_runs/gpu_train.py --wheels .whl --out $OUT --budget 420

Back here: ``python benchmarks/model_card.py $FILES/run/potential.pt --set val=...`` for the
card's numbers, then ``training_runs/ship_default.py`` if it beats the shipped potential. Copy
``$OUT/run`` to the config's ``output_dir`` (``runs/<config name>``) for the stage after it.
``--device cpu --budget 20 --set ...`` runs the same path on a CPU (a test does).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "training_runs" / "est-emt-small-gpu.yaml"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wheels", default=None, help="folder holding est/*.whl (benchmarks/gpu_wheels.sh)")
    p.add_argument("--out", required=True, help="where the run and its report go ($OUT)")
    p.add_argument("--budget", type=float, default=420.0,
                   help="wall-clock seconds for the training itself (default 420)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--device", default="cuda")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, as for est train (repeatable)")
    args = p.parse_args(argv)

    if args.wheels:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from gpu import rerun_with_wheels

        status = rerun_with_wheels(args.wheels, __file__,
                                   list(argv if argv is not None else sys.argv[1:]))
        if status is not None:
            return status
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))

    import torch

    from est_calc.cli import log_to_stdout
    from est_calc.training.config import load_config
    from est_calc.training.trainer import train

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device visible to torch; use --device cpu for a dry run")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(ROOT)  # the config's data and init paths are relative to the repository
    overrides = [f"output_dir={out / 'run'}", f"train.device={args.device}",
                 f"train.time_budget_s={args.budget}", "train.progress=false", *args.set]
    cfg = load_config(args.config, overrides)
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(f"training on {device_name}, budget {args.budget:.0f} s, config {args.config}", flush=True)
    t0 = time.perf_counter()
    with log_to_stdout():  # the trainer's reports (data, time-budget plans) into the log
        path = train(cfg)
    wall = time.perf_counter() - t0

    from est_calc.potential import load_potential

    meta = load_potential(path).metadata
    report = {"device": device_name, "torch": torch.__version__, "config": str(args.config),
              "overrides": overrides, "wall_s": round(wall, 1), "training": meta.get("training"),
              "val_metrics": meta.get("val_metrics")}
    (out / "train_report.json").write_text(json.dumps(report, indent=1, default=str))
    val = meta.get("val_metrics") or {}
    print(f"done in {wall:.0f} s: {meta['training']['steps']} steps; validation force MAE "
          f"{1e3 * val.get('forces_mae', float('nan')):.1f} meV/Å, energy MAE "
          f"{1e3 * val.get('energy_per_atom_mae', float('nan')):.2f} meV/atom", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
