"""Spherical attention with stacked projections, a hand-written core and optional fused kernels.

:class:`FastSphericalAttention` computes what :class:`est_calc.nn.attention.SphericalAttention`
computes (same parameters):

* 1/sqrt(d) is folded into the query weights, and the q, k and v projections run as one matrix
  product (k and v as one in the cross-attention form); the stacked weights and the orientation
  bias are cached while the weights are frozen (:func:`derived`);
* the heads are split in one copy;
* softmax(q k^T + B) v runs in :class:`_AttentionCore`, whose products are all computed in their
  fast orientation, with its own backward (differentiable when a graph of it is requested, so
  double backward for training on forces is exact);
* with ``inference`` on a GPU, ``F.scaled_dot_product_attention`` picks a fused kernel instead
  (those kernels have no second derivative: first-order forces and stress only);
* ``low_dtype`` (bfloat16 or float16) runs the attention core only (scores, softmax, weighted sum)
  in that dtype, casting q, k, v and the bias in and the output back; projections, norms and
  everything else keep the model's dtype. Meant for GPUs (tensor cores); measure the force error
  against the model's validation error before using it (``benchmarks/gpu.py`` does).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from est_calc.accel.weights import derived
from est_calc.nn.attention import SphericalAttention

__all__ = ["ATTENTION_DTYPES", "FastSphericalAttention"]

#: Names of the attention-core precisions (``ESTCalculator(attention_precision=...)``); None keeps
#: the model's dtype.
ATTENTION_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _scores(q: Tensor, k: Tensor, bias: Tensor | None, n_heads: int) -> Tensor:
    """q k^T (+ the per-head bias) for q, k of shape (B h, S, d) -> (B h, S, S)."""
    s = q.shape[1]
    if bias is not None and n_heads == 1:
        # One head: the bias broadcasts over the batch, so scores + bias is one fused op.
        return torch.baddbmm(bias.reshape(s, s), q, k.transpose(1, 2))
    scores = torch.bmm(q, k.transpose(1, 2))
    if bias is None:
        return scores
    return (scores.view(-1, n_heads, s, s) + bias).view(-1, s, s)


class _AttentionCore(torch.autograd.Function):
    """softmax(q k^T + bias) v for (B h, S, d) tensors, every product in its fast orientation.

    With d (6 for the small preset) much smaller than S (32), a batched product whose output has
    d columns is several times slower on the CPU (MKL) than the transposed product with d rows.
    Autograd's own backward of P V and q k^T needs three such products (P^T G, G_S k and G_S^T q);
    here each is computed transposed: P V = (V^T P^T)^T, P^T G = (G^T P)^T, G_S k = (k^T G_S^T)^T,
    G_S^T q = (q^T G_S)^T. The backward is written in differentiable operations and recomputes P
    from q and k when a graph is requested, so double backward (training on forces) is exact.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, n_heads):
        p = torch.softmax(_scores(q, k, bias, n_heads), dim=-1)
        ctx.save_for_backward(q, k, v, bias, p)
        ctx.n_heads = n_heads
        return torch.bmm(v.transpose(1, 2), p.transpose(1, 2)).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, bias, p = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: P as a function of q and k
            p = torch.softmax(_scores(q, k, bias, ctx.n_heads), dim=-1)
        grad_t = grad.transpose(1, 2)                                   # (B h, d, S)
        grad_v = torch.bmm(grad_t, p).transpose(1, 2)                   # P^T G
        grad_p = torch.bmm(grad, v.transpose(1, 2))                     # G V^T
        if torch.is_grad_enabled():  # softmax backward in differentiable operations
            grad_s = p * (grad_p - (grad_p * p).sum(dim=-1, keepdim=True))
        else:  # the fused kernel of softmax's own backward
            grad_s = torch._softmax_backward_data(grad_p, p, -1, p.dtype)
        grad_q = torch.bmm(k.transpose(1, 2), grad_s.transpose(1, 2)).transpose(1, 2)
        grad_k = torch.bmm(q.transpose(1, 2), grad_s).transpose(1, 2)
        grad_bias = None
        if bias is not None and ctx.needs_input_grad[3]:
            s = q.shape[1]
            grad_bias = grad_s.view(-1, ctx.n_heads, s, s).sum(dim=0).view(bias.shape)
        return grad_q, grad_k, grad_v, grad_bias, None


