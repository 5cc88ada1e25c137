"""The parts the accelerations are built from give the numbers of what they replace.

* WignerD for L <= 2 applies a fitted polynomial in the entries of R instead of evaluating the
  harmonics at rotated points;
* the accelerated model reads the edge SH off the m = 0 rows of the Wigner rotations;
* parameter-only tensors (block matrices, gathered weights) are cached while the parameters are
  frozen (est_calc.accel.weights), and rebuilt whenever they change;
* the accelerated softmax skips its max shift when the logits have a small known bound;
* the whole-tensor SO(2) maps (_SO2Map) of frozen weights.
"""

from __future__ import annotations

import pytest
import torch
from e3nn import o3

from est_calc.accel import accelerate
from est_calc.accel.so2_message import bounded_segment_softmax
from est_calc.accel.weights import clear_derived, derived
from est_calc.model import ESTModel, ModelConfig
from est_calc.neighbors import Graph
from est_calc.nn.message_so2 import SO2Linear, SO2MessageBlock, segment_softmax, smooth_leaky_relu
from est_calc.nn.so3 import DWLinear, EquivariantLayerNorm
from est_calc.nn.wigner import WignerD, edge_frame, so2_index

F64 = torch.float64


def so2_block(**overrides) -> SO2MessageBlock:
    """The SO(2) message block of the "small" preset (with overrides)."""
    c = ModelConfig.preset("small", **overrides)
    return SO2MessageBlock(c.l_max, c.so2_m_max, c.channels, n_heads=c.n_heads, n_rbf=c.n_rbf,
                           species_channels=c.species_channels, radial_hidden=c.radial_hidden)


@pytest.mark.parametrize("l_max,m_max", [(0, 0), (1, 1), (2, 1), (2, 2), (2, None)])
def test_polynomial_wigner_equals_sampled_construction(l_max, m_max):
    rows = None if m_max is None else so2_index(l_max, m_max)
    w = WignerD(l_max, rows=rows).to(F64)
    assert w.polynomial
    rot = o3.rand_matrix(40, dtype=F64)
    d = w(rot)
    assert (d - w._sampled(rot)).abs().max() < 1e-12
    # ... and it is a representation: D(R1 R2) = D(R1) D(R2) on the full matrix.
    if rows is None:
        assert (w(rot[:20] @ rot[20:]) - d[:20] @ d[20:]).abs().max() < 1e-12
    # float32 rounds the float64 coefficients once.
    assert (WignerD(l_max, rows=rows)(rot.float()).double() - d).abs().max() < 1e-6


def test_wigner_above_degree_two_keeps_the_sampled_construction():
    w = WignerD(3).to(F64)
    assert not w.polynomial and w.poly_lin is None
    rot = o3.rand_matrix(5, dtype=F64)
    assert torch.equal(w(rot), w._sampled(rot))


def test_polynomial_wigner_gradients_match_sampled():
    w = WignerD(2, rows=so2_index(2, 1)).to(F64)
    vec = torch.randn(12, 3, dtype=F64, requires_grad=True)
    coeff = torch.randn(12, 7, 9, dtype=F64)
    (g_poly,) = torch.autograd.grad((w(edge_frame(vec)) * coeff).sum(), vec)
    (g_samp,) = torch.autograd.grad((w._sampled(edge_frame(vec)) * coeff).sum(), vec)
    assert (g_poly - g_samp).abs().max() < 1e-11


