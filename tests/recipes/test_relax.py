"""Relaxation recipes with EMT: convergence, constraints, cell relaxation, batched FIRE."""

import warnings

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT

from md_recipes import build_slab, relax, relax_many


def _rattled_slab(seed=3, size=(2, 2, 3)):
    slab = build_slab("Cu111", size=size, n_fixed_layers=1)
    slab.rattle(0.08, seed=seed)  # FixAtoms keeps the fixed layer in place
    return slab


def test_relax_converges_and_fixed_atoms_stay(tmp_path):
    slab = _rattled_slab()
    fixed = slab.constraints[0].get_indices()
    traj = tmp_path / "relax.traj"
    res = relax(slab, EMT(), fmax_eV_per_A=0.02, optimizer="BFGS", trajectory=str(traj),
                logfile=str(tmp_path / "relax.log"))
    assert res.converged and res.steps > 0
    forces = res.atoms.get_forces()
    assert np.linalg.norm(forces, axis=1).max() < 0.02
    assert res.fmax_eV_per_A < 0.02
    np.testing.assert_array_equal(res.atoms.positions[fixed], slab.positions[fixed])
    moved = np.delete(np.arange(len(slab)), fixed)
    assert np.abs(res.atoms.positions[moved] - slab.positions[moved]).max() > 1e-3
    assert res.energies[-1] < res.energies[0]  # the relaxation went downhill
    assert len(res.energies) == res.steps + 1
    from ase.io import read

    frames = read(traj, ":")
    assert len(frames) == res.steps + 1
    assert frames[-1].get_potential_energy() == pytest.approx(res.energies[-1])
    np.testing.assert_array_equal(slab.positions, _rattled_slab().positions)  # input untouched


def test_non_convergence_is_reported():
    slab = _rattled_slab()
    with pytest.warns(RuntimeWarning, match="NOT converge"):
        res = relax(slab, EMT(), fmax_eV_per_A=0.01, max_steps=2)
    assert res.converged is False
    assert res.steps == 2
    assert res.fmax_eV_per_A > 0.01


def test_unknown_optimizer_lists_choices():
    with pytest.raises(ValueError, match="FIRE.*BFGS.*LBFGS"):
        relax(bulk("Cu"), EMT(), optimizer="CG")


@pytest.mark.slow
def test_cell_relaxation_recovers_emt_lattice_constant():
    # Independent reference: minimum of an energy-volume scan (parabola through the scan).
    a_grid = np.linspace(3.50, 3.68, 10)
    energies = []
    for a in a_grid:
        atoms = bulk("Cu", "fcc", a=a)
        atoms.calc = EMT()
        energies.append(atoms.get_potential_energy())
    c = np.polyfit(a_grid, energies, 4)
    fine = np.linspace(a_grid[0], a_grid[-1], 20001)
    a_ref = fine[np.argmin(np.polyval(c, fine))]

    strained = bulk("Cu", "fcc", a=3.75)  # +4% strain
    res = relax(strained, EMT(), fmax_eV_per_A=1e-4, optimizer="BFGS", relax_cell=True)
    assert res.converged
    a_fit = res.atoms.cell.cellpar()[0] * np.sqrt(2)  # primitive fcc: |a_i| = a / sqrt(2)
    print(f"EMT Cu: a(cell relax) = {a_fit:.5f} Å, a(E-V scan) = {a_ref:.5f} Å")
    assert abs(a_fit - a_ref) < 2e-3
    assert np.allclose(res.atoms.cell.angles(), 60.0, atol=1e-3)  # symmetry kept


def test_relax_many_matches_relax(batch_emt):
    structures = [_rattled_slab(seed=s) for s in (1, 2)]
    single = [relax(s, EMT(), fmax_eV_per_A=0.03, optimizer="FIRE") for s in structures]
    batched = relax_many(structures, batch_emt, fmax_eV_per_A=0.03)
    assert batch_emt.n_batch_calls > 0
    for one, many, start in zip(single, batched, structures):
        assert one.converged and many.converged
        # Same FIRE path: same step count and the same energy well within the tolerance.
        assert many.steps == one.steps
        e1, e2 = one.atoms.get_potential_energy(), many.atoms.get_potential_energy()
        assert abs(e1 - e2) < 1e-6
        fixed = start.constraints[0].get_indices()
        np.testing.assert_array_equal(many.atoms.positions[fixed], start.positions[fixed])


def test_relax_many_stops_each_structure_on_its_own(batch_emt):
    near = _rattled_slab(seed=1)
    near = relax(near, EMT(), fmax_eV_per_A=0.02, optimizer="BFGS").atoms  # already relaxed
    far = _rattled_slab(seed=2)
    res = relax_many([near, far], batch_emt, fmax_eV_per_A=0.03)
    assert res[0].steps == 0 and res[0].converged
    assert res[1].steps > 0 and res[1].converged


def test_relax_many_reports_non_convergence(batch_emt):
    with pytest.warns(RuntimeWarning, match="NOT converge"):
        res = relax_many([_rattled_slab()], batch_emt, fmax_eV_per_A=0.01, max_steps=3)
    assert not res[0].converged and res[0].steps == 3


def test_relax_many_falls_back_without_batch_api():
    structures = [_rattled_slab(seed=5)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = relax_many(structures, EMT(), fmax_eV_per_A=0.05)
    assert res[0].converged
