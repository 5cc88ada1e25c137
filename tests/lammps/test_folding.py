"""Periodic images folded onto their atoms (est_lammps/README.md, "Design"): on one rank the
model is given the local atoms only, with exactly the pairs of ASE's periodic neighbour list (each
once: package format 2), and
the results equal ESTCalculator's to round-off (1e-12) and those of 2 ranks, where atoms of the
other rank are ghosts with real positions. Cells smaller than the cutoff, where an atom is its
own neighbour several times, and a triclinic cell included."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk
from ase.neighborlist import neighbor_list
from lammps_cases import lower_triangular, reference, single_point, structures

pytestmark = pytest.mark.lammps

CUTOFF_A = 4.0  # the test package's (conftest.py)


def _small_cells() -> dict:
    one = bulk("Cu", "fcc", a=3.61)  # primitive, triclinic: 2.55 Å lattice vectors, 18 images within r_c
    four = bulk("Cu", "fcc", a=3.61, cubic=True)  # 3.61 Å < r_c: each atom its own neighbour
    four.numbers[[1, 2]] = [8, 6]
    four.rattle(0.06, seed=7)
    two = bulk("Cu", "fcc", a=3.62) * (2, 1, 1)  # a skewed primitive pair
    two.set_cell(two.cell.array @ (np.eye(3) + [[0.0, 0.05, -0.04], [0.03, 0.0, 0.06],
                                                [-0.05, 0.02, 0.0]]), scale_atoms=True)
    two.numbers[1] = 8
    two.rattle(0.05, seed=8)
    return {"fcc1": lower_triangular(one), "fcc4": lower_triangular(four),
            "skew2": lower_triangular(two)}


CASES = {**_small_cells(), **{k: v for k, v in structures().items()
                             if k in ("bulk", "slab", "triclinic", "faces")}}


def _close(got, want, rtol):
    """|got - want| <= rtol x the largest |want|, or rtol x 0.01 where that is smaller (a
    quantity that is zero by symmetry, as the force in a one-atom cell)."""
    got, want = np.asarray(got, float), np.asarray(want, float)
    scale = max(float(np.abs(want).max()), 1e-2)
    assert np.abs(got - want).max() <= rtol * scale, (np.abs(got - want).max(), scale)


@pytest.mark.parametrize("name", list(CASES))
def test_one_rank_model_sees_local_atoms_only(name, package, tmp_path):
    atoms = CASES[name]
    got = single_point(atoms, package, tmp_path)
    n_edges = len(neighbor_list("i", atoms, CUTOFF_A))
    assert got.graph == (len(atoms), 0, n_edges // 2)  # one edge per pair
    want = reference(atoms, package)
    assert got.energy == pytest.approx(want.energy, rel=1e-12, abs=1e-12)
    for field in ("forces", "virial", "energies", "atom_virial"):
        _close(getattr(got, field), getattr(want, field), 1e-12)


@pytest.mark.parametrize("name", ["fcc1", "fcc4", "triclinic"])
def test_folded_equals_ghosts_of_another_rank(name, package, tmp_path):
    """Two ranks: each rank's own images fold, the other rank's atoms are ghosts (reverse
    communication), and the copies of one such atom (its images, plentiful in these cells
    smaller than the ghost reach) fold onto one of them: each rank gives the model every atom
    at most once. The same numbers as one rank to 1e-12. With one atom, one rank holds it and
    all its images and the other rank nothing."""
    atoms = CASES[name]
    one = single_point(atoms, package, tmp_path / "np1")
    two = single_point(atoms, package, tmp_path / "np2", nprocs=2)
    assert (two.graph[1] > 0) == (len(atoms) > 1)
    assert two.graph[0] <= 2 * len(atoms)  # atoms given, summed over the two ranks
    assert two.energy == pytest.approx(one.energy, rel=1e-12, abs=1e-12)
    for field in ("forces", "virial", "energies", "atom_virial"):
        _close(getattr(two, field), getattr(one, field), 1e-12)


def test_without_atom_ids_the_ghost_shell(package, tmp_path):
    """Without atom IDs (`atom_modify id no`) nothing can be folded: the model is given the
    ghost shell, with the same energy and virial (an orthogonal box: LAMMPS builds triclinic
    lists only with IDs)."""
    from lammps_cases import NKTV2P, SINGLE_POINT, header, run_lmp, write_data

    atoms = CASES["bulk"]
    want = single_point(atoms, package, tmp_path / "ids")
    folder = tmp_path / "no_ids"
    folder.mkdir()
    write_data(atoms, folder / "data.lmp")
    lines = (folder / "data.lmp").read_text().splitlines()
    start = lines.index("Atoms # atomic") + 2
    for k in range(start, start + len(atoms)):
        lines[k] = "0 " + lines[k].split(" ", 1)[1]
    lines = [line for line in lines if not line.endswith("xy xz yz")]
    (folder / "data.lmp").write_text("\n".join(lines) + "\n")
    script = header(atoms, package, folder / "data.lmp").replace("atom_modify map yes",
                                                                  "atom_modify id no")
    script += "\n".join(line for line in SINGLE_POINT.splitlines()
                        if not line.startswith(("dump", "compute pea", "compute sa")))
    run_lmp(script, folder)
    values = [float(v) for v in (folder / "result.txt").read_text().split()[1:]]
    atoms_given, ghosts, _ = (int(v) for v in values[8:11])
    assert ghosts > 0 and atoms_given == len(atoms) + ghosts
    assert values[0] == pytest.approx(want.energy, rel=1e-12, abs=1e-12)
    _close(np.array(values[1:7]) * values[7] / NKTV2P, want.virial, 1e-12)