@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("l_max,m_max", [(1, 1), (2, 1), (2, 2), (3, 2)])
def test_edge_sh_read_off_the_wigner_rotation(l_max, m_max, paired):
    model = accelerate(ESTModel(ModelConfig.preset("small", l_max=l_max, so2_m_max=m_max))
                       .to(F64), inference=True)
    vec = torch.randn(30, 3, dtype=F64) * 3.0
    vec[0] = torch.tensor([1.0, 1.0, 1.0], dtype=F64)          # helper-axis tie of the frame
    vec[1] = torch.tensor([0.0, 2.0, 0.0], dtype=F64)          # along the edge axis
    index = torch.randint(0, 4, (2, 30))
    if paired:  # the second half reverses the first
        vec, index = torch.cat([vec, -vec]), torch.cat([index, index.flip(0)], dim=1)
    graph = Graph(index, torch.zeros(index.shape[1], 3, dtype=torch.long), paired=paired)
    edges = model.edge_features(torch.zeros(4, 16, dtype=F64), graph, vec)
    ref = o3.spherical_harmonics(list(range(l_max + 1)), vec, normalize=True,
                                 normalization="component")
    assert (edges.sh - ref).abs().max() < 1e-12
    assert (edges.rotation - model.edge_rotation(vec)).abs().max() < 1e-12
    assert (edges.pair_rotation is not None) == paired


# ----------------------------------------------------------------------------- derived


def test_derived_caches_only_frozen_sources_and_sees_every_change():
    lin = torch.nn.Linear(3, 4)
    calls = []

    def build():
        calls.append(1)
        return lin.weight * 2.0

    # Trainable: rebuilt on every call and part of the autograd graph.
    a = derived(lin, "w2", [lin.weight], build)
    assert derived(lin, "w2", [lin.weight], build) is not a
    assert len(calls) == 2 and a.requires_grad
    lin.weight.requires_grad_(False)
    c = derived(lin, "w2", [lin.weight], build)
    assert derived(lin, "w2", [lin.weight], build) is c and len(calls) == 3
    with torch.no_grad():
        lin.weight.add_(1.0)                                    # in-place update (optimizer step)
    d = derived(lin, "w2", [lin.weight], build)
    assert len(calls) == 4 and torch.equal(d, lin.weight * 2.0)
    lin.load_state_dict({"weight": torch.zeros(4, 3), "bias": torch.zeros(4)})
    assert torch.equal(derived(lin, "w2", [lin.weight], build), torch.zeros(4, 3))
    lin.double()                                                # new tensors
    assert derived(lin, "w2", [lin.weight], build).dtype == F64
    assert len(calls) == 6
    # A write through .data passes the version counter by: clear_derived is the way out.
    lin.weight.data.fill_(3.0)
    assert not torch.equal(derived(lin, "w2", [lin.weight], build), lin.weight * 2.0)
    clear_derived(torch.nn.Sequential(lin))
    assert torch.equal(derived(lin, "w2", [lin.weight], build), lin.weight * 2.0)


def test_frozen_blocks_equal_trainable_blocks_after_weight_changes():
    """A cached block gives what the same block computes with trainable weights, also after its
    weights change in place between calls."""
    torch.manual_seed(0)
    layers = [DWLinear(2, 6, 5).to(F64), EquivariantLayerNorm(2, 6).to(F64)]
    x = torch.randn(4, 9, 6, dtype=F64)
    for layer in (accelerate(m, inference=True) for m in layers):
        for step in range(2):
            ref = layer(x)
            for p in layer.parameters():
                p.requires_grad_(False)
            assert torch.equal(layer(x), ref) and torch.equal(layer(x), ref)
            with torch.no_grad():
                for p in layer.parameters():
                    p.mul_(1.5).add_(0.1)
            for p in layer.parameters():
                p.requires_grad_(True)
            assert not torch.equal(layer(x), ref)


# ----------------------------------------------------------------------------- softmax bound


