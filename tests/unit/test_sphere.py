"""Sample points and spherical transforms: exactness, quadrature, rotation, dtype handling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from e3nn import o3

from est_calc.sphere import (
    SphericalGrid,
    fibonacci,
    fibonacci_poles,
    lat_long,
    lebedev,
    lebedev_degrees,
    make_grid,
    real_sh,
)

F64 = torch.float64


def _eye(k):
    return torch.eye(k, dtype=F64)


@pytest.mark.parametrize("fn", [fibonacci, fibonacci_poles])
def test_fibonacci_points_are_unit_and_nearly_equal_area(fn):
    pts = fn(400).points
    assert pts.shape == (400, 3)
    np.testing.assert_allclose(np.linalg.norm(pts, axis=1), 1.0, atol=1e-14)
    # Equal-area sets have a centroid near the origin and a second moment near I/3.
    assert np.abs(pts.mean(axis=0)).max() < 1e-2
    np.testing.assert_allclose(pts.T @ pts / len(pts), np.eye(3) / 3, atol=1e-2)


def test_fibonacci_poles_holds_both_poles_and_offset_form_none():
    assert np.allclose(fibonacci_poles(50).points[[0, -1]], [[0, 1, 0], [0, -1, 0]])
    assert np.abs(fibonacci(50).points[:, 2]).max() < 1.0


def test_lebedev_rejects_negative_weight_rules_and_unknown_degrees():
    for degree in (13, 25, 27):
        with pytest.raises(ValueError, match="negative weights"):
            lebedev(degree)
    with pytest.raises(ValueError, match="unknown degree"):
        lebedev(4)
    for degree in lebedev_degrees()[:6]:
        ps = lebedev(degree)
        assert ps.weights.min() > 0 and math.isclose(ps.weights.sum(), 4 * math.pi)


@pytest.mark.parametrize("l_max", [2, 4])
@pytest.mark.parametrize("kind", ["lebedev", "lat_long"])
def test_exact_quadrature_orthonormality(kind, l_max):
    ps = lebedev(9 if l_max == 4 else 5) if kind == "lebedev" else lat_long(l_max)
    y = torch.as_tensor(real_sh(l_max, ps.points))
    gram = y.T @ torch.diag(torch.as_tensor(ps.weights)) @ y / (4 * math.pi)
    assert (gram - _eye((l_max + 1) ** 2)).abs().max() < 1e-12


def test_lebedev_below_2l_is_not_exact():
    ps = lebedev(7)  # degree 7 < 2L = 8
    y = torch.as_tensor(real_sh(4, ps.points))
    gram = y.T @ torch.diag(torch.as_tensor(ps.weights)) @ y / (4 * math.pi)
    assert (gram - _eye(25)).abs().max() > 1e-3


@pytest.mark.parametrize("kind,n_points", [("fibonacci", 25), ("fibonacci", 90),
                                           ("fibonacci_poles", 90), ("lebedev", None),
                                           ("lat_long", None)])
def test_lstsq_round_trip_is_exact(kind, n_points):
    grid = make_grid(kind, l_max=4, n_points=n_points).to(F64)
    x = torch.randn(3, 25, 5, dtype=F64)
    assert (grid.from_grid(grid.to_grid(x)) - x).abs().max() < 1e-10


def test_normalized_transpose_is_measurably_inexact():
    grid = make_grid("fibonacci", l_max=4, inverse="normalized_transpose").to(F64)
    err = (grid.from_grid_matrix @ grid.to_grid_matrix - _eye(25)).abs().max().item()
    print(f"normalized_transpose |Yhat^T Yhat - I|_max at L=4, S=90: {err:.3e}")
    assert err > 1e-3
    # Its diagonal is exactly one (that is what the column normalisation does).
    assert (torch.diagonal(grid.from_grid_matrix @ grid.to_grid_matrix) - 1).abs().max() < 1e-12


@pytest.mark.parametrize("kind", ["fibonacci", "lebedev", "lat_long"])
def test_sampling_rotated_coefficients_equals_rotating_the_function(kind):
    """For f = Y x: to_grid(x_R)(p) = f(R^T p), with x_R fitted from f(R^T p) (no Wigner-D error)."""
    torch.manual_seed(0)
    l_max = 4
    grid = make_grid(kind, l_max=l_max).to(F64)
    rot = o3.rand_matrix(dtype=F64)
    x = torch.randn(25, 2, dtype=F64)
    rotated_pts = grid.points @ rot  # rows R^T p_s
    values = torch.as_tensor(real_sh(l_max, rotated_pts)) @ x
    x_rot = grid.from_grid(values)
    assert (grid.to_grid(x_rot) - values).abs().max() < 1e-10
    # And x_rot agrees with D(R) x up to e3nn's own Wigner-D accuracy (~3e-7).
    d = o3.Irreps.spherical_harmonics(l_max).D_from_matrix(rot)
    assert (x_rot - d @ x).abs().max() < 1e-5


def test_buffers_follow_dtype_from_float64_master():
    grid = make_grid("fibonacci", l_max=3)
    assert grid.to_grid_matrix.dtype == torch.get_default_dtype()
    g64 = grid.to(F64)
    ref = torch.as_tensor(real_sh(3, g64.points.numpy()))
    assert g64.to_grid_matrix.dtype == F64
    assert (g64.to_grid_matrix - ref).abs().max() < 1e-14  # not float32 round-off
    assert grid.log_weights is None and make_grid("lat_long", 3).log_weights is not None
    assert len(grid.state_dict()) == 0  # derived from the config, not stored


def test_shapes_and_bad_input():
    grid = make_grid("fibonacci", l_max=2, n_points=30)
    assert grid.to_grid(torch.randn(4, 7, 9, 3)).shape == (4, 7, 30, 3)
    assert grid.from_grid(torch.randn(5, 30, 2)).shape == (5, 9, 2)
    with pytest.raises(ValueError, match="K=9"):
        grid.to_grid(torch.randn(4, 8, 3))
    with pytest.raises(ValueError, match="S=30"):
        grid.from_grid(torch.randn(4, 29, 3))
    with pytest.raises(ValueError, match="S >= K"):
        make_grid("fibonacci", l_max=4, n_points=20)
    with pytest.raises(ValueError, match="rank"):
        SphericalGrid(2, np.tile(np.eye(3), (4, 1)))
    with pytest.raises(ValueError, match="kind"):
        make_grid("healpix", l_max=2)
    with pytest.raises(ValueError, match="positive"):
        SphericalGrid(1, fibonacci(10).points, weights=-np.ones(10))
    # normalized_transpose has no S >= K requirement.
    assert make_grid("fibonacci", l_max=4, n_points=20, inverse="normalized_transpose").n_points == 20
