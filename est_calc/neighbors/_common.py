"""Input checking and the shared lattice helpers used by every neighbour-list backend.

All backends receive a :class:`Prepared` problem: float64 positions and cells, a boolean pbc mask
per system and an explicit ``system_idx``. Checking happens once, here, so every backend rejects
the same bad inputs with the same messages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Prepared", "prepare", "completed_basis", "empty_result"]

# Relative tolerance below which a set of periodic lattice vectors is treated as degenerate.
_DEGENERATE_RTOL = 1e-10


@dataclass(frozen=True)
class Prepared:
    """A checked neighbour-list problem.

    Attributes:
        positions: (n_atoms, 3) float64 Cartesian positions in Å.
        cell: (n_systems, 3, 3) float64 lattice vectors as rows, Å.
        pbc: (n_systems, 3) bool.
        system_idx: (n_atoms,) int64 in [0, n_systems).
        cutoff: cutoff radius in Å (finite, >= 0).
        n_systems: number of systems.
    """

    positions: Tensor
    cell: Tensor
    pbc: Tensor
    system_idx: Tensor
    cutoff: float
    n_systems: int

    @property
    def n_atoms(self) -> int:
        return int(self.positions.shape[0])

    @property
    def device(self) -> torch.device:
        return self.positions.device


def empty_result(device: torch.device) -> tuple[Tensor, Tensor]:
    """Empty ``(edge_index (2, 0), shifts (0, 3))`` int64 tensors on ``device``."""
    return (
        torch.zeros((2, 0), dtype=torch.int64, device=device),
        torch.zeros((0, 3), dtype=torch.int64, device=device),
    )


def prepare(positions, cell, pbc, cutoff_A, system_idx=None) -> Prepared:
    """Check a neighbour-list request and bring it to one canonical form.

    Args:
        positions: (n_atoms, 3) floating tensor, Å.
        cell: (3, 3) or (n_systems, 3, 3) floating tensor, rows are lattice vectors, Å.
        pbc: (3,) or (n_systems, 3) booleans.
        cutoff_A: cutoff radius in Å.
        system_idx: (n_atoms,) integer tensor of system indices; required when n_systems > 1.

    Returns:
        The checked :class:`Prepared` problem on the device of ``positions``.

    Raises:
        ValueError: wrong shapes or dtypes, NaN / infinite positions or cell, a negative or
            non-finite cutoff, a system index out of range, or a periodic direction whose
            lattice vectors are zero or linearly dependent (zero volume).
    """
    if not isinstance(positions, Tensor):
        raise ValueError(f"positions must be a torch.Tensor, got {type(positions).__name__}")
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must be (n_atoms, 3), got {tuple(positions.shape)}")
    if not positions.is_floating_point():
        raise ValueError(f"positions must be floating point, got {positions.dtype}")
    device = positions.device
    try:
        cutoff = float(cutoff_A)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cutoff_A must be a number, got {cutoff_A!r}") from exc
    if not math.isfinite(cutoff) or cutoff < 0:
        raise ValueError(f"cutoff_A must be finite and >= 0, got {cutoff_A!r}")

    cell = torch.as_tensor(cell, device=device)
    if cell.ndim == 2:
        cell = cell.unsqueeze(0)
    if cell.ndim != 3 or cell.shape[1:] != (3, 3):
        raise ValueError(f"cell must be (3, 3) or (n_systems, 3, 3), got {tuple(cell.shape)}")
    n_sys = int(cell.shape[0])
    if n_sys == 0:
        raise ValueError("cell must describe at least one system, got shape (0, 3, 3)")
    pbc = torch.as_tensor(pbc, device=device)
    if pbc.dtype != torch.bool:
        pbc = pbc != 0
    if pbc.shape == (3,):
        pbc = pbc.unsqueeze(0).expand(n_sys, 3)
    if pbc.shape != (n_sys, 3):
        raise ValueError(f"pbc must be (3,) or ({n_sys}, 3), got {tuple(pbc.shape)}")

    n = int(positions.shape[0])
    if system_idx is None:
        if n_sys != 1:
            raise ValueError(f"system_idx is required when cell holds {n_sys} systems")
        system_idx = torch.zeros(n, dtype=torch.int64, device=device)
    else:
        system_idx = torch.as_tensor(system_idx, device=device)
        if system_idx.shape != (n,):
            raise ValueError(
                f"system_idx must be ({n},) to match positions, got {tuple(system_idx.shape)}"
            )
        if system_idx.is_floating_point() or system_idx.dtype == torch.bool:
            raise ValueError(f"system_idx must be an integer tensor, got {system_idx.dtype}")
        system_idx = system_idx.to(torch.int64)
        if n > 0 and (int(system_idx.min()) < 0 or int(system_idx.max()) >= n_sys):
            raise ValueError(f"system_idx values must lie in [0, {n_sys})")

    pos64 = positions.detach().to(torch.float64)
    cell64 = cell.detach().to(device=device, dtype=torch.float64)
    if n > 0 and not bool(torch.isfinite(pos64).all()):
        raise ValueError("positions contain NaN or infinite values")
    if not bool(torch.isfinite(cell64).all()):
        raise ValueError("cell contains NaN or infinite values")
    _check_periodic_volume(cell64, pbc)
    return Prepared(pos64, cell64, pbc.contiguous(), system_idx, cutoff, n_sys)


def _check_periodic_volume(cell: Tensor, pbc: Tensor) -> None:
    """Raise ValueError when a periodic direction has a zero or dependent lattice vector."""
    norms = cell.norm(dim=-1)  # (S, 3)
    zero = pbc & (norms == 0)
    if bool(zero.any()):
        s, ax = (int(v) for v in torch.nonzero(zero)[0])
        raise ValueError(
            f"system {s}: periodic axis {ax} has a zero lattice vector (zero cell volume)"
        )
    basis = completed_basis(cell, pbc)
    det = torch.linalg.det(basis).abs()
    scale = torch.where(pbc, norms, torch.ones_like(norms)).prod(dim=-1)
    bad = det <= _DEGENERATE_RTOL * scale
    if bool(bad.any()):
        s = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"system {s}: the lattice vectors of the periodic axes are linearly dependent "
            "(zero cell volume in the periodic directions)"
        )


def completed_basis(cell: Tensor, pbc: Tensor) -> Tensor:
    """Lattice basis in which non-periodic rows are replaced by an orthonormal complement.

    Periodic rows are kept as they are. Non-periodic rows become unit vectors orthogonal to
    every periodic lattice vector and to each other, so the coordinate of a point along a
    non-periodic row is a plain Cartesian length (height 1 per unit). Shifts along
    non-periodic axes are always zero, so the choice does not change any result.

    Args:
        cell: (n_systems, 3, 3) float64 cells, rows are lattice vectors.
        pbc: (n_systems, 3) bool.

    Returns:
        (n_systems, 3, 3) float64 basis, rows are basis vectors.
    """
    per = cell * pbc.unsqueeze(-1).to(cell.dtype)  # non-periodic rows zeroed
    proj = torch.linalg.pinv(per) @ per  # projector onto the periodic span
    eye = torch.eye(3, dtype=cell.dtype, device=cell.device).expand_as(proj)
    _, vecs = torch.linalg.eigh(eye - proj)  # eigenvalue 1 vectors come last
    n_np = (~pbc).sum(dim=-1, keepdim=True)  # (S, 1)
    rank_np = torch.cumsum((~pbc).to(torch.int64), dim=-1) - 1  # index among non-periodic
    col = (3 - n_np + rank_np).clamp(0, 2)  # (S, 3) eigenvector column for each row
    comp = torch.gather(vecs.transpose(-1, -2), 1, col.unsqueeze(-1).expand(-1, 3, 3))
    return torch.where(pbc.unsqueeze(-1), cell, comp)


def cell_heights(basis: Tensor) -> Tensor:
    """Distance between neighbouring lattice planes along each basis row.

    Args:
        basis: (n_systems, 3, 3) non-degenerate bases (rows).

    Returns:
        (n_systems, 3) heights in Å: volume / |a_j x a_k|.
    """
    vol = torch.linalg.det(basis).abs()
    a, b, c = basis[:, 0], basis[:, 1], basis[:, 2]
    areas = torch.stack(
        [torch.linalg.cross(b, c).norm(dim=-1), torch.linalg.cross(c, a).norm(dim=-1),
         torch.linalg.cross(a, b).norm(dim=-1)],
        dim=-1,
    )
    return vol.unsqueeze(-1) / areas
