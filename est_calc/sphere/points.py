"""Sample points on the unit sphere: Fibonacci lattices, Lebedev rules and the e3nn lat/long grid.

Every function returns a :class:`PointSet` of unit vectors in float64 (numpy) plus, for quadrature
rules, weights that sum to 4 pi (the area of the sphere). Equal-area lattices (Fibonacci) carry no
weights: the spherical attention treats their points as equally important.

See EST_SPEC.md sections 3 and 4.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

__all__ = ["PointSet", "fibonacci", "fibonacci_poles", "lebedev", "lat_long", "lebedev_degrees"]

_GOLDEN_RATIO = (1.0 + math.sqrt(5.0)) / 2.0


class PointSet(NamedTuple):
    """Sample points on S^2.

    Attributes:
        points: (S, 3) float64 unit vectors.
        weights: (S,) float64 quadrature weights summing to 4 pi, or None for equal-area sets.
    """

    points: np.ndarray
    weights: np.ndarray | None


def _check_count(n_points: int, minimum: int, name: str) -> int:
    if isinstance(n_points, bool) or not isinstance(n_points, (int, np.integer)):
        raise ValueError(f"{name}: n_points must be an integer, got {n_points!r}")
    if n_points < minimum:
        raise ValueError(f"{name}: n_points must be >= {minimum}, got {n_points}")
    return int(n_points)


def fibonacci(n_points: int) -> PointSet:
    """Offset Fibonacci lattice (paper eq. 11), the project default.

    z_s = 1 - (2s+1)/S, theta_s = 2 pi s / phi, p_s = (rho cos theta, rho sin theta, z), s = 0..S-1.
    No point sits on a pole, and the points are spread with near-equal area.

    Args:
        n_points: S >= 1.

    Returns:
        PointSet with (S, 3) points and weights None.
    """
    n = _check_count(n_points, 1, "fibonacci")
    s = np.arange(n, dtype=np.float64)
    z = 1.0 - (2.0 * s + 1.0) / n
    rho = np.sqrt(np.clip(1.0 - z * z, 0.0, None))
    theta = 2.0 * math.pi * s / _GOLDEN_RATIO
    pts = np.stack([rho * np.cos(theta), rho * np.sin(theta), z], axis=1)
    return PointSet(pts, None)


def fibonacci_poles(n_points: int) -> PointSet:
    """Fibonacci lattice in the author-code form, with points on both poles (+-y).

    y_s = 1 - 2s/(S-1), theta_s = s pi (3 - sqrt 5), p_s = (rho cos theta, y, rho sin theta).

    Args:
        n_points: S >= 2.

    Returns:
        PointSet with (S, 3) points and weights None.
    """
    n = _check_count(n_points, 2, "fibonacci_poles")
    s = np.arange(n, dtype=np.float64)
    y = 1.0 - 2.0 * s / (n - 1)
    rho = np.sqrt(np.clip(1.0 - y * y, 0.0, None))
    theta = s * math.pi * (3.0 - math.sqrt(5.0))
    pts = np.stack([rho * np.cos(theta), y, rho * np.sin(theta)], axis=1)
    return PointSet(pts, None)


# Degrees offered by scipy.integrate.lebedev_rule (scipy >= 1.15). Rules 13, 25 and 27 have
# negative weights, which cannot enter a softmax as log-weights, so they are refused.
_LEBEDEV_ALL = (3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31, 35, 41, 47, 53, 59, 65, 71,
                77, 83, 89, 95, 101, 107, 113, 119, 125, 131)
_LEBEDEV_NEGATIVE = (13, 25, 27)


def lebedev_degrees() -> tuple[int, ...]:
    """Lebedev degrees with all-positive weights that :func:`lebedev` accepts."""
    return tuple(d for d in _LEBEDEV_ALL if d not in _LEBEDEV_NEGATIVE)


def lebedev(degree: int) -> PointSet:
    """Lebedev quadrature rule of the given degree (scipy.integrate.lebedev_rule).

    The rule integrates every polynomial of degree <= ``degree`` exactly, so it is an exact
    quadrature for products Y_i Y_j with l_i + l_j <= degree (use degree >= 2L for features of
    degree L).

    Args:
        degree: a degree from :func:`lebedev_degrees`.

    Returns:
        PointSet with (S, 3) points and (S,) positive weights summing to 4 pi.

    Raises:
        ValueError: unknown degree, or one of the rules with negative weights (13, 25, 27).
    """
    if degree in _LEBEDEV_NEGATIVE:
        raise ValueError(
            f"lebedev: the degree-{degree} rule has negative weights, which cannot be used as "
            f"log-weights in the attention softmax; choose one of {lebedev_degrees()}"
        )
    if degree not in _LEBEDEV_ALL:
        raise ValueError(f"lebedev: unknown degree {degree!r}; choose one of {lebedev_degrees()}")
    try:
        from scipy.integrate import lebedev_rule
    except ImportError as exc:  # pragma: no cover - scipy < 1.15
        raise ValueError("lebedev: needs scipy >= 1.15 (scipy.integrate.lebedev_rule)") from exc
    x, w = lebedev_rule(int(degree))
    pts = np.ascontiguousarray(np.asarray(x, dtype=np.float64).T)
    pts /= np.linalg.norm(pts, axis=1, keepdims=True)
    w = np.asarray(w, dtype=np.float64)
    return PointSet(pts, w * (4.0 * math.pi / w.sum()))


def _kostelec_rockmore_weights(res_beta: int) -> np.ndarray:
    """Kostelec-Rockmore weights for the beta nodes beta_j = pi (j + 1/2) / (2b), j < 2b = res_beta.

    They integrate sin(beta)-weighted functions of beta exactly for band limit b (polynomials in
    cos beta of degree < 2b). Returned unnormalised; the caller scales them to 4 pi in total.
    """
    b = res_beta // 2
    j = np.arange(res_beta, dtype=np.float64)[:, None]
    k = np.arange(b, dtype=np.float64)[None, :]
    arg = (2.0 * j + 1.0) * (2.0 * k + 1.0) * math.pi / (4.0 * b)
    series = (np.sin(arg) / (2.0 * k + 1.0)).sum(axis=1)
    return (2.0 / b) * np.sin(math.pi * (2.0 * j[:, 0] + 1.0) / (4.0 * b)) * series


def lat_long(l_max: int, res_beta: int | None = None, res_alpha: int | None = None) -> PointSet:
    """e3nn-style latitude/longitude grid with Kostelec-Rockmore quadrature weights.

    beta_i = pi (i + 1/2) / res_beta, alpha_j = 2 pi j / res_alpha, and the point is
    (sin b sin a, cos b, sin b cos a), as in ``e3nn.o3.ToS2Grid`` (poles on +-y). The quadrature is
    exact for products of spherical harmonics up to degree l_max each when res_beta >= 2(l_max+1)
    and res_alpha >= 2 l_max + 1. The points cluster at the poles, so an unweighted point-wise sum
    (attention) is biased; use the weights.

    Args:
        l_max: maximum degree L >= 0.
        res_beta: number of latitudes, even; default 2(L+1).
        res_alpha: number of longitudes; default 2L+1.

    Returns:
        PointSet with (res_beta * res_alpha, 3) points (beta-major) and weights summing to 4 pi.
    """
    if l_max < 0:
        raise ValueError(f"lat_long: l_max must be >= 0, got {l_max}")
    res_beta = 2 * (l_max + 1) if res_beta is None else int(res_beta)
    res_alpha = 2 * l_max + 1 if res_alpha is None else int(res_alpha)
    if res_beta < 2 or res_beta % 2:
        raise ValueError(f"lat_long: res_beta must be even and >= 2, got {res_beta}")
    if res_alpha < 1:
        raise ValueError(f"lat_long: res_alpha must be >= 1, got {res_alpha}")
    beta = math.pi * (np.arange(res_beta, dtype=np.float64) + 0.5) / res_beta
    alpha = 2.0 * math.pi * np.arange(res_alpha, dtype=np.float64) / res_alpha
    b, a = np.meshgrid(beta, alpha, indexing="ij")
    pts = np.stack([np.sin(b) * np.sin(a), np.cos(b), np.sin(b) * np.cos(a)], axis=-1).reshape(-1, 3)
    w_beta = _kostelec_rockmore_weights(res_beta)
    w = np.repeat(w_beta, res_alpha)
    return PointSet(pts, w * (4.0 * math.pi / w.sum()))
