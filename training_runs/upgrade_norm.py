"""Carry a potential trained with the separate l > 0 norm over to the joint norm and ZBL.

Potentials written before est_calc 0.2 normalise the l > 0 part of every EquivariantLayerNorm by
its own RMS (``vector_norm="separate"``), which amplifies float32 rounding on symmetric
structures (issue 21, est_calc/nn/so3.py). The joint statistic changes the function (version 7
of the default potential: validation force MAE 29 -> 350 meV/Å with its weights unchanged), so
such a potential is fine-tuned; this script makes the starting point: the same weights in a model
built with ``vector_norm="joint"`` and ``zbl=True``. (Rescaling each norm's l > 0 weights by the
median change of its statistic on training frames was tried and started worse: 665 meV/Å.)

Usage: python training_runs/upgrade_norm.py POTENTIAL OUT.pt
"""

from __future__ import annotations

import sys
from dataclasses import replace

import torch


def main(argv: list[str]) -> int:
    from est_calc.potential import Potential, load_potential, save_potential

    if len(argv) != 2:
        print(__doc__)
        return 2
    src, out = argv
    old = load_potential(src, dtype=torch.float32)
    config = replace(old.model.config, vector_norm="joint", zbl=True)
    pot = Potential.from_config(config, species=old.species, metadata=dict(old.metadata))
    pot.load_state_dict(old.state_dict())
    pot.metadata["upgraded_from"] = str(src)
    save_potential(pot, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
