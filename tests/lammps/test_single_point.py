"""LAMMPS with pair_style est gives ESTCalculator's energy, forces, virial, per-atom energies and
per-atom virials (float64, 1e-6 relative) on a periodic bulk, a slab with vacuum, a triclinic
cell, a cell with an atom at every face, a molecule and two atoms without edges; and the same
on 1, 2 and 4 MPI ranks (1e-10)."""

from __future__ import annotations

import numpy as np
import pytest
from lammps_cases import reference, single_point, structures

pytestmark = pytest.mark.lammps

CASES = structures()


def _close(got, want, rtol):
    got, want = np.asarray(got, float), np.asarray(want, float)
    scale = max(float(np.abs(want).max()), 1e-12)
    assert np.abs(got - want).max() <= rtol * scale, (np.abs(got - want).max(), scale)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_calculator(name, package, tmp_path):
    atoms = CASES[name]
    got = single_point(atoms, package, tmp_path)
    want = reference(atoms, package)
    assert got.energy == pytest.approx(want.energy, rel=1e-6, abs=1e-9)
    _close(got.forces, want.forces, 1e-6)
    _close(got.virial, want.virial, 1e-6)
    _close(got.energies, want.energies, 1e-6)
    _close(got.atom_virial, want.atom_virial, 1e-6)
    # The per-atom quantities sum to the global ones.
    assert got.energies.sum() == pytest.approx(got.energy, rel=1e-10)
    _close(got.atom_virial.sum(0), got.virial, 1e-10)


@pytest.mark.parametrize("name", ["slab", "triclinic"])
def test_rank_count_independent(name, package, tmp_path):
    atoms = CASES[name]
    runs = {n: single_point(atoms, package, tmp_path / f"np{n}", nprocs=n) for n in (1, 2, 4)}
    one = runs[1]
    for n in (2, 4):
        got = runs[n]
        assert got.energy == pytest.approx(one.energy, rel=1e-10, abs=1e-12), n
        for field in ("forces", "virial", "energies", "atom_virial"):
            _close(getattr(got, field), getattr(one, field), 1e-10)


def test_matches_eager_potential(package, make_potential, tmp_path):
    """The package's source potential, run eagerly by ESTCalculator, gives the same numbers."""
    from est_calc.calculator import ESTCalculator

    atoms = CASES["triclinic"].copy()
    got = single_point(atoms, package, tmp_path)
    atoms.calc = ESTCalculator(model=make_potential("so2", n_layers=1), dtype="float64")
    assert got.energy == pytest.approx(atoms.get_potential_energy(), rel=1e-6)
    _close(got.forces, atoms.get_forces(), 1e-6)
    _close(got.energies, atoms.get_potential_energies(), 1e-6)
    stress = atoms.get_stress(voigt=True)
    _close(got.virial, -atoms.get_volume() * stress[[0, 1, 2, 5, 4, 3]], 1e-6)
