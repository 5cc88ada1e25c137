"""The last layer computes only the l = 0 row that the energy reads (ESTModel._features).

Every operation of the update block maps l = 0 to l = 0 (the spherical branch's l = 0 row is
replaced by scalar_out), and the l = 0 row of an SO(2) message depends on the m = 0 rows only, so
``forward_scalars`` / ``scalars_only`` skip the last layer's spherical attention, its experts
and the m > 0 rows of its messages. Everything here compares with the full computation
(``ESTModel._scalar_readout = False``) in float64.
"""

from __future__ import annotations

import pytest
import torch
from ase import Atoms

from est_calc.batch import AtomsBatch
from est_calc.forces import energy_forces_stress
from est_calc.model import ModelConfig
from est_calc.neighbors import build_graph
from est_calc.nn.attention import SphericalAttention
from est_calc.nn.block import ESTUpdateBlock
from est_calc.nn.experts import MixtureOfHybridExperts
from est_calc.nn.message_so2 import SO2MessageBlock
from est_calc.nn.so3 import DWLinear, EquivariantLayerNorm, Gate
from est_calc.potential import Potential
from est_calc.sphere import make_grid

F64 = torch.float64


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (no zero-initialised layer, no identity scales), so that every
    term of the block contributes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.4 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _features(n: int, l_max: int, c: int, seed: int) -> torch.Tensor:
    return torch.randn(n, (l_max + 1) ** 2, c, generator=torch.Generator().manual_seed(seed),
                       dtype=F64)


@pytest.mark.parametrize("layer", [
    DWLinear(2, 6, 5), DWLinear(2, 6, 5, bias=False), DWLinear(0, 4, 3),
    EquivariantLayerNorm(2, 6), EquivariantLayerNorm(0, 6), Gate(2, 6), Gate(0, 6)])
def test_so3_layers_scalar_row(layer):
    layer = layer.to(F64)
    _randomize(layer, 1)
    x = _features(7, layer.l_max, 6 if not isinstance(layer, DWLinear) else layer.in_channels, 2)
    got = layer.forward_scalars(x[:, 0])
    assert torch.allclose(got, layer(x)[:, 0], rtol=0, atol=1e-13)


@pytest.mark.parametrize("n_steerable,n_spherical", [(1, 1), (2, 0), (0, 2), (2, 2)])
def test_update_block_scalar_row_ignores_higher_degrees(n_steerable, n_spherical):
    l_max, c = 2, 8
    grid = make_grid("fibonacci", l_max, n_points=24).to(F64)
    block = ESTUpdateBlock(l_max, c, grid, n_heads=2, n_steerable=n_steerable,
                           n_spherical=n_spherical).to(F64)
    _randomize(block, 3)
    x = _features(9, l_max, c, 4)
    ref = block(x)[:, 0]
    got = block.forward_scalars(x[:, 0])
    assert torch.allclose(got, ref, rtol=0, atol=1e-12)
    # The l > 0 rows change the full block's l > 0 output, not its l = 0 row.
    y = x.clone()
    y[:, 1:] = _features(9, l_max, c, 5)[:, 1:]
    assert torch.allclose(block(y)[:, 0], ref, rtol=0, atol=1e-12)
    assert not torch.allclose(block(y)[:, 1:], block(x)[:, 1:])


def test_experts_scalar_row_rejects_full_features():
    grid = make_grid("fibonacci", 2, n_points=24)
    experts = MixtureOfHybridExperts(2, 8, grid, n_heads=2)
    with pytest.raises(ValueError, match="x0 of shape"):
        experts.forward_scalars(torch.zeros(3, 9, 8))


