"""The last layer is built scalar-only: it computes just the l = 0 row that the energy reads.

Every operation of the update block maps l = 0 to l = 0 (the spherical branch's l = 0 row is
replaced by scalar_out), and the l = 0 row of an SO(2) message depends on the m = 0 rows only, so
``ScalarUpdateBlock`` and ``ScalarSO2MessageBlock`` skip the last layer's spherical attention,
its experts and the m > 0 rows of its messages. Everything here compares with the full layer
(``ESTModel(config, scalar_last_layer=False)``, the same parameters) in float64, for the plain
model and for the accelerated one.
"""

from __future__ import annotations

import pytest
import torch
from ase import Atoms

from est_calc.accel import accelerate
from est_calc.accel.attention import FastSphericalAttention
from est_calc.batch import AtomsBatch
from est_calc.forces import energy_forces_stress
from est_calc.model import ESTModel, ModelConfig
from est_calc.neighbors import build_graph
from est_calc.nn.attention import SphericalAttention
from est_calc.nn.block import ESTUpdateBlock, ScalarUpdateBlock
from est_calc.nn.edges import EdgeFeatures
from est_calc.nn.message_so2 import ScalarSO2MessageBlock, SO2MessageBlock
from est_calc.nn.so3 import DWLinear, EquivariantLayerNorm, Gate
from est_calc.nn.wigner import EdgeRotation
from est_calc.sphere import make_grid

F64 = torch.float64
VARIANTS = ["plain", "accelerated", "accelerated-inference"]


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (no zero-initialised layer, no identity scales), so that every
    term of the block contributes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.4 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _variant(module, variant):
    if variant == "plain":
        return module
    return accelerate(module, inference=variant == "accelerated-inference")


def _features(n: int, l_max: int, c: int, seed: int) -> torch.Tensor:
    return torch.randn(n, (l_max + 1) ** 2, c, generator=torch.Generator().manual_seed(seed),
                       dtype=F64)


def test_so3_layers_map_row_zero_from_row_zero():
    """What ScalarUpdateBlock relies on: the l = 0 row of each layer's output is a function of
    the l = 0 row of its input (LayerNorm's scalar part, x^0 W_0 + b, SiLU)."""
    x = _features(7, 2, 6, 2)
    y = x.clone()
    y[:, 1:] = _features(7, 2, 6, 3)[:, 1:]
    for layer in (DWLinear(2, 6, 5), DWLinear(2, 6, 5, bias=False), EquivariantLayerNorm(2, 6),
                  EquivariantLayerNorm(2, 6, joint=False), Gate(2, 6)):
        layer = layer.to(F64)
        _randomize(layer, 1)
        assert torch.allclose(layer(y)[:, 0], layer(x)[:, 0], rtol=0, atol=1e-13)
    norm = EquivariantLayerNorm(2, 6).to(F64)
    assert torch.equal(norm(x)[:, 0], norm.scalar_norm(x[:, 0]))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n_steerable,n_spherical", [(1, 1), (2, 0), (0, 2), (2, 2)])
def test_update_block_scalar_row_ignores_higher_degrees(n_steerable, n_spherical, variant):
    l_max, c = 2, 8
    grid = make_grid("fibonacci", l_max, n_points=24).to(F64)
    kw = dict(n_heads=2, n_steerable=n_steerable, n_spherical=n_spherical)
    full = ESTUpdateBlock(l_max, c, grid, **kw).to(F64)
    _randomize(full, 3)
    scalar = ScalarUpdateBlock(l_max, c, grid, **kw).to(F64)
    scalar.load_state_dict(full.state_dict())
    full, scalar = _variant(full, variant), _variant(scalar, variant)
    x = _features(9, l_max, c, 4)
    ref = full(x)[:, 0]
    assert torch.allclose(scalar(x[:, 0]), ref, rtol=0, atol=1e-12)
    # The l > 0 rows change the full block's l > 0 output, not its l = 0 row.
    y = x.clone()
    y[:, 1:] = _features(9, l_max, c, 5)[:, 1:]
    assert torch.allclose(full(y)[:, 0], ref, rtol=0, atol=1e-12)
    assert not torch.allclose(full(y)[:, 1:], full(x)[:, 1:])


def test_scalar_update_block_rejects_full_features():
    block = ScalarUpdateBlock(2, 8, make_grid("fibonacci", 2, n_points=24), n_heads=2)
    with pytest.raises(ValueError, match="x0 of shape"):
        block(torch.zeros(3, 9, 8))


