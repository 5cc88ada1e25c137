"""accelerate(model) is the plain model's function, faster: every acceleration against the plain
reference in float64 (values, forces, stress, and gradients of force losses for training).

The parts each speed-up is built from have their own tests beside this one (test_fast_paths,
test_modulated_map, test_gather, test_pairing); here every swapped block, and whole models of
every kind, are compared with the plain modules they replace.
"""

from __future__ import annotations

import pytest
import torch
from ase import Atoms

from est_calc.accel import SWAPS, accelerate, is_accelerated
from est_calc.batch import AtomsBatch
from est_calc.forces import energy_forces_stress
from est_calc.model import ModelConfig
from est_calc.neighbors import build_graph
from est_calc.nn.attention import SphericalAttention
from est_calc.nn.experts import MixtureOfHybridExperts
from est_calc.nn.message import ESTMessageBlock
from est_calc.nn.message_so2 import SO2Linear
from est_calc.nn.so3 import DWLinear, EquivariantLayerNorm
from est_calc.potential import Potential
from est_calc.sphere import make_grid

F64 = torch.float64

CONFIGS = {
    "small": ("small", {}),
    "small-m2": ("small", {"so2_m_max": 2}),
    "small-neighbour-sum": ("small", {"so2_neighbour_sum": True}),
    "small-layer-readouts": ("small", {"layer_readouts": True}),
    "small-separate-norm-no-zbl": ("small", {"vector_norm": "separate", "zbl": False}),
    "steerable-only": ("small", {"n_spherical": 0}),
    "spherical-only-lebedev": ("small", {"n_steerable": 0, "grid": "lebedev", "n_points": None}),
    "tiny-est": ("tiny", {}),
    "tiny-est-lat-long": ("tiny", {"grid": "lat_long", "message_n_points": None, "n_heads": 1,
                                   "l_roe": 2}),
    "tiny-so2-m0": ("tiny", {"message": "so2", "so2_m_max": 0}),
}


def _randomize(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _potential(name: str, seed: int = 0) -> Potential:
    preset, overrides = CONFIGS[name]
    torch.manual_seed(seed)
    pot = Potential.from_config(ModelConfig.preset(preset, **overrides), species=[1, 6, 8, 29])
    pot = pot.to(F64).eval()
    _randomize(pot.model, seed + 10)
    with torch.no_grad():
        pot.model.energy_scale.fill_(1.0)
        pot.model.energy_shift.fill_(0.1)
        pot.model.element_reference.zero_()
    return pot


@pytest.fixture
def structures(cu_slab_co, triclinic_bulk):
    lone = Atoms("HCu", positions=[[0, 0, 0], [9, 0, 0]], cell=[20, 20, 20])
    return [cu_slab_co, triclinic_bulk, lone]


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-11) -> bool:
    a, b = a.detach(), b.detach()
    return bool((a - b).abs().max() <= rel * max(1.0, float(b.abs().max())))


# ----------------------------------------------------------------------------- the view


@pytest.mark.parametrize("name", ["small", "tiny-est"])
def test_accelerate_swaps_blocks_and_shares_every_parameter_and_buffer(name):
    plain = _potential(name)
    fast = accelerate(plain, inference=True)
    assert is_accelerated(fast) and not is_accelerated(plain)
    plain_modules = dict(plain.named_modules())
    fast_modules = dict(fast.named_modules())
    assert list(plain_modules) == list(fast_modules)  # the same module tree
    swapped = 0
    for key, module in plain_modules.items():
        want = SWAPS.get(type(module), type(module))
        assert type(fast_modules[key]) is want, key
        swapped += want is not type(module)
    assert swapped > 10
    # Same parameter names, order and objects: checkpoints and optimizer states fit both.
    plain_params, fast_params = list(plain.named_parameters()), list(fast.named_parameters())
    assert [n for n, _ in plain_params] == [n for n, _ in fast_params]
    assert all(a is b for (_, a), (_, b) in zip(plain_params, fast_params))
    plain_state, fast_state = plain.state_dict(), fast.state_dict()
    assert list(plain_state) == list(fast_state)
    assert all(plain_state[k].data_ptr() == fast_state[k].data_ptr() for k in plain_state)
    # An in-place change of a weight or a buffer reaches both; a dtype cast of either too.
    with torch.no_grad():
        plain.model.energy_shift.fill_(0.25)
    assert float(fast.model.energy_shift) == 0.25
    fast.float()
    assert plain.dtype == torch.float32 and plain.model.grid.to_grid_matrix.dtype == torch.float32
    # Accelerating again (new options) starts from the same parameters.
    again = accelerate(fast)
    assert all(a is b for a, b in zip(again.parameters(), plain.parameters()))
    assert not again.model.inference and fast.model.inference


