"""Input checking and the shared lattice helpers used by every neighbour-list backend.

All backends receive a :class:`Prepared` problem: float64 positions and cells, a boolean pbc mask
per system and an explicit ``system_idx``. Checking happens once, here, so every backend rejects
the same bad inputs with the same messages.

Cells the search cannot handle in bounded time are refused before any backend runs
(:func:`cell_problem`). Let h_k = V / |a_i x a_j| be the distance between the two faces of the cell
opposite lattice vector a_k (its perpendicular height). Every backend has to look through

    n_images = prod over periodic axes k of (2 ceil(cutoff / h_k) + 1)

periodic images of each atom (the cell list, vesin and matscipy alike: their work and memory grow
with it), and a 3-D periodic cell with N atoms and volume V gives about

    n_pairs / N = N (4/3) pi cutoff^3 / V

neighbours per atom. A cell is refused when n_images > :data:`MAX_PERIODIC_IMAGES` (2^18) or
n_pairs / N > :data:`MAX_NEIGHBORS_PER_ATOM` (10^5). Neither bound is reached by a physical
structure: solids hold at most about 0.2 atoms per Å^3 (diamond 0.18; solid hydrogen nears 0.8
only at several hundred GPa), so even at 1 atom per Å^3 and a 20 Å cutoff an atom has about
3.4e4 neighbours; a reduced one-atom cell of such matter has heights of about 0.9 V^(1/3) (fcc,
bcc and simple cubic alike), 0.9 Å, which at 20 Å needs 47^3 = 103,823 images (a one-atom fcc
primitive Cu cell needs 7^3 = 343 at 6 Å and 13^3 = 2,197 at 12 Å; a cell with every height
above the cutoff 27). A nearly singular cell, a cell given in the wrong units or a strongly
skewed description of an ordinary lattice does reach them; the message names the smallest height
and the cutoff.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["Prepared", "prepare", "completed_basis", "cell_heights", "cell_problem",
           "degenerate_cells", "empty_result", "MAX_PERIODIC_IMAGES", "MAX_NEIGHBORS_PER_ATOM"]

# Relative tolerance below which a set of periodic lattice vectors is treated as degenerate.
_DEGENERATE_RTOL = 1e-10

#: Most periodic images of an atom a neighbour search may need (see the module docstring).
MAX_PERIODIC_IMAGES = 2**18

#: Most neighbours per atom a 3-D periodic cell may be expected to give (module docstring).
MAX_NEIGHBORS_PER_ATOM = 10**5


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
            non-finite cutoff, a system index out of range, a periodic direction whose
            lattice vectors are zero or linearly dependent (zero volume), or a cell too thin or
            too dense for the cutoff (:func:`cell_problem`; the message starts with
            "system <index>:").
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
    pbc = pbc.contiguous()
    cell_np, pbc_np = cell64.cpu().numpy(), pbc.cpu().numpy()  # one small copy, one sync
    problem = _lattice_report(
        cell_np, pbc_np, cutoff, n,
        lambda: torch.bincount(system_idx, minlength=n_sys).cpu().numpy(),
    )
    if problem is not None:
        raise ValueError(f"system {problem[0]}: {problem[1]}")
    return Prepared(pos64, cell64, pbc, system_idx, cutoff, n_sys)


def cell_problem(cell, pbc, cutoff_A: float, atoms_per_system=None) -> tuple[int, str] | None:
    """The first system whose cell no neighbour search should be asked to handle, and why.

    A periodic cell is refused when a periodic lattice vector is zero, the periodic vectors are
    linearly dependent (zero volume), an atom would need more than :data:`MAX_PERIODIC_IMAGES`
    periodic images within ``cutoff_A``, or (3-D periodic cells with ``atoms_per_system``
    given) more than :data:`MAX_NEIGHBORS_PER_ATOM` neighbours are expected per atom; see the
    module docstring for the formulas and why no physical structure reaches the bounds.
    Non-periodic axes are never checked. The heights are closed-form (cross products of the
    periodic vectors), evaluated with NumPy on the host.

    Args:
        cell: (n_systems, 3, 3) or (3, 3) finite lattice vectors as rows, Å (array or tensor).
        pbc: (n_systems, 3) or (3,) booleans.
        cutoff_A: cutoff radius in Å (finite, >= 0).
        atoms_per_system: (n_systems,) atom counts; None skips the neighbour-count estimate.

    Returns:
        None when every cell is fine, else ``(system index, reason)``; the reason is one line
        and, for thin or dense cells, names the smallest perpendicular height and the cutoff.
    """
    cell = _host(cell).astype(np.float64).reshape(-1, 3, 3)
    pbc = np.broadcast_to(_host(pbc).astype(bool), (cell.shape[0], 3))
    if atoms_per_system is None:
        return _lattice_report(cell, pbc, float(cutoff_A), 0, None)
    counts = np.broadcast_to(_host(atoms_per_system).reshape(-1), (cell.shape[0],))
    return _lattice_report(cell, pbc, float(cutoff_A), int(counts.max(initial=0)),
                           lambda: counts)


def degenerate_cells(cell, pbc) -> np.ndarray:
    """(n_systems,) True where the periodic lattice vectors of a cell are degenerate.

    Degenerate: a periodic lattice vector is zero, or the periodic vectors are linearly
    dependent, i.e. the 1-, 2- or 3-D volume V_p they span is at most 1e-10 times the product of
    their lengths. Non-periodic axes are not looked at (pass all-True ``pbc`` to ask for a full
    3-D cell); a cell holding NaN or infinite values is not flagged here (check finiteness
    first). The same test is the first one of :func:`cell_problem`.

    Args:
        cell: (n_systems, 3, 3) or (3, 3) lattice vectors as rows, Å (array or tensor).
        pbc: (n_systems, 3) or (3,) booleans.
    """
    cell = _host(cell).astype(np.float64).reshape(-1, 3, 3)
    pbc = np.broadcast_to(_host(pbc).astype(bool), (cell.shape[0], 3))
    lengths, volume, _ = _periodic_geometry(cell, pbc)
    return _zero_axes(lengths, pbc).any(axis=1) | _flat(lengths, volume, pbc)


def _zero_axes(lengths: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    return pbc & (lengths == 0)


def _flat(lengths: np.ndarray, volume: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return volume <= _DEGENERATE_RTOL * np.prod(np.where(pbc, lengths, 1.0), axis=1)


def _host(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def _ball(cutoff: float) -> float:
    return 4.0 / 3.0 * math.pi * cutoff**3


def _periodic_geometry(cell: np.ndarray, pbc: np.ndarray):
    """Lengths (S, 3), periodic volume (S,) and heights (S, 3) of (S, 3, 3) cells.

    The periodic volume V_p is the 1-, 2- or 3-D volume spanned by the periodic vectors (1 with
    none); the height of periodic axis k is V_p over the volume spanned by the other periodic
    vectors: the distance between the faces opposite a_k, the same as in the basis completed by
    orthonormal non-periodic rows (:func:`completed_basis`). Non-periodic axes get height inf.
    """
    lengths = np.sqrt((cell * cell).sum(axis=2))
    u, v = cell[:, [1, 2, 0]], cell[:, [2, 0, 1]]  # face k is spanned by the other two rows
    normal = u[..., [1, 2, 0]] * v[..., [2, 0, 1]] - u[..., [2, 0, 1]] * v[..., [1, 2, 0]]
    faces = np.sqrt((normal * normal).sum(axis=2))  # (S, 3) area of the face opposite a_k
    volume3 = np.abs((cell[:, 0] * normal[:, 0]).sum(axis=1))
    if pbc.all():
        v_p, v_rest = volume3, faces
    else:
        n_per = pbc.sum(axis=1)
        per_len = (lengths * pbc).sum(axis=1)  # the periodic length(s)
        v_p = np.where(n_per == 3, volume3, np.where(
            n_per == 2, (faces * ~pbc).sum(axis=1), np.where(n_per == 1, per_len, 1.0)))
        v_rest = np.where((n_per == 3)[:, None], faces, np.where(
            (n_per == 2)[:, None], per_len[:, None] - lengths, 1.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        heights = np.where(pbc, v_p[:, None] / v_rest, np.inf)
    return lengths, v_p, heights


def _lattice_report(cell: np.ndarray, pbc: np.ndarray, cutoff: float, most_atoms: int,
                    counts: Callable[[], np.ndarray] | None) -> tuple[int, str] | None:
    """:func:`cell_problem` on host float64 (S, 3, 3) cells and (S, 3) bool pbc.

    ``most_atoms`` bounds every system's atom count; ``counts`` returns the (S,) counts and is
    called only when that bound could put a 3-D periodic system over the neighbour bound.
    """
    lengths, volume, heights = _periodic_geometry(cell, pbc)
    zero = _zero_axes(lengths, pbc)
    flat = zero.any(axis=1) | _flat(lengths, volume, pbc)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        images = np.prod(np.where(pbc, 2 * np.ceil(cutoff / heights) + 1, 1.0), axis=1)
        per_atom = np.where(pbc.all(axis=1), most_atoms * _ball(cutoff) / volume, 0.0)
        if counts is not None and not np.all(per_atom <= MAX_NEIGHBORS_PER_ATOM):
            counts = np.asarray(counts(), dtype=np.float64)
            per_atom = np.where(pbc.all(axis=1), counts * _ball(cutoff) / volume, 0.0)
        else:
            per_atom[:] = 0.0
    bad = flat | ~(images <= MAX_PERIODIC_IMAGES) | ~(per_atom <= MAX_NEIGHBORS_PER_ATOM)
    if not bad.any():
        return None
    s = int(np.flatnonzero(bad)[0])
    where = f"(pbc={pbc[s].tolist()}, cell lengths {np.round(lengths[s], 6).tolist()} Å)"
    if zero[s].any():
        return s, (f"zero-volume periodic cell: periodic axis {int(np.flatnonzero(zero[s])[0])} "
                   f"has a zero lattice vector {where}")
    if flat[s]:
        return s, ("zero-volume periodic cell: the lattice vectors of the periodic axes are "
                   f"linearly dependent {where}")
    k = int(np.argmin(heights[s]))
    thin = (f"smallest perpendicular height {heights[s, k]:.3g} Å (distance between the faces "
            f"opposite lattice vector {k}), cutoff {cutoff:g} Å")
    if not images[s] <= MAX_PERIODIC_IMAGES:
        return s, (f"cell too thin for the cutoff: {thin}; the neighbour search would need "
                   f"{images[s]:.3g} periodic images of each atom, more than the "
                   f"{MAX_PERIODIC_IMAGES:,} any physical structure needs. Check the cell; if it "
                   "is a strongly skewed description of an ordinary lattice, reduce it first "
                   "(ase.build.niggli_reduce(atoms), or ase.geometry.minkowski_reduce)")
    n, vol = int(counts[s]), float(volume[s])
    return s, (f"cell too dense for the cutoff: {n} atoms in {vol:.3g} Å^3 ({n / vol:.3g} "
               f"atoms per Å^3) would give about {per_atom[s]:.3g} neighbours per atom within the "
               f"cutoff, more than the {MAX_NEIGHBORS_PER_ATOM:,} any physical structure has; "
               f"{thin}. Check the cell (lengths in Å) and the positions")


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
