"""Per-edge rotation frames and Wigner-D matrices for the SO(2) message block.

The SO(2) (eSCN / EquiformerV2) trick rotates every edge's features into a frame in which the edge
points along the "edge axis" a: the direction on which every real spherical harmonic Y^l_m with
m != 0 vanishes. In that frame SH(r_hat) has m = 0 components only, and the remaining symmetry is
the roll about a, which acts on each (+m, -m) pair as a 2-D rotation by m*phi.

The axis is derived numerically from e3nn (it is +y in e3nn 0.6.0), never hard-coded.

Wigner-D without Euler angles. Because Y(R v) = D(R) Y(v) for every unit v, evaluating the SH at
rotated sample points P and solving against Y(P) gives D exactly (to round-off):

    D^l(R) = Y^l(R P)^T pinv(Y^l(P))^T,

with pinv computed once in float64 and stored as a buffer. This is a polynomial in the entries of
R, so it is smooth and twice differentiable everywhere (no Euler-angle singularity at the poles).

For L <= 2 (the presets' degree) the same polynomial is applied directly: D^1 is linear and D^2
quadratic in the entries of R, so D(R) = c + A_1 vec(R) + A_2 vec(R (x) R) with constant
coefficients. They are fitted once, in float64, to the sampled construction above on random
rotations (the fit is exact to round-off, checked at construction), which replaces the SH
evaluation at E x S rotated points and its backward by two matrix products per call.

Frame choice. Any rotation R_e with R_e r_hat = a will do, because the SO(2) convolution commutes
with the roll about a. :func:`edge_frame` builds R_e from the helper vector e_k, the coordinate
axis least aligned with r_hat (|r_hat . e_k| <= 1/sqrt(3), so the frame is never degenerate). The
helper changes piecewise, which only changes the roll: results of roll-invariant computations are
smooth across the switch.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from e3nn import o3
from torch import Tensor

from est_calc.geometry import random_rotations
from est_calc.sphere.grid import ExactBufferModule, real_sh
from est_calc.sphere.points import fibonacci

__all__ = ["EdgeRotation", "edge_axis", "edge_frame", "roll_about_axis", "so2_index", "WignerD"]


@lru_cache(maxsize=None)
def _edge_axis_np() -> tuple[float, float, float]:
    """Find the signed coordinate axis along which all m != 0 real SH vanish (e3nn convention)."""
    l_max = 4
    m_zero = [l * l + l for l in range(l_max + 1)]
    found = []
    for k in range(3):
        v = torch.zeros(1, 3, dtype=torch.float64)
        v[0, k] = 1.0
        y = o3.spherical_harmonics(list(range(l_max + 1)), v, normalize=True,
                                   normalization="component")[0]
        off = y.clone()
        off[m_zero] = 0.0
        if float(off.abs().max()) < 1e-12:
            # Choose the sign that makes Y^1_0 positive (either sign would work).
            sign = 1.0 if float(y[2]) > 0 else -1.0
            found.append(tuple(sign * float(c) for c in v[0]))
    if len(found) != 1:
        raise RuntimeError(f"could not identify the e3nn m=0 axis (candidates {found})")
    return found[0]


def edge_axis(dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """Unit vector a (3,) with Y^l_m(a) = 0 for all m != 0, derived from e3nn (y in e3nn 0.6.0)."""
    return torch.tensor(_EDGE_AXIS, dtype=dtype, device=device)


@lru_cache(maxsize=None)
def _axis_basis_np() -> np.ndarray:
    """Fixed rotation B (3, 3) with B e_y = a (columns b1, a, b3 right-handed)."""
    a = np.array(_edge_axis_np())
    k = int(np.argmax(np.abs(a)))
    b1 = np.zeros(3)
    b1[(k + 1) % 3] = 1.0
    b3 = np.cross(b1, a)
    basis = np.stack([b1, a, b3], axis=1)
    assert abs(np.linalg.det(basis) - 1.0) < 1e-12
    return basis


def edge_frame(edge_vec: Tensor, basis: Tensor | None = None) -> Tensor:
    """Rotations R_e (E, 3, 3) with R_e r_hat_e = a (the edge axis), differentiable in edge_vec.

    Args:
        edge_vec: (E, 3) edge vectors r_ij in Å (any positive length; zero-length vectors are
            clamped to 1e-12 Å instead of producing NaN).
        basis: the fixed rotation B (3, 3) with B e_y = a in edge_vec's dtype and device
            (:class:`EdgeRotation` keeps it as a buffer); built from constants when None.

    Returns:
        (E, 3, 3) proper rotation matrices, same dtype/device as edge_vec.
    """
    if edge_vec.dim() != 2 or edge_vec.shape[1] != 3:
        raise ValueError(f"edge_frame: edge_vec must have shape (E, 3), got {tuple(edge_vec.shape)}")
    r = edge_vec / edge_vec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    # Helper: the coordinate axis least aligned with r (an index choice, not a differentiable path).
    k = r.detach().abs().argmin(dim=1)
    helper = torch.nn.functional.one_hot(k, 3).to(r.dtype)
    u = helper - (helper * r).sum(dim=1, keepdim=True) * r
    u = u / u.norm(dim=1, keepdim=True)          # |u| >= sqrt(2/3): never degenerate
    w = torch.linalg.cross(u, r, dim=1)
    frame = torch.stack([u, r, w], dim=1)        # rows (u, r, w): maps r -> e_y, det = +1
    if basis is None:
        basis = torch.tensor(_AXIS_BASIS, dtype=r.dtype, device=r.device)
    return basis @ frame


# Plain Python constants, fixed at import: the forward pass reads them without calling into
# e3nn or numpy, which keeps it traceable by torch.compile in one graph.
_EDGE_AXIS: tuple[float, float, float] = _edge_axis_np()
_AXIS_BASIS: tuple[tuple[float, ...], ...] = tuple(tuple(row) for row in _axis_basis_np().tolist())


def roll_about_axis(angle: Tensor) -> Tensor:
    """Rotations (E, 3, 3) by ``angle`` (E,) radians about the edge axis a (Rodrigues formula)."""
    a = edge_axis(angle.dtype, angle.device)
    cross = torch.zeros(3, 3, dtype=angle.dtype, device=angle.device)
    cross[0, 1], cross[0, 2], cross[1, 2] = -a[2], a[1], -a[0]
    cross = cross - cross.T
    c, s = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    eye = torch.eye(3, dtype=angle.dtype, device=angle.device)
    return eye + s * cross + (1.0 - c) * (cross @ cross)


def so2_index(l_max: int, m_max: int) -> Tensor:
    """Flat e3nn indices (K_M,) of the coefficients kept in the edge frame, |m| <= m_max.

    Order: m = 0 for l = 0..L; then for m = 1..M: +m for l = m..L, followed by -m for l = m..L.
    K_M = (L+1) + sum_{m=1..M} 2 (L-m+1).
    """
    if l_max < 0 or m_max < 0:
        raise ValueError(f"so2_index: need l_max >= 0 and m_max >= 0, got {l_max}, {m_max}")
    m_max = min(m_max, l_max)
    idx = [l * l + l for l in range(l_max + 1)]
    for m in range(1, m_max + 1):
        idx += [l * l + l + m for l in range(m, l_max + 1)]
        idx += [l * l + l - m for l in range(m, l_max + 1)]
    return torch.tensor(idx, dtype=torch.long)


class WignerD(ExactBufferModule):
    """Wigner-D rows D(R)[rows, :] for a batch of rotations, by SH evaluation at rotated points.

    Args:
        l_max: maximum degree L.
        rows: (R,) flat e3nn indices of the output rows to compute (e.g. :func:`so2_index`);
            None gives the full block-diagonal (K, K) matrix.
        n_points: number of sample points (Fibonacci lattice); default (L+1)^2 (the per-degree
            blocks Y^l(P) then have condition numbers below 4 for L <= 8).

    Call: ``D = wigner(rot)`` with rot (E, 3, 3) proper rotations -> D (E, R, K) such that
    Y(rot v)[rows] = D Y(v) for every unit v. Features rotate as x -> D x along the K axis.
    """

    def __init__(self, l_max: int, rows: Tensor | None = None, n_points: int | None = None):
        super().__init__()
        if l_max < 0:
            raise ValueError(f"WignerD: l_max must be >= 0, got {l_max}")
        k = (l_max + 1) ** 2
        n_points = k if n_points is None else int(n_points)
        if n_points < 2 * l_max + 1:
            raise ValueError(f"WignerD: need n_points >= 2L+1 = {2 * l_max + 1}, got {n_points}")
        self.l_max = l_max
        self.sh = o3.SphericalHarmonics(list(range(l_max + 1)), normalize=False, normalization="component")
        rows = torch.arange(k) if rows is None else torch.as_tensor(rows, dtype=torch.long)
        if rows.dim() != 1 or (rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= k)):
            raise ValueError(f"WignerD: rows must be a 1-D index into 0..{k - 1}")
        points = fibonacci(n_points).points
        y = real_sh(l_max, points)                                  # (S, K) float64
        # a_cat[:, block l] = pinv(Y^l(P))^T, so D^l = Y^l(R P)^T a_cat[:, block l].
        a_cat = np.zeros_like(y)
        for l in range(l_max + 1):
            blk = slice(l * l, (l + 1) ** 2)
            if np.linalg.cond(y[:, blk]) > 1e4:
                raise ValueError(f"WignerD: sample points too poorly conditioned for l = {l}")
            a_cat[:, blk] = np.linalg.pinv(y[:, blk]).T
        deg = np.repeat(np.arange(l_max + 1), 2 * np.arange(l_max + 1) + 1)
        rows_np = rows.numpy()
        self.register_buffer("rows", rows, persistent=False)
        self.register_exact_buffer("points", points)
        self.register_exact_buffer("a_cat", a_cat)
        self.register_exact_buffer("mask", (deg[rows_np][:, None] == deg[None, :]).astype(np.float64))
        self.polynomial = l_max <= 2
        coeffs = self._fit_polynomial() if self.polynomial else (None, None, None)
        for name, value in zip(("poly_const", "poly_lin", "poly_quad"), coeffs):
            self.register_exact_buffer(name, value)

    def _fit_polynomial(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Constant (R*K,), linear (9, R*K) and quadratic (81, R*K) float64 coefficients with
        D(R).flatten() = c + vec(R) A_1 + vec(R (x) R) A_2 for every rotation R (L <= 2)."""
        rot = random_rotations(256, torch.float64, generator=torch.Generator().manual_seed(12345))
        target = self._sampled(rot, torch.float64).flatten(1).numpy()       # (n, R*K)
        feats = self._features(rot).numpy()                                  # (n, 1 + 9 [+ 81])
        coef, *_ = np.linalg.lstsq(feats, target, rcond=None)
        residual = np.abs(feats @ coef - target).max()
        if residual > 1e-10:
            raise RuntimeError(f"WignerD: polynomial fit of D(R) failed (residual {residual:.1e})")
        coef[np.abs(coef) < 1e-13] = 0.0
        quad = coef[10:] if self.l_max == 2 else None
        return coef[0], coef[1:10], quad

    def _features(self, rot: Tensor) -> Tensor:
        """(E, 1 + 9 [+ 81]) monomials of degree <= min(L, 2) in the entries of rot."""
        parts = [rot.new_ones(rot.shape[0], 1), rot.flatten(1)]
        if self.l_max == 2:
            parts.append(self._kron(rot))
        return torch.cat(parts, dim=1)

    @staticmethod
    def _kron(rot: Tensor) -> Tensor:
        """(E, 81) products R_ac R_bd of all pairs of entries (the entries of R (x) R, in the order
        of the outer product of vec(R) with itself: a broadcast of two contiguous rows, which is
        several times faster than building the Kronecker layout)."""
        r9 = rot.reshape(-1, 9)
        return (r9.unsqueeze(2) * r9.unsqueeze(1)).flatten(1)

    def _sampled(self, rot: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """The general construction (any L): SH at the rotated sample points."""
        dtype = rot.dtype if dtype is None else dtype
        if dtype == torch.float64:
            points, a_cat, mask = (self.master(n) for n in ("points", "a_cat", "mask"))
            points, a_cat, mask = (t.to(rot.device) for t in (points, a_cat, mask))
        else:
            points, a_cat, mask = (t.to(dtype) for t in (self.points, self.a_cat, self.mask))
        pts = torch.einsum("eij,sj->esi", rot, points)
        # Rotated unit vectors stay unit, so no renormalisation is needed.
        y = self.sh(pts)                                                # (E, S, K)
        y = y.index_select(2, self.rows)
        d = torch.einsum("esr,sk->erk", y, a_cat)
        return d * mask

    def forward(self, rot: Tensor) -> Tensor:
        """rot (E, 3, 3) -> D (E, R, K) in rot's dtype."""
        if rot.dim() != 3 or rot.shape[1:] != (3, 3):
            raise ValueError(f"WignerD: rot must have shape (E, 3, 3), got {tuple(rot.shape)}")
        if not self.polynomial:
            return self._sampled(rot)
        n_rows, k = self.rows.numel(), (self.l_max + 1) ** 2
        const, lin = self.poly_const.to(rot.dtype), self.poly_lin.to(rot.dtype)
        d = torch.addmm(const, rot.reshape(-1, 9), lin)
        if self.poly_quad is not None:
            d = torch.addmm(d, self._kron(rot), self.poly_quad.to(rot.dtype))
        return d.view(-1, n_rows, k)

    def extra_repr(self) -> str:
        return f"l_max={self.l_max}, rows={self.rows.numel()}, n_points={self.points.shape[0]}"



class EdgeRotation(ExactBufferModule):
    """Wigner-D rows into each edge's frame: D(R_e)[rows, :] (E, K_M, K) for the rows |m| <= M of
    :func:`so2_index`, with R_e = :func:`edge_frame` (R_e r_hat_e = a).

    Depends on the edges only, so a model computes it once per call for every SO(2) block
    (``EdgeFeatures.rotation``). Features rotate into the edge frame as z = D x along K.

    Args:
        l_max: maximum degree L.
        m_max: maximum order M (<= L).
    """

    def __init__(self, l_max: int, m_max: int):
        super().__init__()
        if not 0 <= m_max <= l_max:
            raise ValueError(f"EdgeRotation: need 0 <= m_max <= l_max, got {m_max}, {l_max}")
        self.l_max, self.m_max = l_max, m_max
        self.wigner = WignerD(l_max, rows=so2_index(l_max, m_max))
        self.register_exact_buffer("axis_basis", _axis_basis_np())

    @property
    def n_rows(self) -> int:
        """K_M, the number of rows kept in the edge frame."""
        return int(self.wigner.rows.numel())

    def forward(self, edge_vec: Tensor) -> Tensor:
        """edge_vec (E, 3) Å -> Wigner rows (E, K_M, K) in edge_vec's dtype."""
        return self.wigner(edge_frame(edge_vec, self.axis_basis))

    def extra_repr(self) -> str:
        return f"l_max={self.l_max}, m_max={self.m_max}"
