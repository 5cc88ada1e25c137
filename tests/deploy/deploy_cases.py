"""Structures and inputs shared by the deployment tests."""

from __future__ import annotations

import itertools

import numpy as np
from ase import Atoms
from ase.build import bulk, fcc111, molecule

POTENTIAL = "est-emt-small"


def structures() -> dict[str, Atoms]:
    """Periodic bulk, slab with adsorbates, molecule and a triclinic cell of H, C, O and Cu (the
    elements of the test potentials), rattled so that no force vanishes by symmetry."""
    cu = bulk("Cu", "fcc", a=3.62, cubic=True) * (2, 2, 1)
    cu.numbers[[3, 9]] = [6, 8]  # C, O
    cu.rattle(0.05, seed=1)

    slab = fcc111("Cu", size=(2, 2, 3), vacuum=6.0)
    co = molecule("CO")
    co.translate(slab.positions[9] + [0, 0, 1.9] - co.positions[1])  # C down, on top
    slab += co[[1, 0]]
    slab.append("H")
    slab.positions[-1] = slab.positions[10] + [0.8, 0.4, 1.2]
    slab.rattle(0.04, seed=2)

    mol = molecule("CH3CH2OH")
    mol.rattle(0.03, seed=3)

    tri = bulk("Cu", "fcc", a=3.6).repeat((2, 2, 2))
    rng = np.random.default_rng(4)
    tri.set_cell(tri.cell.array @ (np.eye(3) + 0.05 * rng.standard_normal((3, 3))),
                 scale_atoms=True)
    tri.numbers[[1, 5]] = [8, 6]  # O, C
    tri.rattle(0.05, seed=5)
    return {"bulk": cu, "slab": slab, "molecule": mol, "triclinic": tri}


def _heights(cell: np.ndarray) -> np.ndarray:
    """Perpendicular heights of a cell's three layers of lattice planes."""
    return 1.0 / np.linalg.norm(np.linalg.inv(cell).T, axis=1)


def ghost_inputs(atoms: Atoms, reach_A: float, cutoff_A: float, skin_A: float = 0.0):
    """LAMMPS-style inputs: the atoms (local) and every periodic image within ``reach_A`` of one
    of them (ghosts, with real positions), every pair closer than cutoff + skin one edge i -> j
    with i < j (a package takes each pair once) and zero shift (LAMMPS's lists include the skin). Returns (positions, numbers, edge_index, owner) as
    numpy arrays."""
    cell, n = atoms.cell.array, len(atoms)
    # An image k cells away along a plane normal lies at least (k - 1) heights from the cell.
    reps = [int(np.ceil(reach_A / h)) + 1 if p else 0
            for h, p in zip(_heights(cell), atoms.pbc)]
    pos, owner = [atoms.positions], [np.arange(n)]
    for shift in itertools.product(*(range(-r, r + 1) for r in reps)):
        if not any(shift):
            continue
        image = atoms.positions + np.asarray(shift) @ cell
        d = np.linalg.norm(image[:, None, :] - atoms.positions[None, :, :], axis=-1).min(axis=1)
        keep = d <= reach_A
        pos.append(image[keep])
        owner.append(np.arange(n)[keep])
    pos, owner = np.concatenate(pos), np.concatenate(owner)
    d = np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=-1)
    i, j = np.nonzero((d < cutoff_A + skin_A) & np.triu(np.ones(d.shape, dtype=bool), 1))
    return pos, atoms.numbers[owner], np.stack([i, j]), owner
