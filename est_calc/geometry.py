"""Pure geometry functions: edge vectors, strain, volumes. No module state, no globals."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["edge_vectors", "cell_volume", "apply_strain", "symmetrize", "random_rotations"]


def edge_vectors(
    positions: Tensor, cell: Tensor, edge_index: Tensor, shifts: Tensor, system_idx: Tensor
) -> Tensor:
    """r_ij = pos[j] - pos[i] + shifts_ij @ cell[system of i], shape (n_edges, 3), Å.

    Args:
        positions: (n_atoms, 3).
        cell: (n_systems, 3, 3), rows are lattice vectors.
        edge_index: (2, n_edges) int64, rows (i, j) as ase.neighborlist.neighbor_list("ij").
        shifts: (n_edges, 3) integer image offsets (ASE's "S").
        system_idx: (n_atoms,) int64.
    """
    i, j = edge_index[0], edge_index[1]
    offset = torch.einsum("ea,eab->eb", shifts.to(positions.dtype), cell[system_idx[i]])
    return positions[j] - positions[i] + offset


def cell_volume(cell: Tensor) -> Tensor:
    """|det(cell)| per system, shape (n_systems,), Å^3."""
    return torch.linalg.det(cell).abs()


def symmetrize(strain: Tensor) -> Tensor:
    """0.5 (e + e^T) over the last two axes."""
    return 0.5 * (strain + strain.transpose(-1, -2))


def apply_strain(
    positions: Tensor, cell: Tensor, strain: Tensor, system_idx: Tensor
) -> tuple[Tensor, Tensor]:
    """Deform positions and cells by (I + strain) per system (row-vector convention).

    r' = r (I + e), cell' = cell (I + e). With e symmetric and zero-valued but requiring grad,
    stress = (1/V) dE/de gives the ASE sign convention.
    """
    eye = torch.eye(3, dtype=positions.dtype, device=positions.device)
    deform = eye + strain  # (n_systems, 3, 3)
    new_pos = torch.einsum("na,nab->nb", positions, deform[system_idx])
    new_cell = torch.bmm(cell, deform)
    return new_pos, new_cell


def random_rotations(n: int, dtype: torch.dtype, device=None, generator=None) -> Tensor:
    """(n, 3, 3) uniformly distributed (Haar) rotation matrices, drawn from ``generator``.

    A quaternion q with four independent standard normal components, normalised, is uniform on
    the unit 3-sphere, and its rotation matrix is therefore uniform on SO(3). The normals are
    drawn in float64 on the CPU (the same numbers on every device), then the matrix is cast to
    ``dtype`` on ``device``. e3nn's ``o3.rand_matrix`` draws from the global generator only;
    this one takes a generator, so a training step's rotations are a pure function of the
    seed and the step (exact resume) and any fit that samples rotations is reproducible.
    """
    q = torch.randn(n, 4, dtype=torch.float64, generator=generator).to(device)
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rot = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ], dim=-1).view(n, 3, 3)
    return rot.to(dtype)
