"""Radial basis, polynomial envelope and radial MLP (float64)."""

import math

import pytest
import torch

from est_calc.nn.radial import (
    BesselBasis,
    GaussianBasis,
    PolynomialEnvelope,
    RadialMLP,
    make_radial_basis,
)

RC = 4.5


def _derivatives(fn, r):
    """u, u', u'' at r by autograd."""
    r = r.clone().requires_grad_(True)
    u = fn(r)
    (d1,) = torch.autograd.grad(u.sum(), r, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), r)
    return u.detach(), d1.detach(), d2


@pytest.mark.parametrize("p", [3, 5, 6])
def test_envelope_value_and_two_derivatives_vanish_at_cutoff(p):
    env = PolynomialEnvelope(RC, p=p)
    r = torch.tensor([RC * (1 - 1e-9), RC], dtype=torch.float64)
    u, d1, d2 = _derivatives(env, r)
    assert torch.all(u.abs() < 1e-12)
    assert torch.all(d1.abs() < 1e-7)
    # u'' ~ (r_c - r) close to the cutoff, so it is small but not exactly zero just inside.
    assert torch.all(d2.abs() < 1e-6)


def test_envelope_exactly_zero_with_zero_gradient_beyond_cutoff():
    env = PolynomialEnvelope(RC)
    r = torch.tensor([RC, RC + 1e-12, RC + 0.3, 10 * RC], dtype=torch.float64)
    u, d1, d2 = _derivatives(env, r)
    assert torch.equal(u, torch.zeros_like(u))
    assert torch.equal(d1, torch.zeros_like(d1))
    assert torch.equal(d2, torch.zeros_like(d2))


def test_envelope_shape_is_a_smooth_monotone_step():
    env = PolynomialEnvelope(RC, p=5)
    r = torch.linspace(0.0, RC, 2001, dtype=torch.float64)
    u, d1, d2 = _derivatives(env, r)
    assert u[0].item() == pytest.approx(1.0, abs=1e-15)
    assert torch.all(u >= -1e-15) and torch.all(u <= 1.0 + 1e-15)
    assert torch.all(torch.diff(u) <= 1e-15), "envelope must decrease monotonically"
    # C^2: the second derivative changes by small amounts between neighbouring samples, i.e. it has
    # no jump anywhere including at r_c (where it must meet the zero continuation).
    assert torch.max(torch.diff(d2).abs()).item() < 0.05 * d2.abs().max().item()
    # Matches the closed form at an interior point.
    d = 0.37
    ref = 1 - 21 * d**5 + 35 * d**6 - 15 * d**7
    assert env(torch.tensor([d * RC], dtype=torch.float64)).item() == pytest.approx(ref, abs=1e-14)


def test_envelope_rejects_bad_arguments():
    with pytest.raises(ValueError, match="cutoff"):
        PolynomialEnvelope(0.0)
    with pytest.raises(ValueError, match="order"):
        PolynomialEnvelope(RC, p=0)


@pytest.mark.parametrize("cls", [BesselBasis, GaussianBasis])
def test_basis_shape_dtype_and_finiteness(cls):
    basis = cls(7, RC).double()
    r = torch.linspace(0.5, RC, 13, dtype=torch.float64)
    out = basis(r)
    assert out.shape == (13, 7) and out.dtype == torch.float64
    assert torch.all(torch.isfinite(out))
    assert basis(r[:0]).shape == (0, 7)


def test_bessel_basis_matches_the_sine_formula():
    basis = BesselBasis(4, RC).double()
    r = torch.tensor([0.9, 2.2, 4.1], dtype=torch.float64)
    n = torch.arange(1, 5, dtype=torch.float64)
    ref = math.sqrt(2 / RC) * torch.sin(n * math.pi * r[:, None] / RC) / r[:, None]
    torch.testing.assert_close(basis(r), ref, rtol=1e-12, atol=1e-12)


def test_gaussian_basis_peaks_at_its_centres():
    basis = GaussianBasis(6, RC).double()
    centres = torch.linspace(0, RC, 6, dtype=torch.float64)
    out = basis(centres)
    assert torch.equal(out.argmax(dim=1), torch.arange(6))
    torch.testing.assert_close(out.diagonal(), torch.ones(6, dtype=torch.float64))


def test_make_radial_basis_and_errors():
    assert isinstance(make_radial_basis("bessel", 3, RC), BesselBasis)
    assert isinstance(make_radial_basis("gaussian", 3, RC), GaussianBasis)
    with pytest.raises(ValueError, match="unknown radial basis"):
        make_radial_basis("cosine", 3, RC)
    with pytest.raises(ValueError, match="n_basis"):
        BesselBasis(0, RC)


def test_radial_mlp_structure_and_shape():
    mlp = RadialMLP(5, 16, 3, n_hidden_layers=2).double()
    kinds = [type(m) for m in mlp.net]
    assert kinds == [torch.nn.Linear, torch.nn.LayerNorm, torch.nn.SiLU] * 2 + [torch.nn.Linear]
    x = torch.randn(11, 5, dtype=torch.float64)
    assert mlp(x).shape == (11, 3)
    with pytest.raises(ValueError, match="hidden"):
        RadialMLP(5, 0, 3)