def _edges(n_nodes: int, n_edges: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    i = torch.randint(0, n_nodes, (n_edges,), generator=gen)
    j = (i + torch.randint(1, n_nodes, (n_edges,), generator=gen)) % n_nodes
    vec = torch.randn(n_edges, 3, generator=gen, dtype=F64) * 1.5
    return i, j, vec


@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("m_max", [1, 2])
def test_so2_message_scalars_only_is_row_zero(paired, frozen, m_max):
    """The m = 0 path (ModulatedMap on the m = 0 rows when frozen, plain operations when
    trainable) equals the l = 0 row of the full block, paired and unpaired, with its gradients."""
    config = ModelConfig.preset("small", so2_m_max=m_max, n_heads=2)
    block = SO2MessageBlock(config).to(F64)
    _randomize(block, 6)
    for p in block.parameters():
        p.requires_grad_(not frozen)
    n_nodes, c = 6, config.channels
    i, j, vec = _edges(n_nodes, 20, 7)
    if paired:  # second half reverses the first, edge for edge
        i, j, vec = torch.cat([i, j]), torch.cat([j, i]), torch.cat([vec, -vec])
    vec.requires_grad_(True)
    x = _features(n_nodes, config.l_max, c, 8).requires_grad_(True)
    k = x.shape[1]
    gen = torch.Generator().manual_seed(9)
    rbf = torch.rand(i.shape[0], config.n_rbf, generator=gen, dtype=F64)
    env = torch.rand(i.shape[0], generator=gen, dtype=F64)
    if paired:  # both directions of a pair have the same length
        half = i.shape[0] // 2
        rbf, env = torch.cat([rbf[:half], rbf[:half]]), torch.cat([env[:half], env[:half]])
    emb = torch.randn(n_nodes, config.species_channels, generator=gen, dtype=F64)

    def run(scalars_only):
        kw = {}
        if paired:
            kw["pair_rot"] = block.edge_rotation(vec[: vec.shape[0] // 2])
            kw["edge_rot"] = block.pair_rotation(kw["pair_rot"])
        else:
            kw["edge_rot"] = block.edge_rotation(vec)
        out = block(x, torch.stack([i, j]), torch.zeros(i.shape[0], k, dtype=F64), rbf, env, emb,
                    scalars_only=scalars_only, **kw)
        return out if scalars_only else out[:, 0]

    ref, got = run(False), run(True)
    assert got.shape == (n_nodes, c)
    assert torch.allclose(got, ref, rtol=0, atol=1e-12)
    weight = torch.randn(n_nodes, c, generator=gen, dtype=F64)
    g_ref = torch.autograd.grad((ref * weight).sum(), (x, vec))
    g_got = torch.autograd.grad((got * weight).sum(), (x, vec))
    for a, b in zip(g_ref, g_got):
        assert torch.allclose(a, b, rtol=0, atol=1e-11)


@pytest.fixture
def structures(cu_slab_co, triclinic_bulk):
    """A slab with adsorbates, a triclinic bulk cell and two atoms without neighbours."""
    lone = Atoms("HCu", positions=[[0, 0, 0], [9, 0, 0]], cell=[20, 20, 20])
    return [cu_slab_co, triclinic_bulk, lone]


CONFIGS = {
    "small": {},
    "small-1-layer": {"n_layers": 1},
    "small-3-layers-m2": {"n_layers": 3, "so2_m_max": 2},
    "steerable-only": {"n_spherical": 0},
    "spherical-only": {"n_steerable": 0},
    "est-message": {"message": "est", "message_n_points": 12, "n_points": 24},
}


def _potential(overrides, seed=0):
    torch.manual_seed(seed)
    config = ModelConfig.preset("small", **overrides)
    pot = Potential.from_config(config, species=[1, 6, 8, 29]).to(F64).eval()
    _randomize(pot.model, seed + 10)
    with torch.no_grad():  # keep the buffers of a trained model's scale
        pot.model.energy_scale.fill_(1.0)
        pot.model.energy_shift.fill_(0.0)
        pot.model.element_reference.zero_()
    return pot


def _both(pot, batch, graph, **kw):
    out = {}
    for flag in (False, True):
        pot.model._scalar_readout = flag
        try:
            out[flag] = energy_forces_stress(pot, batch, graph, **kw)
        finally:
            pot.model._scalar_readout = True
    return out[False], out[True]


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("frozen", [True, False])
def test_model_energy_forces_stress_unchanged(name, frozen, torch_device, structures):
    pot = _potential(CONFIGS[name]).to(torch_device)
    for p in pot.parameters():
        p.requires_grad_(not frozen)
    batch = AtomsBatch.from_atoms(structures, dtype=F64, device=torch_device)
    for paired in (False, True):
        # the torch cell list gives paired lists at any size (other backends only from 2,048 edges)
        graph = build_graph(batch, pot.cutoff_A, paired=paired, backend="torch")
        assert graph.paired == paired
        ref, got = _both(pot, batch, graph, compute_stress=True)
        assert float(ref.forces.abs().max()) > 1e-3  # the comparison has something to compare
        assert torch.allclose(got.energy, ref.energy, rtol=0, atol=1e-11)
        assert torch.allclose(got.energies, ref.energies, rtol=0, atol=1e-11)
        assert torch.allclose(got.forces, ref.forces, rtol=0, atol=1e-11)
        assert torch.allclose(got.stress, ref.stress, rtol=0, atol=1e-11)
        # the atom without neighbours keeps its reference energy exactly, and no force
        assert got.energies[-2] == ref.energies[-2] and got.energies[-1] == ref.energies[-1]
        assert torch.equal(got.forces[-2:], torch.zeros_like(got.forces[-2:]))


def test_edgeless_batch_and_checkpointed_layers(structures):
    pot = _potential({})
    lone = structures[-1]
    batch = AtomsBatch.from_atoms(lone, dtype=F64)
    ref, got = _both(pot, batch, build_graph(batch, pot.cutoff_A))
    assert torch.equal(got.energy, ref.energy)
    batch = AtomsBatch.from_atoms(structures[:2], dtype=F64)
    graph = build_graph(batch, pot.cutoff_A)
    with pot.model.checkpoint_layers():
        ref, got = _both(pot, batch, graph, compute_stress=True)
    assert torch.allclose(got.forces, ref.forces, rtol=0, atol=1e-11)
    assert torch.allclose(got.stress, ref.stress, rtol=0, atol=1e-11)


def test_last_layer_runs_no_spherical_attention(monkeypatch, structures):
    pot = _potential({"n_layers": 2})
    batch = AtomsBatch.from_atoms(structures[:2], dtype=F64)
    graph = build_graph(batch, pot.cutoff_A)
    calls = []
    original = SphericalAttention.forward
    monkeypatch.setattr(SphericalAttention, "forward",
                        lambda self, *a, **k: calls.append(self) or original(self, *a, **k))
    energy_forces_stress(pot, batch, graph)
    assert calls == [pot.model.updates[0].experts.attention]
    calls.clear()
    pot.model._scalar_readout = False
    try:
        energy_forces_stress(pot, batch, graph)
    finally:
        pot.model._scalar_readout = True
    assert len(calls) == 2


def test_training_gradients_unchanged_and_skipped_parts_had_none(structures):
    """Force-loss gradients (double backward) of every parameter agree; the parameters the
    scalar readout leaves out get exactly zero gradient from the full computation, which is
    the proof that they never reached the energy."""
    pot = _potential({}, seed=3)
    pot.train()
    batch = AtomsBatch.from_atoms(structures[:2], dtype=F64)
    graph = build_graph(batch, pot.cutoff_A, paired=True, backend="torch")
    assert graph.paired
    params = dict(pot.named_parameters())
    grads = {}
    for flag in (False, True):
        pot.model._scalar_readout = flag
        try:
            with pot.model.fixed_grid():
                pred = energy_forces_stress(pot, batch, graph, create_graph=True)
            loss = pred.energy.sum() + (pred.forces ** 2).sum()
            grads[flag] = dict(zip(params, torch.autograd.grad(loss, list(params.values()),
                                                               allow_unused=True)))
        finally:
            pot.model._scalar_readout = True
    skipped = [n for n, g in grads[True].items() if g is None]
    assert any("updates.1.experts.attention" in n for n in skipped)
    assert any("updates.1.experts.spherical" in n for n in skipped)
    assert not any(n.startswith("model.updates.0") for n in skipped)
    for name, g_full in grads[False].items():
        g_scalar = grads[True][name]
        if g_scalar is None:
            assert g_full is None or not g_full.any(), name
        else:
            assert torch.allclose(g_scalar, g_full, rtol=0, atol=1e-10 * max(1.0, float(g_full.abs().max()))), name