def test_accelerate_refuses_unknown_attention_dtypes():
    with pytest.raises(ValueError, match="attention_dtype"):
        accelerate(_potential("tiny-est"), attention_dtype=torch.int8)


# ----------------------------------------------------------------------------- whole models


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("inference", [False, True])
def test_accelerated_model_equals_plain(name, inference, structures, torch_device):
    plain = _potential(name).to(torch_device)
    fast = accelerate(plain, inference=inference)
    batch = AtomsBatch.from_atoms(structures, dtype=F64, device=torch_device)
    for paired in (False, True):
        graph = build_graph(batch, plain.cutoff_A, paired=paired, backend="torch")
        assert graph.paired == paired
        ref = energy_forces_stress(plain, batch, graph, compute_stress=True)
        got = energy_forces_stress(fast, batch, graph, compute_stress=True)
        assert float(ref.forces.abs().max()) > 1e-3
        for a, b in zip(got, ref):
            assert _close(a, b), (name, paired)
    assert all(p.requires_grad for p in plain.parameters())  # frozen only during the call


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_accelerated_training_gradients_equal_plain(name, structures):
    """Energy, force and stress loss with create_graph (double backward): every parameter's
    gradient agrees, paired and unpaired; the random lattice rotation is off (the trainer
    rotates the data instead)."""
    plain = _potential(name, seed=1).train()
    fast = accelerate(plain)
    batch = AtomsBatch.from_atoms(structures[:2], dtype=F64)
    names = [n for n, _ in plain.named_parameters()]
    for paired in (False, True):
        graph = build_graph(batch, plain.cutoff_A, paired=paired, backend="torch")
        grads = []
        for model in (plain, fast):
            with model.model.fixed_grid():
                pred = energy_forces_stress(model, batch, graph, compute_stress=True,
                                            create_graph=True)
            loss = pred.energy.sum() + (pred.forces ** 2).sum() + (pred.stress ** 2).sum()
            grads.append(torch.autograd.grad(loss, list(model.parameters()), allow_unused=True))
        for n, a, b in zip(names, *grads):
            if a is None or b is None:  # not reached in one form: a zero gradient in the other
                assert (a is None or not a.any()) and (b is None or not b.any()), n
            else:
                assert _close(b, a, 1e-10), (n, paired)


def test_inference_hessian_of_a_frozen_potential_equals_plain(structures):
    """Second derivatives with respect to positions (a Hessian-vector product) through the
    frozen-weight paths (ModulatedMap, whole-tensor SO(2) maps, the attention core) on the CPU."""
    plain = _potential("small", seed=2)
    fast = accelerate(plain, inference=True)
    batch = AtomsBatch.from_atoms(structures[1], dtype=F64)
    graph = build_graph(batch, plain.cutoff_A, paired=True, backend="torch")
    direction = torch.randn(batch.n_atoms, 3, dtype=F64,
                            generator=torch.Generator().manual_seed(0))
    forces = [energy_forces_stress(m, batch, graph, create_graph=True).forces for m in (plain, fast)]
    assert _close(forces[1], forces[0])
    hv = []
    for model in (plain, fast):
        pos = batch.positions.clone().requires_grad_(True)
        with torch.enable_grad():
            energy = model(batch.replace(positions=pos), graph).energy.sum()
            (g,) = torch.autograd.grad(energy, pos, create_graph=True)
            (h,) = torch.autograd.grad((g * direction).sum(), pos)
        hv.append(h)
    assert _close(hv[1], hv[0], 1e-10)


def test_checkpointed_layers_and_bf16_attention_core(structures):
    plain = _potential("small").float()
    batch = AtomsBatch.from_atoms(structures[:2], dtype=torch.float32)
    graph = build_graph(batch, plain.cutoff_A)
    fast = accelerate(plain, inference=True)
    ref = energy_forces_stress(fast, batch, graph, compute_stress=True)
    with fast.model.checkpoint_layers():
        lean = energy_forces_stress(fast, batch, graph, compute_stress=True)
    assert torch.allclose(lean.forces, ref.forces, rtol=0, atol=1e-6)
    low = energy_forces_stress(accelerate(plain, inference=True, attention_dtype=torch.bfloat16),
                               batch, graph)
    assert low.forces.dtype == torch.float32
    err = float((low.forces - ref.forces).abs().max())
    assert 0 < err < 0.05 * float(ref.forces.abs().max())


# ----------------------------------------------------------------------------- each block


