"""Row gathers for message passing whose backward stays on torch's fast scatter path.

``x.index_select(0, index)`` has index_add as its backward. On the CPU, index_add with a
non-contiguous source (the gradient of a gather that was concatenated along the feature axis,
``cat([x[i], x[j]], -1)``, arrives as a strided slice) falls back to an elementwise scatter_add
with an expanded index. :func:`gather_rows` is index_select whose backward makes the gradient
contiguous first; its values and gradients are identical, and the backward is built from
differentiable ops, so double backward (training on forces) works as before.

:func:`gather_pairs` gives the per-edge pair [x_i || x_j] of (N, K, C) node features, laid out
(E, K, 2C), in one row gather from the (N K, C) view with an interleaved index instead of two
gathers and a concatenation; the backward adds whole gradient rows (see ``_GatherPairs``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gather_pairs", "gather_rows", "pair_index"]


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.n_rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        grad = grad.contiguous()
        return grad.new_zeros((ctx.n_rows, *grad.shape[1:])).index_add(0, index, grad), None


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x.index_select(0, index)`` (rows of x at a 1-D int64 index) with a contiguous backward."""
    if not torch.is_grad_enabled() or not x.requires_grad:
        return x.index_select(0, index)
    return _GatherRows.apply(x, index)


def pair_index(i: Tensor, j: Tensor, n_rows: int) -> Tensor:
    """Flat index (E n_rows 2,) into the (N n_rows, C) view of node features such that the
    gathered rows, viewed as (E, n_rows, 2C), hold x[i_e, r] || x[j_e, r] in row r of edge e."""
    r = torch.arange(n_rows, device=i.device, dtype=i.dtype)
    return (torch.stack([i, j], dim=1).unsqueeze(1) * n_rows + r[None, :, None]).reshape(-1)


class _GatherPairs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, i: Tensor, j: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(i, j)
        ctx.n_nodes = x.shape[0]
        return _pairs(x, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        i, j = ctx.saved_tensors
        _, k, c2 = grad.shape
        grad = grad.contiguous()
        # Whole (K, 2C) rows added at i and at j, then the wanted half of each kept: no copies of
        # strided halves. Differentiable in grad (index_add into fresh zeros), so double backward
        # works.
        at_i = grad.new_zeros(ctx.n_nodes, k, c2).index_add_(0, i, grad)
        at_j = grad.new_zeros(ctx.n_nodes, k, c2).index_add_(0, j, grad)
        out = at_i[..., : c2 // 2] + at_j[..., c2 // 2:]
        return out, None, None, None


def _pairs(x: Tensor, index: Tensor) -> Tensor:
    n, k, c = x.shape
    return x.reshape(n * k, c).index_select(0, index).view(-1, k, 2 * c)


def gather_pairs(x: Tensor, i: Tensor, j: Tensor, index: Tensor | None = None) -> Tensor:
    """``cat([x[i], x[j]], dim=-1)`` for (N, K, C) features x: (E, K, 2C), with the same values
    and gradients. ``index`` is ``pair_index(i, j, K)`` when the caller has it already."""
    if x.dim() != 3 or i.shape != j.shape or i.dim() != 1:
        raise ValueError(f"gather_pairs: expected (N, K, C) features and two (E,) indices, got "
                         f"{tuple(x.shape)}, {tuple(i.shape)} and {tuple(j.shape)}")
    if index is None:
        index = pair_index(i, j, x.shape[1])
    if not torch.is_grad_enabled() or not x.requires_grad:
        return _pairs(x, index)
    return _GatherPairs.apply(x, i, j, index)
