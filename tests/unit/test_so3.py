"""Exactly equivariant layers: DWLinear, EquivariantLayerNorm, Gate."""

from __future__ import annotations

import pytest
import torch
from e3nn import o3

from est_calc.nn.so3 import DWLinear, EquivariantLayerNorm, Gate, degree_index

F64 = torch.float64
L, C = 3, 6
K = (L + 1) ** 2


def _wigner(l_max, seed=0):
    torch.manual_seed(seed)
    rot = o3.rand_matrix(dtype=F64)
    return o3.Irreps.spherical_harmonics(l_max).D_from_matrix(rot)


def _layers():
    return {
        "dwlinear": DWLinear(L, C, C + 2),
        "layernorm": EquivariantLayerNorm(L, C),
        "gate": Gate(L, C),
    }


def _randomise(module):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    return module


def test_degree_index():
    assert degree_index(2).tolist() == [0, 1, 1, 1, 2, 2, 2, 2, 2]


@pytest.mark.parametrize("name", ["dwlinear", "layernorm", "gate"])
def test_equivariant_under_wigner_d(name):
    layer = _randomise(_layers()[name]).to(F64)
    x = torch.randn(7, K, C, dtype=F64)
    d = _wigner(L)
    lhs = layer(torch.einsum("ij,njc->nic", d, x))
    rhs = torch.einsum("ij,njc->nic", d, layer(x))
    assert (lhs - rhs).abs().max() < 1e-6 * (1 + rhs.abs().max())


def test_equivariance_test_can_fail():
    """A per-m scaling (not a multiple of D^l) must be caught by the same check."""
    x = torch.randn(5, K, C, dtype=F64)
    d = _wigner(L)
    scale = torch.linspace(0.5, 1.5, K, dtype=F64)[None, :, None]
    lhs = scale * torch.einsum("ij,njc->nic", d, x)
    rhs = torch.einsum("ij,njc->nic", d, scale * x)
    assert (lhs - rhs).abs().max() > 1e-3


def test_dwlinear_mixes_channels_per_degree_only():
    layer = _randomise(DWLinear(L, C, 4, bias=True)).to(F64)
    x = torch.zeros(2, K, C, dtype=F64)
    x[:, 4:9] = torch.randn(2, 5, C, dtype=F64)  # only l = 2
    y = layer(x)
    assert torch.allclose(y[:, 1:4], torch.zeros_like(y[:, 1:4]))
    assert torch.allclose(y[:, 9:], torch.zeros_like(y[:, 9:]))
    assert torch.allclose(y[:, 0], layer.bias.expand(2, 4))
    assert torch.allclose(y[:, 4:9], x[:, 4:9] @ layer.weight[2])


@pytest.mark.parametrize("joint", [True, False])
def test_layernorm_statistics(joint):
    """l = 0: centred and scaled to unit variance. l > 0 (unit scales): the degree-balanced mean
    square is 1 for the separate statistic; for the joint one the balanced mean square over all
    degrees, with the centred l = 0 part, is 1 (EquiformerV2's rms_norm_sh)."""
    ln = EquivariantLayerNorm(L, C, joint=joint).to(F64)
    x = 3.0 * torch.randn(4, K, C, dtype=F64) + 2.0
    y = ln(x)
    assert torch.allclose(y[:, 0].mean(-1), torch.zeros(4, dtype=F64), atol=1e-12)
    deg = degree_index(L)[1:]
    if joint:
        x0 = x[:, 0] - x[:, 0].mean(-1, keepdim=True)
        terms = (x0**2).mean(-1) + ((x[:, 1:] ** 2) / (2 * deg[None, :, None] + 1)).sum(1).mean(-1)
        rms = torch.sqrt(terms / (L + 1) + ln.eps)
        assert torch.allclose(y[:, 1:], x[:, 1:] / rms[:, None, None], atol=1e-12)
    else:
        ms = ((y[:, 1:] ** 2) / (2 * deg[None, :, None] + 1)).sum(1).mean(-1) / L
        assert torch.allclose(ms, torch.ones(4, dtype=F64), atol=1e-4)


def test_joint_layernorm_keeps_a_vanishing_l_gt_0_part_small():
    """An l > 0 part at float32 rounding level (1e-7, a symmetric crystal) keeps its size with the
    joint statistic; the separate one multiplies it by 1/sqrt(eps) ~ 316 at every norm, which
    over the norms of two layers reached 1e10."""
    x = torch.randn(5, K, C, dtype=F64)
    x[:, 1:] *= 1e-7
    joint = EquivariantLayerNorm(L, C, joint=True).to(F64)(x)
    separate = EquivariantLayerNorm(L, C, joint=False).to(F64)(x)
    gain = separate[:, 1:].abs().max() / x[:, 1:].abs().max()
    assert float(joint[:, 1:].abs().max() / x[:, 1:].abs().max()) < 3.0
    assert 200 < float(gain) < 400


def test_gate_values():
    gate = _randomise(Gate(L, C)).to(F64)
    x = torch.randn(3, K, C, dtype=F64)
    y = gate(x)
    assert torch.allclose(y[:, 0], torch.nn.functional.silu(x[:, 0]))
    g = torch.sigmoid(gate.gate(x[:, 0])).view(3, L, C)
    assert torch.allclose(y[:, 4:9], x[:, 4:9] * g[:, 1:2])


@pytest.mark.parametrize("name", ["dwlinear", "layernorm", "gate"])
def test_double_backward_and_dtypes(name):
    layer = _layers()[name]
    x32 = torch.randn(3, K, C)
    assert layer(x32).dtype == torch.float32
    layer = layer.to(F64)
    x = torch.randn(3, K, C, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.pow(2).sum(), x)
    assert gg.shape == x.shape and torch.isfinite(gg).all() and gg.abs().sum() > 0


def test_bad_shapes():
    with pytest.raises(ValueError, match="K=16"):
        DWLinear(L, C, C)(torch.randn(2, 9, C))
    with pytest.raises(ValueError, match="C=6"):
        Gate(L, C)(torch.randn(2, K, 5))
    with pytest.raises(ValueError):
        EquivariantLayerNorm(-1, C)


def test_l_max_zero():
    x = torch.randn(4, 1, C)
    assert EquivariantLayerNorm(0, C)(x).shape == x.shape
    assert torch.allclose(Gate(0, C)(x), torch.nn.functional.silu(x))
