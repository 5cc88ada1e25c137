"""SphericalGrid: forward (coefficients -> grid) and inverse (grid -> coefficients) transforms.

The matrices are computed once in float64 and stored as non-persistent buffers. A float64 master
copy is kept on the module, and every dtype/device cast re-derives the buffers from it, so
``grid.to(torch.float64)`` after a float32 construction is exact to float64 round-off, not to the
float32 round-off of the earlier copy. The buffers are not part of ``state_dict``: they follow from
the constructor arguments (l_max, points, weights, inverse), which the model config records.

Transforms (EST_SPEC.md section 4), with Y[s, i] = Y_i(p_s) in e3nn "component" normalisation:

=====================  ========================  ==================================  =========
inverse                to_grid matrix (S, K)     from_grid matrix (K, S)             exact?
=====================  ========================  ==================================  =========
"lstsq", no weights    Y                         pinv(Y) = (Y^T Y)^-1 Y^T            yes
"lstsq", weights w     Y                         (Y^T W Y)^-1 Y^T W                  yes
"normalized_transpose" Yhat = Y diag(1/|Y_i|)    Yhat^T (paper eq. 12, author code)  no
=====================  ========================  ==================================  =========

"Exact" means from_grid(to_grid(x)) == x for every x of degree <= L (needs S >= K and Y of full
column rank). With exact quadrature weights (Lebedev of degree >= 2L, lat/long) the weighted
least-squares inverse equals the quadrature Y^T W / (4 pi).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from e3nn import o3
from torch import Tensor, nn

from est_calc.sphere.points import fibonacci, fibonacci_poles, lat_long, lebedev, lebedev_degrees

__all__ = ["ExactBufferModule", "SphericalGrid", "make_grid", "real_sh", "GRID_KINDS"]

GRID_KINDS = ("fibonacci", "fibonacci_poles", "lebedev", "lat_long")
_INVERSES = ("lstsq", "normalized_transpose")


def real_sh(l_max: int, points: np.ndarray | Tensor) -> np.ndarray:
    """Real spherical harmonics Y (S, K) in float64, e3nn order and "component" normalisation.

    Args:
        l_max: maximum degree L.
        points: (S, 3) unit vectors.
    """
    pts = torch.as_tensor(np.asarray(points, dtype=np.float64))
    y = o3.spherical_harmonics(list(range(l_max + 1)), pts, normalize=True, normalization="component")
    return y.numpy()


class ExactBufferModule(nn.Module):
    """nn.Module whose floating buffers are re-derived from float64 master copies on every cast.

    Register buffers with :meth:`register_exact_buffer`; they are created in the torch default
    dtype, are non-persistent, and after ``.to(dtype/device)`` hold the float64 master rounded once
    to the new dtype.
    """

    def __init__(self) -> None:
        super().__init__()
        self._exact_masters: dict[str, Tensor] = {}

    def register_exact_buffer(self, name: str, value: np.ndarray | Tensor | None) -> None:
        """Register ``value`` (computed in float64) as a non-persistent buffer ``name``."""
        if value is None:
            self.register_buffer(name, None, persistent=False)
            return
        master = torch.as_tensor(np.asarray(value, dtype=np.float64)).clone()
        self._exact_masters[name] = master
        self.register_buffer(name, master.to(torch.get_default_dtype()), persistent=False)

    def master(self, name: str) -> Tensor:
        """The float64 CPU master copy of exact buffer ``name`` (read-only use)."""
        return self._exact_masters[name]

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        for name, master in self._exact_masters.items():
            current = self._buffers.get(name)
            if current is not None:
                self._buffers[name] = master.to(device=current.device, dtype=current.dtype)
        return result


class SphericalGrid(ExactBufferModule):
    """Sample points with forward/inverse spherical transforms as buffers.

    Args:
        l_max: maximum degree L; K = (L+1)^2 coefficients.
        points: (S, 3) unit vectors (normalised here).
        weights: optional (S,) positive quadrature weights (rescaled to sum 4 pi); they enter the
            weighted least-squares inverse and the attention logits as log w.
        inverse: "lstsq" (exact, default) or "normalized_transpose" (paper eq. 12, inexact).

    Attributes:
        l_max, n_points (S), n_coeffs (K), inverse.
        points: buffer (S, 3).
        to_grid_matrix: buffer (S, K).
        from_grid_matrix: buffer (K, S).
        log_weights: buffer (S,) or None.
    """

    def __init__(self, l_max: int, points, weights=None, inverse: str = "lstsq") -> None:
        super().__init__()
        if isinstance(l_max, bool) or not isinstance(l_max, (int, np.integer)) or l_max < 0:
            raise ValueError(f"SphericalGrid: l_max must be an integer >= 0, got {l_max!r}")
        if inverse not in _INVERSES:
            raise ValueError(f"SphericalGrid: inverse must be one of {_INVERSES}, got {inverse!r}")
        pts = np.asarray(points.detach().cpu() if isinstance(points, Tensor) else points, np.float64)
        if pts.ndim != 2 or pts.shape[1] != 3 or pts.shape[0] < 1:
            raise ValueError(f"SphericalGrid: points must have shape (S, 3), got {pts.shape}")
        if not np.all(np.isfinite(pts)):
            raise ValueError("SphericalGrid: points contain NaN or inf")
        norms = np.linalg.norm(pts, axis=1, keepdims=True)
        if np.any(norms < 1e-12):
            raise ValueError("SphericalGrid: points contain a zero vector")
        pts = pts / norms
        self.l_max = int(l_max)
        self.n_points = pts.shape[0]
        self.n_coeffs = (self.l_max + 1) ** 2
        self.inverse = inverse
        w = None
        if weights is not None:
            w = np.asarray(weights.detach().cpu() if isinstance(weights, Tensor) else weights,
                           np.float64)
            if w.shape != (self.n_points,):
                raise ValueError(f"SphericalGrid: weights must have shape ({self.n_points},), "
                                 f"got {w.shape}")
            if not np.all(np.isfinite(w)) or np.any(w <= 0):
                raise ValueError("SphericalGrid: weights must be finite and strictly positive")
            w = w * (4.0 * math.pi / w.sum())

        y = real_sh(self.l_max, pts)
        if inverse == "lstsq":
            to_grid, from_grid = y, self._least_squares(y, w)
        else:
            y_hat = y / np.linalg.norm(y, axis=0, keepdims=True)
            to_grid, from_grid = y_hat, y_hat.T
        self.register_exact_buffer("points", pts)
        self.register_exact_buffer("to_grid_matrix", to_grid)
        self.register_exact_buffer("from_grid_matrix", np.ascontiguousarray(from_grid))
        self.register_exact_buffer("log_weights", None if w is None else np.log(w))

    def _least_squares(self, y: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        s, k = y.shape
        if s < k:
            raise ValueError(
                f"SphericalGrid: the least-squares inverse needs S >= K = (L+1)^2 = {k} points, "
                f"got S = {s}; use more points or inverse='normalized_transpose'"
            )
        a = y if w is None else np.sqrt(w)[:, None] * y
        sv = np.linalg.svd(a, compute_uv=False)
        if sv[-1] < 1e-9 * sv[0]:
            raise ValueError(
                f"SphericalGrid: the points do not determine degree-{self.l_max} harmonics "
                f"(rank-deficient Y, condition {sv[0] / max(sv[-1], 1e-300):.1e}); use more or "
                f"less symmetric points"
            )
        pinv = np.linalg.pinv(a, rcond=1e-12)  # (K, S)
        return pinv if w is None else pinv * np.sqrt(w)[None, :]

    def to_grid(self, x: Tensor) -> Tensor:
        """Evaluate coefficients on the grid: [..., K, C] -> [..., S, C]."""
        if x.dim() < 2 or x.shape[-2] != self.n_coeffs:
            raise ValueError(f"to_grid: expected [..., K={self.n_coeffs}, C], got {tuple(x.shape)}")
        return torch.einsum("sk,...kc->...sc", self.to_grid_matrix, x)

    def from_grid(self, f: Tensor) -> Tensor:
        """Project grid values back to coefficients: [..., S, C] -> [..., K, C]."""
        if f.dim() < 2 or f.shape[-2] != self.n_points:
            raise ValueError(f"from_grid: expected [..., S={self.n_points}, C], got {tuple(f.shape)}")
        return torch.einsum("ks,...sc->...kc", self.from_grid_matrix, f)

    def extra_repr(self) -> str:
        return (f"l_max={self.l_max}, n_points={self.n_points}, inverse={self.inverse!r}, "
                f"weighted={self.log_weights is not None}")


def _default_lebedev_degree(l_max: int) -> int:
    for d in lebedev_degrees():
        if d >= 2 * l_max and len(lebedev(d).points) >= (l_max + 1) ** 2:
            return d
    raise ValueError(f"make_grid: no Lebedev rule of degree >= {2 * l_max} is available")


def make_grid(kind: str = "fibonacci", l_max: int = 4, n_points: int | None = None,
              inverse: str = "lstsq") -> SphericalGrid:
    """Build a :class:`SphericalGrid` by name.

    Args:
        kind: "fibonacci" (offset lattice, default), "fibonacci_poles" (author-code lattice),
            "lebedev" (exact quadrature, weighted) or "lat_long" (e3nn grid, weighted).
        l_max: maximum degree L.
        n_points: S for the Fibonacci kinds (default (2L+1)(2L+2)); the rule degree for "lebedev"
            (default: the smallest positive-weight degree >= 2L); must be None for "lat_long"
            (2(L+1) x (2L+1) points).
        inverse: "lstsq" or "normalized_transpose".
    """
    if kind not in GRID_KINDS:
        raise ValueError(f"make_grid: kind must be one of {GRID_KINDS}, got {kind!r}")
    if isinstance(l_max, bool) or not isinstance(l_max, (int, np.integer)) or l_max < 0:
        raise ValueError(f"make_grid: l_max must be an integer >= 0, got {l_max!r}")
    if kind in ("fibonacci", "fibonacci_poles"):
        n = (2 * l_max + 1) * (2 * l_max + 2) if n_points is None else n_points
        ps = fibonacci(n) if kind == "fibonacci" else fibonacci_poles(n)
    elif kind == "lebedev":
        ps = lebedev(_default_lebedev_degree(l_max) if n_points is None else n_points)
    else:
        if n_points is not None:
            raise ValueError("make_grid: n_points is fixed by l_max for kind='lat_long'; pass None")
        ps = lat_long(l_max)
    return SphericalGrid(l_max, ps.points, ps.weights, inverse=inverse)