def test_segment_softmax_without_shift_matches_shifted():
    g = torch.Generator().manual_seed(0)
    logits = (torch.rand(50, 3, generator=g, dtype=F64) * 40 - 20).requires_grad_(True)
    u = torch.rand(50, generator=g, dtype=F64)
    u[::7] = 0.0
    seg = torch.randint(0, 12, (50,), generator=g)
    seg[seg == 11] = 10                                          # segment 11 stays empty
    ref = segment_softmax(logits, u, seg, 12)
    fast = bounded_segment_softmax(logits, u, seg, 12, bound=20.0)
    assert (fast - ref).abs().max() < 1e-12
    (g_ref,) = torch.autograd.grad((ref * torch.arange(3.0, dtype=F64)).sum(), logits)
    (g_fast,) = torch.autograd.grad((fast * torch.arange(3.0, dtype=F64)).sum(), logits)
    assert (g_fast - g_ref).abs().max() < 1e-12
    # A bound above the safe range keeps the shifted path (here: it must, exp(700) overflows).
    big = torch.tensor([[700.0], [690.0]], dtype=torch.float32)
    out = bounded_segment_softmax(big, torch.ones(2), torch.zeros(2, dtype=torch.long), 1,
                                  bound=700.0)
    assert torch.isfinite(out).all() and abs(float(out.sum()) - 1.0) < 1e-6


def test_logit_bound_bounds_the_attention_logits():
    torch.manual_seed(1)
    plain = so2_block()
    with torch.no_grad():                                        # larger, varied weights
        plain.alpha_norm.weight.normal_(0.0, 2.0)
        plain.alpha_norm.bias.normal_(0.0, 1.0)
    for p in plain.parameters():
        p.requires_grad_(False)
    block = accelerate(plain, inference=True)
    bound = block._logit_bound()
    s = torch.randn(5000, block.n_heads, block.d_alpha) * torch.logspace(-3, 3, 5000)[:, None, None]
    s[:10] = 0.0
    s[10:20, :, 0] = 1e4                                         # one dominant entry: |n_k| -> sqrt(d-1)
    logits = (smooth_leaky_relu(block.alpha_norm(s)) * block.alpha_dot).sum(-1)
    assert float(logits.abs().max()) <= bound * (1 + 1e-6)
    assert float(logits.abs().max()) > 0.3 * bound               # and the bound is not loose
    assert accelerate(plain)._logit_bound() is None              # training keeps the shift


def test_smooth_leaky_relu_is_the_defining_formula():
    x = torch.linspace(-30, 30, 2001, dtype=F64, requires_grad=True)
    for slope in (0.2, 0.0, 0.5):
        ref = 0.5 * (1 + slope) * x + 0.5 * (1 - slope) * x * (2 * torch.sigmoid(x) - 1)
        out = smooth_leaky_relu(x, slope)
        assert (out - ref).abs().max() < 1e-12
        g_ref, = torch.autograd.grad(ref.sum(), x, create_graph=True)
        g_out, = torch.autograd.grad(out.sum(), x, create_graph=True)
        assert (g_out - g_ref).abs().max() < 1e-12
        gg_ref, = torch.autograd.grad(g_ref.sum(), x)
        gg_out, = torch.autograd.grad(g_out.sum(), x)
        assert (gg_out - gg_ref).abs().max() < 1e-12


def test_row_repeated_radial_equals_per_group_modulation():
    """The block modulates all K_M rows with the radial MLP's last layer repeated per +-m row;
    SO2Linear's own per-m-group broadcast of the unrepeated output gives the same numbers."""
    torch.manual_seed(3)
    block = accelerate(so2_block(so2_m_max=2).to(F64))
    e = 11
    z = torch.randn(e, block.conv1.n_rows, block.conv1.in_channels, dtype=F64)
    radial_in = torch.randn(e, block.radial.in_features, dtype=F64)
    ref = block.conv1.map_groups(block.conv1.split_groups(z), block.radial(radial_in))
    w, b = block.conv1.radial_rows(block.radial.last.weight, block.radial.last.bias)
    zm = z * torch.nn.functional.linear(block.radial.hidden(radial_in), w, b).view(z.shape)
    out = block.conv1.map_groups(block.conv1.split_groups(zm))
    for a, c in zip(out[0] + [out[1]], ref[0] + [ref[1]]):
        assert (a - c).abs().max() < 1e-12