class FastSphericalAttention(SphericalAttention):
    """:class:`SphericalAttention` with the speed-ups of the module docstring.

    Attributes set by :func:`est_calc.accel.accelerate`: ``inference`` (fused SDPA kernels on
    CUDA) and ``low_dtype`` (None or the attention core's reduced dtype).
    """

    inference = False
    low_dtype = None

    def _accelerate(self, options) -> None:
        self.inference = options.inference
        self.low_dtype = options.attention_dtype

    def _bias_in(self, dtype: torch.dtype) -> Tensor | None:
        bias = self.orientation_bias()
        return None if bias is None else bias.to(dtype)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        """softmax(q k^T + bias) v for q already scaled by 1/sqrt(d); q, k, v: [B, h, S, d]."""
        low = self.low_dtype
        if low is not None and q.dtype != low:
            out = self._attend_core(q.to(low), k.to(low), v.to(low),
                                    None if bias is None else bias.to(low))
            return out.to(q.dtype)
        return self._attend_core(q, k, v, bias)

    def _attend_core(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        # On CPU the math path below is used even when fused kernels are allowed: SDPA's CPU
        # path adds scaling passes and mask checks that cost more than they save here.
        if self.inference and q.is_cuda:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        b, n_heads, s, d = q.shape
        out = _AttentionCore.apply(q.reshape(b * n_heads, s, d), k.reshape(b * n_heads, s, d),
                                   v.reshape(b * n_heads, s, d), bias, n_heads)
        return out.view(b, n_heads, s, d)

    def forward(self, f: Tensor, kv: Tensor | None = None) -> Tensor:
        """As :meth:`SphericalAttention.forward`."""
        h, src = self.normed(f, kv)
        s = self.grid.n_points
        b, c = f.shape[0], self.channels

        def heads(t: Tensor, n: int) -> tuple[Tensor, ...]:
            """(B, S, n C) projections -> n contiguous (B, h, S, d) tensors, in one copy: the
            per-tensor slices copied separately cost three copies forward and, backward, three
            zero-filled full-width gradients summed (slice_backward)."""
            return (t.view(b, s, n, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
                    .contiguous().unbind(0))

        # 1/sqrt(d) is folded into the (small) query weights instead of scaling the scores, and
        # the key and value projections run as one matrix product (fewer per-signal passes).
        scale = 1.0 / math.sqrt(self.head_dim)
        params = [self.query.weight, self.query.bias, self.key.weight, self.key.bias,
                  self.value.weight, self.value.bias]
        if kv is None:  # self-attention: q, k and v in one product
            qkv_w, qkv_b = derived(self, "qkv", params, lambda: (
                torch.cat([self.query.weight * scale, self.key.weight, self.value.weight], dim=0),
                torch.cat([self.query.bias * scale, self.key.bias, self.value.bias], dim=0)))
            qkv = F.linear(h, qkv_w, qkv_b)
            q, k, v = heads(qkv, 3)
        else:
            q_w, q_b, kv_w, kv_b = derived(self, "q_kv", params, lambda: (
                self.query.weight * scale, self.query.bias * scale,
                torch.cat([self.key.weight, self.value.weight], dim=0),
                torch.cat([self.key.bias, self.value.bias], dim=0)))
            (q,) = heads(F.linear(h, q_w, q_b), 1)
            k, v = heads(F.linear(src, kv_w, kv_b), 2)
        bias = derived(self, f"bias_{q.dtype}",
                       [self.roe_weight, self.legendre, self.grid.log_weights],
                       lambda: self._bias_in(q.dtype))
        if b <= self.chunk_size:
            o = self._attend(q, k, v, bias)
        else:
            o = torch.cat([self._attend(q[i:i + self.chunk_size], k[i:i + self.chunk_size],
                                        v[i:i + self.chunk_size], bias)
                           for i in range(0, b, self.chunk_size)], dim=0)
        o = o.transpose(1, 2).reshape(b * s, c)
        return torch.addmm(self.out.bias, o, self.out.weight.t()).view(b, s, c) + f
