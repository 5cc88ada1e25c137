"""Reversed-pair edge order (est_calc.neighbors.pairing) and the SO(2) block's use of it.

A paired list holds the reverse of edge p at P + p. The accelerated model then rotates only the
first half: the reversed edge's frame is diag(-1, -1, 1) times the forward one (bitwise), so its
Wigner rows are the forward rows times fixed signs. Everything here compares against the
unpaired path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc111, molecule

from est_calc.accel import accelerate
from est_calc.accel.model import FastESTModel
from est_calc.accel.so2_message import _pair_expand, pair_signs
from est_calc.batch import AtomsBatch
from est_calc.forces import energy_forces_stress
from est_calc.model import ModelConfig
from est_calc.neighbors import Graph, build_graph
from est_calc.neighbors.pairing import is_paired, one_direction, pair_edges
from est_calc.neighbors.verlet import VerletNeighborList
from est_calc.nn.wigner import WignerD, edge_frame, so2_index
from est_calc.potential import Potential

F64 = torch.float64


def _structures():
    slab = fcc111("Cu", (2, 2, 2), vacuum=5.0)
    add_adsorbate(slab, Atoms("CO", positions=[(0, 0, 0), (0, 0, 1.15)]), 1.9, "ontop")  # C down
    slab.pbc = (True, True, False)
    slab.rattle(0.05, seed=1)
    tri = bulk("Cu", "fcc", a=3.6).repeat((2, 1, 1))
    tri.set_cell(tri.cell.array + [[0, 0, 0], [0.3, 0, 0], [0.2, -0.4, 0]], scale_atoms=True)
    tri.rattle(0.05, seed=2)
    prim = bulk("Cu", "fcc", a=3.6)  # one atom: every edge is a periodic self-image
    mol = molecule("CH3OH")
    mol.center(vacuum=4.0)
    return [slab, tri, prim, mol]


def _pairs(g):
    return sorted(map(tuple, torch.cat([g.edge_index.t(), g.shifts], 1).tolist()))


def test_pair_edges_reorders_into_reversed_halves_with_the_same_pairs():
    batch = AtomsBatch.from_atoms(_structures(), dtype=F64)
    plain = build_graph(batch, 4.2)
    paired = build_graph(batch, 4.2, paired=True)
    assert paired.paired and not plain.paired
    assert _pairs(paired) == _pairs(plain)
    half = paired.n_edges // 2
    assert torch.equal(paired.edge_index[:, half:], paired.edge_index[[1, 0], :half])
    assert torch.equal(paired.shifts[half:], -paired.shifts[:half])
    assert is_paired(paired.edge_index, paired.shifts)
    perm = torch.randperm(plain.n_edges, generator=torch.Generator().manual_seed(1))
    shuffled_ei, shuffled_s = plain.edge_index[:, perm], plain.shifts[perm]
    assert not is_paired(shuffled_ei, shuffled_s)
    ordered = pair_edges(shuffled_ei, shuffled_s, batch.n_atoms)
    assert is_paired(*ordered)
    assert _pairs(Graph(*ordered)) == _pairs(plain)


def test_pair_edges_declines_lists_that_are_not_symmetric():
    ei = torch.tensor([[0, 1, 1], [1, 0, 2]])
    assert pair_edges(ei, torch.zeros(3, 3, dtype=torch.long), 3) is None          # odd
    ei = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 0]])
    assert pair_edges(ei, torch.zeros(4, 3, dtype=torch.long), 3) is None          # 1->2 unmatched
    shifts = torch.tensor([[0, 0, 1], [0, 0, 1], [0, 0, 0], [0, 0, 0]])
    ei = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])
    assert pair_edges(ei, shifts, 3) is None                                        # same, not -S
    empty = torch.zeros(2, 0, dtype=torch.long)
    out = pair_edges(empty, torch.zeros(0, 3, dtype=torch.long), 0)
    assert out is not None and out[0].shape == (2, 0)


def test_one_direction_gives_each_pair_once():
    """What a package is given (format 2): every pair of the full list exactly once, from a
    paired list (its first half) and from an unpaired one (i < j, or a self-image with S > 0),
    periodic self-images of a one-atom cell included."""
    batch = AtomsBatch.from_atoms(_structures(), dtype=F64)
    plain = build_graph(batch, 4.2)
    paired = build_graph(batch, 4.2, paired=True)
    half_plain = one_direction(plain.edge_index, plain.shifts)
    half_paired = one_direction(paired.edge_index, paired.shifts, paired=True)
    for edge_index, shifts in (half_plain, half_paired):
        assert 2 * edge_index.shape[1] == plain.n_edges
        both = Graph(torch.cat([edge_index, edge_index.flip(0)], 1), torch.cat([shifts, -shifts]))
        assert _pairs(both) == _pairs(plain)  # each pair once: mirrored, the full list
    i, j = half_plain[0]
    assert bool(((i < j) | (i == j)).all()) and bool((i == j).any())  # the one-atom cell


def test_one_direction_refuses_a_list_that_is_not_symmetric():
    ei = torch.tensor([[0, 1, 1], [1, 0, 2]])
    with pytest.raises(ValueError, match="not symmetric"):
        one_direction(ei, torch.zeros(3, 3, dtype=torch.long))


def test_verlet_filter_keeps_a_paired_list_paired():
    atoms = bulk("Cu", "fcc", a=3.6).repeat((2, 2, 2))
    rng = np.random.default_rng(0)
    nl = VerletNeighborList(3.0, skin_A=0.8, backend="torch", paired=True)
    for _ in range(15):
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        batch = AtomsBatch.from_atoms(atoms, dtype=torch.float32)
        got = nl(batch)
        assert got.paired and is_paired(got.edge_index, got.shifts)
        assert _pairs(got) == _pairs(build_graph(batch, 3.0))
    assert nl.n_builds < nl.n_calls


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_reversed_edge_frame_is_a_fixed_sign_flip_of_the_forward_frame(dtype):
    vec = torch.randn(500, 3, dtype=dtype) * 3.0
    vec[0] = torch.tensor([1.0, 1.0, 1.0])          # helper-axis tie
    vec[1] = torch.tensor([0.0, 2.0, 0.0])          # along the edge axis
    vec[2] = torch.tensor([1e-3, -2.0, 1e-3])
    flip = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=dtype))
    assert torch.equal(edge_frame(-vec), flip @ edge_frame(vec))


@pytest.mark.parametrize("l_max,m_max", [(1, 1), (2, 1), (2, 2), (3, 2)])
def test_reversed_edge_wigner_rows_are_signed_forward_rows(l_max, m_max):
    wigner = WignerD(l_max, rows=so2_index(l_max, m_max)).to(F64)
    sign = torch.tensor(pair_signs(l_max, m_max), dtype=F64)
    assert set(sign.tolist()) == {-1.0, 1.0}
    vec = torch.randn(200, 3, dtype=F64)
    d_fwd, d_rev = wigner(edge_frame(vec)), wigner(edge_frame(-vec))
    assert (d_rev - sign[:, None] * d_fwd).abs().max() < 1e-12


def test_pair_expand_values_gradients_and_double_backward(torch_device):
    kw = {"dtype": F64, "device": torch_device}
    pair = torch.randn(5, 3, 8, **kw).requires_grad_(True)
    sign = torch.tensor([1.0, -1.0, 1.0], **kw)

    def plain(p):
        swapped = torch.cat([p[..., 4:], p[..., :4]], dim=-1) * sign[:, None]
        return torch.cat([p, swapped], dim=0)

    assert torch.equal(_pair_expand(pair, sign), plain(pair))
    weight = torch.randn(10, 3, 8, **kw)
    (g_got,) = torch.autograd.grad((_pair_expand(pair, sign) * weight).sum(), pair)
    (g_ref,) = torch.autograd.grad((plain(pair) * weight).sum(), pair)
    assert torch.equal(g_got, g_ref)
    assert torch.autograd.gradcheck(lambda p: _pair_expand(p, sign), (pair,))
    assert torch.autograd.gradgradcheck(lambda p: _pair_expand(p, sign) ** 2, (pair,))


def _so2_potential(seed=0):
    torch.manual_seed(seed)
    return Potential.from_config(ModelConfig.preset("small"), species=[1, 6, 8, 29]).to(F64).eval()


@pytest.mark.parametrize("frozen", [True, False])
def test_paired_graph_gives_the_unpaired_energy_forces_and_stress(frozen, torch_device):
    """Same structures, the same edges in the two orders: energies, forces and stress agree to
    float64 round-off, with frozen weights (the calculator's path) and trainable ones."""
    pot = _so2_potential().to(torch_device)
    for p in pot.parameters():
        p.requires_grad_(not frozen)
    structures = [a for a in _structures() if a.pbc.all()]
    batch = AtomsBatch.from_atoms(structures, dtype=F64, device=torch_device)
    plain = build_graph(batch, pot.cutoff_A)
    perm = torch.randperm(plain.n_edges, generator=torch.Generator().manual_seed(0))
    perm = perm.to(torch_device)
    shuffled = Graph(plain.edge_index[:, perm], plain.shifts[perm])
    paired = build_graph(batch, pot.cutoff_A, paired=True)
    fast = accelerate(pot, inference=frozen)
    calls = []
    original = FastESTModel.edge_features

    def spy(self, emb, graph, vectors):
        edges = original(self, emb, graph, vectors)
        calls.append(None if edges.pair_rotation is None else edges.pair_rotation.shape[0])
        return edges

    FastESTModel.edge_features = spy
    try:
        ref = energy_forces_stress(fast, batch, shuffled, compute_stress=True)
        got = energy_forces_stress(fast, batch, paired, compute_stress=True)
        # a graph marked paired whose order is not is checked and used unpaired
        wrong = Graph(shuffled.edge_index, shuffled.shifts, paired=True)
        again = energy_forces_stress(fast, batch, wrong, compute_stress=True)
    finally:
        FastESTModel.edge_features = original
    assert calls == [None, paired.n_edges // 2, None]  # the paired path ran for the paired list
    assert (again.forces - ref.forces).abs().max() < 1e-12
    scale = float(ref.forces.abs().max())
    assert (got.energy - ref.energy).abs().max() < 1e-12
    assert (got.forces - ref.forces).abs().max() < 1e-12 * max(scale, 1.0)
    assert (got.stress - ref.stress).abs().max() < 1e-9


def test_paired_graph_training_gradients_match():
    """Force-loss training differentiates the forces again: parameter gradients agree."""
    pot = _so2_potential(seed=1)
    atoms = _structures()[1]
    batch = AtomsBatch.from_atoms(atoms, dtype=F64)
    grads = []
    paired = build_graph(batch, pot.cutoff_A, backend="torch", paired=True)
    assert paired.paired
    fast = accelerate(pot)
    for graph in (build_graph(batch, pot.cutoff_A, backend="matscipy"), paired):
        pred = energy_forces_stress(fast, batch, graph, create_graph=True)
        loss = pred.energy.sum() + (pred.forces**2).sum()
        grads.append(torch.autograd.grad(loss, list(pot.parameters()), allow_unused=True))
    for a, b in zip(*grads):
        if a is not None:
            assert (a - b).abs().max() < 1e-10 * max(1.0, float(a.abs().max()))


def test_small_lists_are_sorted_into_pairs_only_above_the_threshold(monkeypatch):
    from est_calc import neighbors

    batch = AtomsBatch.from_atoms(_structures()[1], dtype=F64)
    plain = build_graph(batch, 4.2, backend="matscipy")
    assert not is_paired(plain.edge_index, plain.shifts)
    assert plain.n_edges < neighbors.PAIR_MIN_EDGES
    assert not build_graph(batch, 4.2, backend="matscipy", paired=True).paired
    monkeypatch.setattr(neighbors, "PAIR_MIN_EDGES", 0)
    assert build_graph(batch, 4.2, backend="matscipy", paired=True).paired


def test_calculator_builds_paired_graphs(monkeypatch):
    from est_calc import neighbors
    from est_calc.calculator import ESTCalculator

    monkeypatch.setattr(neighbors, "PAIR_MIN_EDGES", 0)
    seen = []
    from est_calc import calculator

    original = calculator.build_graph

    def spy(*args, **kwargs):
        graph = original(*args, **kwargs)
        seen.append(graph.paired)
        return graph

    monkeypatch.setattr(calculator, "build_graph", spy)
    calc = ESTCalculator(_so2_potential(), dtype="float64")
    atoms = _structures()[0]
    atoms.calc = calc
    atoms.get_forces()
    calc.calculate_batch([atoms, Atoms("CO", positions=[[0, 0, 0], [0, 0, 1.15]])])
    assert seen == [True, True]
