"""Batching, locality and extensivity, and smoothness at the cutoff."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms

from est_calc.batch import AtomsBatch
from est_calc.testing import check_batched_equals_single, check_no_cross_talk, predict

EXACT = 1e-10


@pytest.fixture
def pot(make_potential, message):
    return make_potential(message)


def test_batched_equals_single(pot, cu_slab_co, triclinic_bulk):
    # Full, mixed and no periodicity in one batch (the molecule has a vacuum cell for stress).
    co = Atoms("CO", positions=[[1, 1, 1], [1, 1, 2.15]], cell=[6, 6, 6], pbc=False)
    assert check_batched_equals_single(pot, [triclinic_bulk, co, cu_slab_co], stress=True) <= EXACT


def test_no_gradient_leaks_between_structures(pot, cu_slab_co, triclinic_bulk):
    # d E_A / d r_B must be exactly zero for A != B (no batch-wide normalisation or mixing).
    assert check_no_cross_talk(pot, [cu_slab_co, triclinic_bulk], tol=0.0) == 0.0


def test_moving_one_structure_leaves_the_other_unchanged(pot, cu_slab_co, triclinic_bulk):
    other = triclinic_bulk.copy()
    other.rattle(0.1, seed=7)
    a = predict(pot, AtomsBatch.from_atoms([cu_slab_co, triclinic_bulk]), compute_stress=True)
    b = predict(pot, AtomsBatch.from_atoms([cu_slab_co, other]), compute_stress=True)
    n = len(cu_slab_co)
    assert torch.equal(a.energy[0], b.energy[0])
    assert torch.allclose(a.forces[:n], b.forces[:n], atol=EXACT, rtol=0)
    assert torch.allclose(a.stress[0], b.stress[0], atol=EXACT, rtol=0)
    assert not torch.allclose(a.forces[n:], b.forces[n:], atol=1e-6)  # B did change


@pytest.mark.parametrize(
    "structure, reps",
    [("triclinic_bulk", (2, 2, 2)),  # cell smaller than the cutoff: many self-images
     ("cu_slab_co", (2, 2, 1))],     # in-plane cell wider than the cutoff
)
def test_supercell_is_extensive(pot, structure, reps, request):
    atoms = request.getfixturevalue(structure)
    big = atoms.repeat(reps)
    k = int(np.prod(reps))
    out = predict(pot, AtomsBatch.from_atoms([atoms, big]), compute_stress=True)
    n = len(atoms)
    assert abs(float(out.energy[1] - k * out.energy[0])) <= EXACT * k * len(atoms)
    # ase.Atoms.repeat tiles the whole structure image by image.
    assert torch.allclose(out.forces[n:], out.forces[:n].repeat(k, 1), atol=EXACT, rtol=0)
    assert torch.allclose(out.stress[1], out.stress[0], atol=EXACT, rtol=0)  # intensive


def test_energy_and_forces_smooth_through_the_cutoff(pot):
    rc = pot.cutoff_A
    dr = 2e-4
    distances = rc + dr * np.arange(-50, 51)  # 0.01 Å either side of the cutoff
    dimers = [Atoms("CuC", positions=[[0, 0, 0], [0, 0, d]]) for d in distances]
    far = Atoms("CuC", positions=[[0, 0, 0], [0, 0, 3 * rc]])
    near = Atoms("CuC", positions=[[0, 0, 0], [0, 0, rc - 0.5]])
    out = predict(pot, AtomsBatch.from_atoms(dimers + [far, near]))
    energy = out.energy[:-2]
    e_far, e_near = out.energy[-2], out.energy[-1]
    f_z = out.forces[1:2 * len(dimers):2, 2]  # force on C along the bond
    f_near = out.forces[-1, 2]
    assert abs(float(f_near)) > 1e-6  # the pair interacts inside the cutoff (not vacuous)
    assert abs(float(e_near - e_far)) > 1e-6
    inside = torch.as_tensor(distances < rc)
    # Beyond the cutoff the atoms do not interact at all.
    assert torch.allclose(energy[~inside], e_far.expand(int((~inside).sum())), atol=EXACT, rtol=0)
    assert torch.all(f_z[~inside] == 0)
    # Inside, energy and force go to their outside values continuously and dE/dr -> 0: within
    # 0.01 Å of rc both are tiny next to their values 0.5 Å inside (measured for the tiny preset:
    # 1.3e-5 and 3e-4 of them; the polynomial envelope vanishes like (rc - r)^3).
    e_ratio = float((energy[inside] - e_far).abs().max()) / abs(float(e_near - e_far))
    f_ratio = float(f_z[inside].abs().max()) / abs(float(f_near))
    assert e_ratio <= 1e-4 and f_ratio <= 3e-3, (e_ratio, f_ratio)
    # No jumps: every step changes E by no more than |F| dr (mean value theorem, with margin).
    steps = (energy[1:] - energy[:-1]).abs()
    assert float(steps.max()) <= 2 * dr * float(f_z.abs().max()) + EXACT
