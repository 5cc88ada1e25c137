"""One model call per geometry for systems periodic in all three directions (issue 23)."""

from __future__ import annotations

import numpy as np
from ase.build import bulk, fcc111

from est_calc.calculator import ESTCalculator


def test_forces_then_stress_on_bulk_is_one_call(make_potential, triclinic_bulk):
    calc = ESTCalculator(make_potential(), device="cpu", dtype="float64")
    atoms = triclinic_bulk
    atoms.calc = calc
    forces = atoms.get_forces()
    stress = atoms.get_stress()
    energy = atoms.get_potential_energy()
    assert calc.n_model_calls == 1
    # the same numbers as asking for everything at once, and as asking for stress alone
    other = ESTCalculator(make_potential(), device="cpu", dtype="float64")
    fresh = atoms.copy()
    fresh.calc = other
    np.testing.assert_allclose(fresh.get_stress(), stress, rtol=0, atol=1e-13)
    np.testing.assert_allclose(fresh.get_forces(), forces, rtol=0, atol=1e-13)
    assert fresh.get_potential_energy() == energy and other.n_model_calls == 1


def test_slab_computes_stress_only_on_request(make_potential, cu_slab_co):
    calc = ESTCalculator(make_potential(), device="cpu", dtype="float64")
    cu_slab_co.calc = calc
    cu_slab_co.get_forces()
    assert "stress" not in calc.results and calc.n_model_calls == 1
    cu_slab_co.get_stress()
    assert calc.n_model_calls == 2


def test_cell_relaxation_costs_one_call_per_step(make_potential):
    """FrechetCellFilter asks for forces and stress at every step: one model call each."""
    from md_recipes import relax

    atoms = bulk("Cu", "fcc", a=3.7, cubic=True)
    atoms.rattle(0.05, seed=0)
    calc = ESTCalculator(make_potential(), device="cpu", dtype="float64")
    res = relax(atoms, calc, fmax_eV_per_A=1e-9, max_steps=6, relax_cell=True)
    # one call for the initial point, one per step, and the relax recipe's final check
    assert calc.n_model_calls <= res.steps + 2
    assert calc.n_model_calls >= res.steps


def test_slab_geometry_not_affected(make_potential):
    atoms = fcc111("Cu", (2, 2, 2), vacuum=5.0)
    atoms.calc = ESTCalculator(make_potential(), device="cpu", dtype="float64")
    atoms.get_potential_energy()
    assert "stress" not in atoms.calc.results
