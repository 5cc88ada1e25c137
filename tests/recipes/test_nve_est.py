"""NVE with the EST model itself: autograd forces of a smooth energy conserve the total energy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import add_adsorbate, fcc111
from ase.constraints import FixAtoms

from est_calc.calculator import ESTCalculator
from est_calc.model import ModelConfig
from est_calc.potential import Potential
from md_recipes import run_md


@pytest.mark.slow
def test_nve_float64_slab_with_adsorbate_conserves_energy_over_2_ps():
    torch.manual_seed(0)
    # The tiny preset with a 3.2 Å cutoff (first Cu shell) keeps 2000 steps affordable in CI.
    config = ModelConfig.preset("tiny", cutoff_A=3.2, message_n_points=16)
    pot = Potential.from_config(config, species=[6, 8, 29]).to(torch.float64)
    slab = fcc111("Cu", size=(4, 4, 6), vacuum=8.0)  # 96 Cu
    add_adsorbate(slab, Atoms("CO", positions=[(0, 0, 0), (0, 0, 1.15)]), 1.9, "ontop")
    slab.set_constraint(FixAtoms(indices=[a.index for a in slab if a.tag >= 5]))
    calc = ESTCalculator(pot, device="cpu", dtype="float64")
    n_steps, dt = 2000, 1.0
    res = run_md(slab, calc, ensemble="nve", temperature_K=300.0, timestep_fs=dt,
                 n_steps=n_steps, seed=1, log_every=10, progress=False)
    etot = np.asarray(res.etot)
    n_atoms = len(slab)
    drift = np.polyfit(np.asarray(res.time_fs) / 1000.0, etot, 1)[0] / n_atoms  # eV/atom/ps
    spread = (etot.max() - etot.min()) / n_atoms
    ekin_range = (np.max(res.ekin) - np.min(res.ekin)) / n_atoms
    print(f"EST NVE ({n_atoms} atoms, float64, 2 ps at 1 fs): drift {drift * 1e3:.4f} meV/atom/ps, "
          f"Etot spread {spread * 1e3:.4f} meV/atom, Ekin range {ekin_range * 1e3:.2f} meV/atom")
    assert res.time_fs[-1] == pytest.approx(n_steps * dt)
    assert ekin_range > 10 * spread  # the dynamics is not trivial: energy really flows
    assert spread < 1e-3  # total energy conserved within 1 meV/atom