def _block_cases():
    grid = make_grid("fibonacci", 2, n_points=24)
    return {
        "attention": (lambda: SphericalAttention(8, grid, n_heads=2, l_roe=2),
                      lambda g: (torch.randn(5, 24, 8, generator=g, dtype=F64),)),
        "attention-1-head-chunked": (
            lambda: SphericalAttention(8, grid, n_heads=1, l_roe=1, chunk_size=2),
            lambda g: (torch.randn(5, 24, 8, generator=g, dtype=F64),)),
        "cross-attention": (
            lambda: SphericalAttention(8, grid, n_heads=2, l_roe=2, kv_channels=4),
            lambda g: (torch.randn(5, 24, 8, generator=g, dtype=F64),
                       torch.randn(5, 24, 4, generator=g, dtype=F64))),
        "dwlinear": (lambda: DWLinear(2, 6, 5),
                     lambda g: (torch.randn(7, 9, 6, generator=g, dtype=F64),)),
        "dwlinear-l0": (lambda: DWLinear(0, 6, 5),
                        lambda g: (torch.randn(7, 1, 6, generator=g, dtype=F64),)),
        "layernorm-joint": (lambda: EquivariantLayerNorm(2, 6),
                            lambda g: (torch.randn(7, 9, 6, generator=g, dtype=F64),)),
        "layernorm-separate": (lambda: EquivariantLayerNorm(2, 6, joint=False),
                               lambda g: (torch.randn(7, 9, 6, generator=g, dtype=F64),)),
        "experts": (lambda: MixtureOfHybridExperts(2, 8, grid, n_steerable=2, n_spherical=1,
                                                   n_heads=2),
                    lambda g: (torch.randn(5, 9, 8, generator=g, dtype=F64),)),
        "so2-linear": (lambda: SO2Linear(2, 2, 6, 5, extra_scalars=3),
                       lambda g: (torch.randn(7, 9, 6, generator=g, dtype=F64),
                                  torch.randn(7, 6 * 6, generator=g, dtype=F64))),
    }


@pytest.mark.parametrize("inference", [False, True])
@pytest.mark.parametrize("case", sorted(_block_cases()))
def test_each_accelerated_block_equals_plain(case, inference):
    """Values, input gradients and (trainable weights) gradients of gradients; parameter
    gradients too where the weights train."""
    make, inputs = _block_cases()[case]
    torch.manual_seed(0)
    plain = make().to(F64)
    _randomize(plain, 4)
    for p in plain.parameters():
        p.requires_grad_(not inference)
    fast = accelerate(plain, inference=inference)
    assert type(fast) is SWAPS[type(plain)]
    xs = [x.requires_grad_(True) for x in inputs(torch.Generator().manual_seed(1))]

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    outs = [first(m(*xs)) for m in (plain, fast)]
    assert _close(outs[1], outs[0])
    weight = torch.randn(outs[0].shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    params = [p for p in plain.parameters() if p.requires_grad]
    grads = [torch.autograd.grad((torch.tanh(o) * weight).sum(), xs + params, create_graph=True)
             for o in outs]
    for a, b in zip(*grads):
        assert _close(b, a)
    if not inference:  # double backward, as a force loss in training needs
        gg = [torch.autograd.grad(sum((g ** 2).sum() for g in gs[:len(xs)]), xs + params,
                                  allow_unused=True) for gs in grads]
        for a, b in zip(*gg):
            assert (a is None) == (b is None)
            if a is not None:
                assert _close(b, a, 1e-10)


def test_accelerated_est_message_block_equals_plain():
    """The full-EST message block with its node side folded into one product."""
    from est_calc.nn.edges import EdgeFeatures

    torch.manual_seed(0)
    grid = make_grid("fibonacci", 2, n_points=12).to(F64)
    plain = ESTMessageBlock(2, 8, grid, fourier_channels=4, n_heads=2, l_roe=1, n_rbf=4,
                            species_channels=3, radial_hidden=8, hidden_mult=2,
                            avg_degree=5.0, edge_chunk_size=7).to(F64)
    _randomize(plain, 5)
    fast = accelerate(plain)
    g = torch.Generator().manual_seed(3)
    n, e = 6, 17
    i, j = torch.randint(0, n, (e,), generator=g), torch.randint(0, n, (e,), generator=g)
    vec = torch.randn(e, 3, dtype=F64, generator=g).requires_grad_(True)
    from e3nn import o3

    sh = o3.spherical_harmonics([0, 1, 2], vec, normalize=True, normalization="component")
    rbf = torch.randn(e, 4, dtype=F64, generator=g)
    emb = torch.randn(n, 3, dtype=F64, generator=g)
    edges = EdgeFeatures(i, j, vec.norm(dim=-1), sh, rbf, torch.rand(e, dtype=F64, generator=g),
                         torch.cat([rbf, emb[i], emb[j]], -1))
    x = torch.randn(n, 9, 8, dtype=F64, generator=g).requires_grad_(True)
    outs = [m(x, edges) for m in (plain, fast)]
    assert _close(outs[1], outs[0])
    grads = [torch.autograd.grad(o.square().sum(), (x, vec), retain_graph=True) for o in outs]
    for a, b in zip(*grads):
        assert _close(b, a)
