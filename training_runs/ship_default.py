"""Copy a finished run's exported potential into potentials/ as the shipped default.

Adds the metadata a user of the registry needs (name, teacher, data recipe, model card) to the
EMA weights the trainer exported, writes ``potentials/<name>.pt`` atomically and names it in
``potentials/DEFAULT``. The model card's numbers come from ``benchmarks/model_card.py``. A new
file invalidates the old uncertainty sidecar (it is bound to the file's sha256): refit it with
``training_runs/fit_default_uncertainty.py``.

Usage: python training_runs/ship_default.py RUN/potential.pt NAME [CHAIN]
CHAIN names the data recipe recorded in the file: "v8" (default; est-emt-small version 8: version
7 with the joint norm and ZBL, fine-tuned by est-emt-small-v8*.yaml), "fast" (version 7, the
C = 24, S = 32, M = 1 architecture: est-emt-fast*.yaml) or "small48" (version 6 and earlier:
est-emt-small*.yaml).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_DATA = ("est generate data/generated/train --n-systems 160 --seed 11 --formats hdf5 (1,769 "
         "frames) plus --n-systems 320 with --seed 16 ... 25 (36,872 frames in all)")
FAST_DATA_RECIPE = (
    f"stage 1 (CPU, from scratch, training_runs/est-emt-fast.yaml): {_DATA}; two GPU stages "
    "then continued it on seeds 11 and 16-19 (15,797 frames; training_runs/est-emt-fast-gpu.yaml, "
    "-gpu2.yaml), and stage 3 continued those on the CPU on all 36,872 frames "
    "(training_runs/est-emt-fast-stage3.yaml); validation: --n-systems 24 --seed 12"
)
V8_DATA_RECIPE = (
    f"version 7 ({FAST_DATA_RECIPE}) carried over to the joint l > 0 norm and the ZBL repulsion "
    "(training_runs/upgrade_norm.py), then two CPU stages on all 36,872 frames "
    "(training_runs/est-emt-small-v8.yaml, -v8-stage2.yaml); validation: --n-systems 24 --seed 12"
)
SMALL48_DATA_RECIPE = (
    "stage 1: est generate data/generated/train --n-systems 160 --seed 11 --formats hdf5 "
    "(1,769 frames); stage 2 adds --n-systems 320 with --seed 16 and --seed 17, stage 3 with --seed 18 "
    "and --seed 19, stage 4 with --seed 20, 21 and 22 (26,338 frames), stage 5 with --seed 23, 24 "
    "and 25 (36,872 frames in all); two GPU stages then continued stage 5 on seeds 11 and 16-19 "
    "(15,797 frames; training_runs/est-emt-small-gpu.yaml, -gpu2.yaml), and stage 6 continued "
    "those on the CPU on all 36,872 frames (training_runs/est-emt-small-stage6.yaml); "
    "validation: --n-systems 24 --seed 12"
)


def main(argv: list[str]) -> int:
    import torch

    from est_calc.potential import load_potential, save_potential

    recipes = {"v8": V8_DATA_RECIPE, "fast": FAST_DATA_RECIPE, "small48": SMALL48_DATA_RECIPE}
    if len(argv) not in (2, 3) or (len(argv) == 3 and argv[2] not in recipes):
        print(__doc__)
        return 2
    src, name = Path(argv[0]), argv[1]
    recipe = recipes[argv[2] if len(argv) == 3 else "v8"]
    pot = load_potential(str(src), dtype=torch.float32)
    meta = dict(pot.metadata)
    meta.update({
        "name": name,
        "teacher": "ASE EMT (demonstration and testing; not DFT chemistry)",
        "data_recipe": recipe,
        "model_card": f"potentials/{name}.md",
    })
    pot.metadata = meta
    out = ROOT / "potentials" / f"{name}.pt"
    save_potential(pot, out)
    (ROOT / "potentials" / "DEFAULT").write_text(name + "\n")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MB) and potentials/DEFAULT")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