def test_constant_is_built_once_per_dtype_and_device():
    from est_calc.accel.weights import constant

    like32, like64 = torch.zeros(1), torch.zeros(1, dtype=F64)
    a = constant((1.0, 2.0), like32)
    assert a is constant((1.0, 2.0), like32) and a.dtype == torch.float32
    b = constant((1.0, 2.0), like64)
    assert b is not a and b.dtype == F64 and torch.equal(b, torch.tensor([1.0, 2.0], dtype=F64))
    assert constant(((1.0, 0.0), (0.0, 1.0)), like64).shape == (2, 2)


# ----------------------------------------------------------------------------- fused SO(2) maps


def _frozen(module):
    for p in module.parameters():
        p.requires_grad_(False)
    return module


@pytest.mark.parametrize("l_max,m_max,extra", [(2, 1, 5), (2, 2, 0), (1, 1, 3), (0, 0, 2)])
def test_fused_so2_maps_equal_map_groups_in_values_and_input_gradients(l_max, m_max, extra,
                                                                       torch_device):
    """With frozen weights SO2Linear reads a whole input / writes a whole output through _SO2Map;
    values, gradients and gradients of gradients equal those of map_groups (on the GPU too,
    whose matrix products write into the same row-block views)."""
    torch.manual_seed(4)
    lin = accelerate(_frozen(SO2Linear(l_max, m_max, 3, 4, extra_scalars=extra)
                             .to(torch_device, F64)), inference=True)
    e = 7
    kw = {"dtype": F64, "device": torch_device}
    x = torch.randn(e, lin.n_rows, 3, **kw).requires_grad_(True)
    w_out = torch.randn(e, lin.n_rows, 4, **kw)
    w_extra = torch.randn(e, extra, **kw)

    def loss(parts, extra_out):
        y = parts if torch.is_tensor(parts) else torch.cat(parts, dim=1)
        return (torch.tanh(y) * w_out).sum() + (torch.tanh(extra_out) * w_extra).sum()

    ref = loss(*lin.map_groups(lin.split_groups(x)))
    (g_ref,) = torch.autograd.grad(ref, x, create_graph=True)
    (gg_ref,) = torch.autograd.grad((g_ref**2).sum(), x)
    groups = [g.detach().clone().requires_grad_(True) for g in lin.split_groups(x)]
    ref_groups = torch.autograd.grad(loss(*lin.map_groups(groups)), groups)
    for fused in ("whole_input", "to_whole"):
        if fused == "whole_input":
            parts, extra_out = lin.map_whole_input(x)
            inputs = x
        else:
            parts, extra_out = lin.map_to_whole(groups)
            inputs = groups
        assert "_SO2Map" in type(extra_out.grad_fn).__name__
        out = loss(parts, extra_out)
        assert (out - ref).abs() < 1e-12
        grads = torch.autograd.grad(out, inputs, retain_graph=True)
        if fused == "whole_input":
            assert (grads[0] - g_ref).abs().max() < 1e-12
            (g,) = torch.autograd.grad(out, x, create_graph=True)
            (gg,) = torch.autograd.grad((g**2).sum(), x)
            assert (gg - gg_ref).abs().max() < 1e-11
        else:
            for a, b in zip(grads, ref_groups):
                assert (a - b).abs().max() < 1e-12


def test_so2_maps_of_training_stay_on_autograd():
    lin = accelerate(SO2Linear(2, 1, 3, 4, extra_scalars=2).to(F64))
    x = torch.randn(5, lin.n_rows, 3, dtype=F64, requires_grad=True)
    parts, extra_out = lin.map_whole_input(x)
    assert "_SO2Map" not in type(extra_out.grad_fn).__name__
    torch.autograd.grad(extra_out.sum() + sum(p.sum() for p in parts), lin.fc0.weight)