def _edges(n_nodes: int, n_edges: int, m_max: int, config: ModelConfig, paired: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    i = torch.randint(0, n_nodes, (n_edges,), generator=gen)
    j = (i + torch.randint(1, n_nodes, (n_edges,), generator=gen)) % n_nodes
    vec = torch.randn(n_edges, 3, generator=gen, dtype=F64) * 1.5
    rbf = torch.rand(n_edges, config.n_rbf, generator=gen, dtype=F64)
    env = torch.rand(n_edges, generator=gen, dtype=F64)
    if paired:  # second half reverses the first, edge for edge; same lengths
        i, j, vec = torch.cat([i, j]), torch.cat([j, i]), torch.cat([vec, -vec])
        rbf, env = torch.cat([rbf, rbf]), torch.cat([env, env])
    vec.requires_grad_(True)
    emb = torch.randn(n_nodes, config.species_channels, generator=gen, dtype=F64)
    rotation = EdgeRotation(config.l_max, m_max).to(F64)
    rot = rotation(vec)
    half = None
    if paired:
        half = rotation(vec[: vec.shape[0] // 2])
        from est_calc.accel.so2_message import pair_signs

        sign = torch.tensor(pair_signs(config.l_max, m_max), dtype=F64)
        rot = torch.cat([half, half * sign[:, None]])
    edges = EdgeFeatures(i, j, vec.norm(dim=-1), torch.zeros(i.shape[0], (config.l_max + 1) ** 2,
                                                                 dtype=F64),
                         rbf, env, torch.cat([rbf, emb[i], emb[j]], dim=-1), rot, half)
    return edges, vec


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("m_max", [1, 2])
def test_so2_message_scalar_block_is_row_zero(paired, m_max, variant):
    """The m = 0 path equals the l = 0 row of the full block with its gradients: plain, and
    accelerated (ModulatedMap on the m = 0 rows with frozen weights, whole-tensor operations
    when trainable), paired and unpaired."""
    config = ModelConfig.preset("small", so2_m_max=m_max, n_heads=2)
    kw = dict(n_heads=2, n_rbf=config.n_rbf, species_channels=config.species_channels,
              radial_hidden=config.radial_hidden)
    full = SO2MessageBlock(config.l_max, m_max, config.channels, **kw).to(F64)
    _randomize(full, 6)
    scalar = ScalarSO2MessageBlock(config.l_max, m_max, config.channels, **kw).to(F64)
    scalar.load_state_dict(full.state_dict())
    inference = variant == "accelerated-inference"
    for p in list(full.parameters()) + list(scalar.parameters()):
        p.requires_grad_(not inference)
    full, scalar = _variant(full, variant), _variant(scalar, variant)
    n_nodes, c = 6, config.channels
    edges, vec = _edges(n_nodes, 20, m_max, config, paired, 7)
    if variant == "plain":
        edges = edges._replace(pair_rotation=None)
    x = _features(n_nodes, config.l_max, c, 8).requires_grad_(True)
    ref, got = full(x, edges)[:, 0], scalar(x, edges)
    assert got.shape == (n_nodes, c)
    assert torch.allclose(got, ref, rtol=0, atol=1e-12)
    weight = torch.randn(n_nodes, c, generator=torch.Generator().manual_seed(9), dtype=F64)
    g_ref = torch.autograd.grad((ref * weight).sum(), (x, vec), retain_graph=True)
    g_got = torch.autograd.grad((got * weight).sum(), (x, vec), retain_graph=True)
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


def _models(overrides, seed=0):
    """The scalar-last-layer model and the full one with the same parameters."""
    torch.manual_seed(seed)
    config = ModelConfig.preset("small", **overrides)
    scalar = ESTModel(config).to(F64).eval()
    _randomize(scalar, seed + 10)
    with torch.no_grad():  # keep the buffers of a trained model's scale
        scalar.energy_scale.fill_(1.0)
        scalar.energy_shift.fill_(0.0)
        scalar.element_reference.zero_()
    full = ESTModel(config, scalar_last_layer=False).to(F64).eval()
    full.load_state_dict(scalar.state_dict())
    assert isinstance(scalar.updates[-1], ScalarUpdateBlock)
    assert not isinstance(full.updates[-1], ScalarUpdateBlock)
    return scalar, full


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_model_energy_forces_stress_unchanged(name, variant, torch_device, structures):
    scalar, full = (_variant(m.to(torch_device), variant) for m in _models(CONFIGS[name]))
    batch = AtomsBatch.from_atoms(structures, dtype=F64, device=torch_device)
    for paired in (False, True):
        # the torch cell list gives paired lists at any size (other backends only from 2,048 edges)
        graph = build_graph(batch, scalar.config.cutoff_A, paired=paired, backend="torch")
        assert graph.paired == paired
        ref = energy_forces_stress(full, batch, graph, compute_stress=True)
        got = energy_forces_stress(scalar, batch, graph, compute_stress=True)
        assert float(ref.forces.abs().max()) > 1e-3  # the comparison has something to compare
        assert torch.allclose(got.energy, ref.energy, rtol=0, atol=1e-11)
        assert torch.allclose(got.energies, ref.energies, rtol=0, atol=1e-11)
        assert torch.allclose(got.forces, ref.forces, rtol=0, atol=1e-11)
        assert torch.allclose(got.stress, ref.stress, rtol=0, atol=1e-11)
        # the atom without neighbours keeps its reference energy exactly, and no force
        assert got.energies[-2] == ref.energies[-2] and got.energies[-1] == ref.energies[-1]
        assert torch.equal(got.forces[-2:], torch.zeros_like(got.forces[-2:]))


def test_edgeless_batch_and_checkpointed_layers(structures):
    scalar, full = _models({})
    batch = AtomsBatch.from_atoms(structures[-1], dtype=F64)
    graph = build_graph(batch, scalar.config.cutoff_A)
    assert torch.equal(energy_forces_stress(scalar, batch, graph).energy,
                       energy_forces_stress(full, batch, graph).energy)
    batch = AtomsBatch.from_atoms(structures[:2], dtype=F64)
    graph = build_graph(batch, scalar.config.cutoff_A)
    ref = energy_forces_stress(full, batch, graph, compute_stress=True)
    with scalar.checkpoint_layers():
        got = energy_forces_stress(scalar, batch, graph, compute_stress=True)
    assert torch.allclose(got.forces, ref.forces, rtol=0, atol=1e-11)
    assert torch.allclose(got.stress, ref.stress, rtol=0, atol=1e-11)


@pytest.mark.parametrize("variant", VARIANTS)
def test_last_layer_runs_no_spherical_attention(monkeypatch, structures, variant):
    scalar, full = (_variant(m, variant) for m in _models({"n_layers": 2}))
    batch = AtomsBatch.from_atoms(structures[:2], dtype=F64)
    graph = build_graph(batch, scalar.config.cutoff_A)
    calls = []
    for cls in (SphericalAttention, FastSphericalAttention):
        original = cls.forward
        monkeypatch.setattr(cls, "forward", lambda self, *a, _f=original, **k:
                            calls.append(self) or _f(self, *a, **k))
    energy_forces_stress(scalar, batch, graph)
    assert calls == [scalar.updates[0].experts.attention]
    calls.clear()
    energy_forces_stress(full, batch, graph)
    assert len(calls) == 2


@pytest.mark.parametrize("variant", ["plain", "accelerated"])
def test_training_gradients_unchanged_and_skipped_parts_had_none(structures, variant):
    """Force-loss gradients (double backward) of every parameter agree; the parameters the
    scalar-only last layer leaves out get exactly zero gradient from the full computation,
    which is the proof that they never reached the energy."""
    scalar, full = (_variant(m.train(), variant) for m in _models({}, seed=3))
    batch = AtomsBatch.from_atoms(structures[:2], dtype=F64)
    graph = build_graph(batch, scalar.config.cutoff_A, paired=True, backend="torch")
    assert graph.paired
    grads = {}
    for key, model in (("full", full), ("scalar", scalar)):
        params = dict(model.named_parameters())
        with model.fixed_grid():
            pred = energy_forces_stress(model, batch, graph, create_graph=True)
        loss = pred.energy.sum() + (pred.forces ** 2).sum()
        grads[key] = dict(zip(params, torch.autograd.grad(loss, list(params.values()),
                                                          allow_unused=True)))
    skipped = [n for n, g in grads["scalar"].items() if g is None]
    assert any("updates.1.experts.attention" in n for n in skipped)
    assert any("updates.1.experts.spherical" in n for n in skipped)
    assert not any(n.startswith("updates.0") for n in skipped)
    for name, g_full in grads["full"].items():
        g_scalar = grads["scalar"][name]
        if g_scalar is None:
            assert g_full is None or not g_full.any(), name
        else:
            tol = 1e-10 * max(1.0, float(g_full.abs().max()))
            assert torch.allclose(g_scalar, g_full, rtol=0, atol=tol), name
