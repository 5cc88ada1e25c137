"""Reversed-pair order of a full neighbour list.

A full list holds every pair twice: i -> j with lattice shift S and j -> i with shift -S, whose
edge vectors are exact negatives (``r_ji = -r_ij`` to the bit). :func:`pair_edges` orders the
edges so that the second half is the reverse of the first, edge for edge::

    edge_index[:, P + p] == edge_index[[1, 0], p],   shifts[P + p] == -shifts[p],   P = E / 2

The SO(2) message block then evaluates the Wigner rotations and the rotation products for the
first half only (the reversed edge's rotated features follow by fixed signs and a swap of the
two atoms' channels; see :class:`est_calc.nn.message_so2.SO2MessageBlock`). The order survives
the Verlet filter, since both directions of a pair have the same distance.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["is_paired", "one_direction", "pair_edges"]

# Keys pack (a, b, S) into one int64: a * n + b needs n^2 and each shift component its span.
_KEY_LIMIT = 2**62


def _keys(a: Tensor, b: Tensor, s: Tensor, n: int, lo: Tensor, span: list[int]) -> Tensor:
    key = a * n + b
    for k in range(3):
        key = key * span[k] + (s[:, k] - lo[k])
    return key


def _forward(edge_index: Tensor, shifts: Tensor) -> Tensor:
    """(E,) bool: the edge is the first of its pair (i < j, or i == j and a shift whose first
    non-zero component is positive, i.e. S > 0 lexicographically)."""
    i, j = edge_index[0], edge_index[1]
    nz = shifts != 0
    first = torch.where(nz.any(dim=1), nz.to(torch.int32).argmax(dim=1), torch.zeros_like(i))
    positive = shifts.gather(1, first[:, None]).squeeze(1) > 0
    return (i < j) | ((i == j) & positive)


def one_direction(edge_index: Tensor, shifts: Tensor, *, paired: bool = False
                  ) -> tuple[Tensor, Tensor]:
    """One edge of every pair of a symmetric full list, in the order the edges had.

    With ``paired`` (a list in reversed-pair order, ``Graph.paired``) the first half; otherwise
    the edges with i < j, or i == j and a shift S > 0 lexicographically. Only the counts are
    checked here (half the edges each way; ValueError otherwise): a list must hold every pair
    in both directions, as est_calc's neighbour lists do by construction (both directions of a
    pair have bitwise the same length, so a cutoff keeps both or neither).
    """
    n_edges = edge_index.shape[1]
    if paired:
        return edge_index[:, : n_edges // 2], shifts[: n_edges // 2]
    forward = _forward(edge_index, shifts)
    n_forward = int(forward.sum())
    if 2 * n_forward != n_edges:
        raise ValueError(f"the neighbour list is not symmetric ({n_forward} edges i -> j with "
                         f"i < j, {n_edges - n_forward} the other way): a package needs every "
                         f"pair in both directions")
    return edge_index[:, forward], shifts[forward]


def pair_edges(edge_index: Tensor, shifts: Tensor, n_atoms: int) -> tuple[Tensor, Tensor] | None:
    """The same edges in reversed-pair order, or None when the list is not symmetric (or too
    large to key in 64 bits), in which case callers keep the unpaired list.

    Args:
        edge_index: (2, E) int64 (i, j).
        shifts: (E, 3) int64 lattice shifts.
        n_atoms: number of atoms (indices are below it).

    Returns:
        (edge_index, shifts) with the second half the reverse of the first, edge for edge; the
        first half holds the edges with i < j, or i == j and a shift whose first non-zero
        component is positive.
    """
    n_edges = edge_index.shape[1]
    if n_edges == 0 or n_edges % 2:
        return None if n_edges else (edge_index, shifts)
    i, j = edge_index[0], edge_index[1]
    lo = torch.minimum(shifts.min(dim=0).values, -shifts.max(dim=0).values)
    span = [int(v) for v in (2 * (-lo) + 1).tolist()]
    if n_atoms * n_atoms * span[0] * span[1] * span[2] >= _KEY_LIMIT:
        return None
    forward = _forward(edge_index, shifts)
    fwd = forward.nonzero().squeeze(1)
    rev = (~forward).nonzero().squeeze(1)
    if fwd.numel() != rev.numel():
        return None
    key_f = _keys(i[fwd], j[fwd], shifts[fwd], n_atoms, lo, span)
    key_r = _keys(j[rev], i[rev], -shifts[rev], n_atoms, lo, span)
    key_f, order_f = torch.sort(key_f)
    key_r, order_r = torch.sort(key_r)
    if not torch.equal(key_f, key_r):
        return None
    order = torch.cat([fwd[order_f], rev[order_r]])
    return edge_index[:, order], shifts[order]


def is_paired(edge_index: Tensor, shifts: Tensor) -> bool:
    """Whether the second half of the edges is the reverse of the first, edge for edge."""
    n_edges = edge_index.shape[1]
    if n_edges % 2:
        return False
    half = n_edges // 2
    return bool(torch.equal(edge_index[:, half:], edge_index[[1, 0], :half])
                and torch.equal(shifts[half:], -shifts[:half]))
