"""Row gathers for message passing whose backward stays on torch's fast scatter path.

``x.index_select(0, index)`` has index_add as its backward. On the CPU, index_add with a
non-contiguous source (the gradient of a gather that was concatenated along the feature axis,
``cat([x[i], x[j]], -1)``, arrives as a strided slice) falls back to an elementwise scatter_add
with an expanded index: 9.5 ms instead of 0.9 ms (copy included) for 9,018 edges x 288 features
on two cores. :func:`gather_rows` is index_select whose backward makes the gradient contiguous
first; its values and gradients are identical, and the backward is built from differentiable ops,
so double backward (training on forces) works as before.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gather_rows"]


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
