"""pair_style est chunk_atoms N (est_lammps/README.md, "Chunks"): a rank's local atoms are given
to the model in groups of at most N, each with the atoms its energies depend on (n_layers + 1
hops), so the memory of one evaluation is bounded; energies, forces, virials and per-atom
quantities equal one evaluation's to round-off (1e-12, float64), on 1 and 2 ranks, and the
model is given more atoms in all (each group's halo). Bad options stop with one error line."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk
from lammps_cases import header, lower_triangular, run_lmp, single_error, single_point, \
    structures, write_data

pytestmark = pytest.mark.lammps


def _close(got, want, rtol):
    got, want = np.asarray(got, float), np.asarray(want, float)
    scale = max(float(np.abs(want).max()), 1e-2)
    assert np.abs(got - want).max() <= rtol * scale, (np.abs(got - want).max(), scale)


def _cases() -> dict:
    big = bulk("Cu", "fcc", a=3.62, cubic=True) * (2, 2, 3)  # 48 atoms, 7.2 x 7.2 x 10.9 Å
    big.numbers[[5, 17, 30]] = [8, 6, 1]
    big.rattle(0.05, seed=11)
    cases = {k: v for k, v in structures().items() if k in ("slab", "triclinic", "molecule",
                                                             "apart")}
    return {"bulk48": lower_triangular(big), **cases}


CASES = _cases()


def _same(got, want):
    assert got.energy == pytest.approx(want.energy, rel=1e-12, abs=1e-12)
    for field in ("forces", "virial", "energies", "atom_virial"):
        _close(getattr(got, field), getattr(want, field), 1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_chunks_equal_one_evaluation(name, package, tmp_path):
    atoms = CASES[name]
    whole = single_point(atoms, package, tmp_path / "whole")
    size = max(1, len(atoms) // 3)
    chunked = single_point(atoms, package, tmp_path / "chunks", style=f"est chunk_atoms {size}")
    _same(chunked, whole)
    if name != "apart":
        # every group brings its halo: more atoms in all than the structure has
        assert chunked.graph[0] > whole.graph[0] and chunked.graph[1] > 0


def test_chunks_on_two_ranks(package, tmp_path):
    atoms = CASES["bulk48"]
    whole = single_point(atoms, package, tmp_path / "np1")
    two = single_point(atoms, package, tmp_path / "np2", nprocs=2, style="est chunk_atoms 7")
    _same(two, whole)


def test_one_atom_per_chunk(package, tmp_path):
    atoms = CASES["triclinic"]
    _same(single_point(atoms, package, tmp_path / "c1", style="est chunk_atoms 1"),
          single_point(atoms, package, tmp_path / "c0"))


@pytest.mark.parametrize("options, message", [
    ("chunk_atoms 0", "chunk_atoms needs a positive integer, got '0'"),
    ("chunk_atoms 2x", "chunk_atoms needs a positive integer, got '2x'"),
    ("chunk_atoms", "chunk_atoms needs a number of atoms"),
    ("chunks 4", "unknown option 'chunks'"),
])
def test_bad_options(options, message, package, tmp_path):
    atoms = CASES["triclinic"]
    write_data(atoms, tmp_path / "data.lmp")
    script = header(atoms, package, tmp_path / "data.lmp", f"est {options}") + "run 0\n"
    result = run_lmp(script, tmp_path, check=False, timeout=120)
    assert message in single_error(result), result.stdout[-2000:]
