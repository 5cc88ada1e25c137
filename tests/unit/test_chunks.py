"""ESTCalculator(max_atoms=N) (est_calc/chunks.py): a structure of more than N atoms evaluated in
groups, each on the atoms within n_layers + 1 hops and the edges of those within n_layers hops,
gives one evaluation's energy, per-atom energies, forces and stress to float64 round-off, for a
two-layer potential on periodic bulk (cells smaller than the cutoff too), a slab and a molecule;
the halo is what its contract says (one atom fewer and an energy changes); bad values and
combinations are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk, fcc111, molecule

from est_calc import ESTCalculator
from est_calc.chunks import groups, neighbourhood


def _cases():
    cu = bulk("Cu", "fcc", a=3.62, cubic=True) * (2, 2, 3)
    cu.numbers[[3, 17, 30]] = [8, 6, 1]
    cu.rattle(0.05, seed=1)
    small = bulk("Cu", "fcc", a=3.62, cubic=True)  # 3.62 Å < r_c: atoms are their own neighbours
    small.rattle(0.05, seed=2)
    slab = fcc111("Cu", size=(3, 3, 3), vacuum=6.0)
    slab.append("O")
    slab.positions[-1] = slab.positions[20] + [0.0, 0.0, 1.9]
    slab.rattle(0.04, seed=3)
    mol = molecule("CH3CH2OH")
    mol.rattle(0.05, seed=4)
    # 36 Å long: a group's halo (3 hops of up to 4 Å each side) leaves most of it out, so a
    # halo one hop short changes the results (tested below)
    long = bulk("Cu", "fcc", a=3.62, cubic=True) * (2, 2, 10)
    long.numbers[[7, 77, 150]] = [8, 6, 1]
    long.rattle(0.05, seed=5)
    return {"bulk48": cu, "bulk4": small, "slab": slab, "ethanol": mol, "long160": long}


CASES = _cases()


@pytest.fixture(scope="module")
def two_layers(make_potential):
    return make_potential("so2", n_layers=2)


@pytest.mark.parametrize("name", list(CASES))
def test_groups_equal_one_evaluation(name, two_layers):
    atoms = CASES[name]
    want, got = atoms.copy(), atoms.copy()
    want.calc = ESTCalculator(two_layers, dtype="float64", device="cpu")
    got.calc = ESTCalculator(two_layers, dtype="float64", device="cpu",
                             max_atoms=max(1, len(atoms) // 3))
    props = ["energy", "forces", "energies"] + (["stress"] if atoms.pbc.all() else [])
    for prop in props:
        a, b = got.calc.get_property(prop, got), want.calc.get_property(prop, want)
        scale = max(float(np.abs(b).max()), 1e-2)
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-10 * scale, prop


def test_a_halo_one_hop_short_is_wrong(two_layers):
    """The contract is tight: with the halo of a one-layer model the two-layer energies change,
    and the groups' sub-structures are smaller than the structure (the test can see it)."""
    from est_calc.batch import AtomsBatch
    from est_calc.chunks import chunked_energy_forces_stress
    from est_calc.neighbors import build_graph

    atoms = CASES["long160"]
    batch = AtomsBatch.from_atoms(atoms, dtype=torch.float64)
    graph = build_graph(batch, two_layers.cutoff_A)
    whole = ESTCalculator(two_layers, dtype="float64", device="cpu")
    e_whole = whole.get_potential_energy(atoms.copy())
    for group in groups(batch.positions, 20):
        nodes, _ = neighbourhood(graph.edge_index, len(atoms), group, n_layers=2)
        assert int(nodes.sum()) < len(atoms)
    kw = dict(max_atoms=20, compute_stress=False)
    exact = chunked_energy_forces_stress(two_layers, batch, graph, n_layers=2, **kw)
    short = chunked_energy_forces_stress(two_layers, batch, graph, n_layers=1, **kw)
    assert float(exact.energy) == pytest.approx(e_whole, abs=1e-9)
    assert abs(float(short.energy) - e_whole) > 1e-6


def test_groups_cover_every_atom_once():
    pos = torch.randn(100, 3, dtype=torch.float64) * torch.tensor([1.0, 5.0, 2.0])
    parts = groups(pos, 30)
    assert len(parts) == 4 and sorted(torch.cat(parts).tolist()) == list(range(100))
    # consecutive along y, the widest axis
    assert all(pos[a, 1].max() <= pos[b, 1].min() for a, b in zip(parts, parts[1:]))
    assert len(groups(pos, 100)) == 1


def test_neighbourhood_is_the_contract():
    """A chain 0-1-2-3-4-5 (edges both ways): from {0} with 2 layers, atoms within 3 hops and the
    edges of those within 2 hops."""
    pairs = [(k, k + 1) for k in range(5)]
    edges = torch.tensor([[a for a, b in pairs] + [b for a, b in pairs],
                          [b for a, b in pairs] + [a for a, b in pairs]])
    nodes, used = neighbourhood(edges, 6, torch.tensor([0]), n_layers=2)
    assert nodes.tolist() == [True, True, True, True, False, False]
    # the edges of atoms 0, 1, 2 and their reverses (the one 3 -> 2): a symmetric list
    assert sorted(map(tuple, edges[:, used].T.tolist())) == [(0, 1), (1, 0), (1, 2), (2, 1),
                                                            (2, 3), (3, 2)]


def test_refusals(two_layers):
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_atoms must be a positive number"):
            ESTCalculator(two_layers, dtype="float64", device="cpu", max_atoms=bad)
    with pytest.raises(ValueError, match="does not combine with a committee"):
        ESTCalculator([two_layers, two_layers], dtype="float64", device="cpu", max_atoms=10)
