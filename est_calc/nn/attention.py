"""Spherical attention over grid points with a relative-orientation bias (paper eqs. 9 and 13).

For one spatial signal f in R^{S x C} (a node or an edge):

==========================================================  =======================================
equation                                                    code
==========================================================  =======================================
H = LN(f), H_kv = LN_kv(kv) (or H)                          ``self.norm``, ``self.norm_kv``
Q = H W_Q, K = H_kv W_K, V = H_kv W_V, split into h heads    ``self.query``, ``self.key``, ``self.value``
B^h_st = sum_{l=1..L_roe} w^h_l P_l(p_s . p_t) + log w_t     ``orientation_bias()``
O^h = softmax(Q^h K^h^T / sqrt(d) + B^h) V^h                scaled_dot_product_attention / math
out = f + concat_h(O^h) W_O                                 ``self.out``
==========================================================  =======================================

The bias depends on the grid only through p_s . p_t and the key weights w_t, so it is invariant
when the grid and the signal rotate together; the remaining equivariance error comes from the
discreteness of the grid (EST_SPEC.md sections 5 and 10). With w_1 = 1 and the other w_l = 0 the
bias equals the author code's concatenation of p_s to q and k.

Double backward (training on autograd forces with ``create_graph=True``) is not implemented by the
fused SDPA kernels, so by default an explicit softmax(QK^T/sqrt(d) + B) V is used. Wrap first-order
inference in ``with fused_attention(True):`` to let torch pick a fused kernel.
"""

from __future__ import annotations

import contextlib
import math
import threading

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from est_calc.nn.derived import derived
from est_calc.sphere import ExactBufferModule, SphericalGrid

__all__ = ["SphericalAttention", "fused_attention", "fused_attention_enabled", "legendre_matrices",
           "attention_precision", "attention_precision_dtype",
           "attention_state", "restored_attention_state"]

_STATE = threading.local()


def fused_attention_enabled() -> bool:
    """Whether :func:`fused_attention` is active in this thread (default False)."""
    return getattr(_STATE, "fused", False)


@contextlib.contextmanager
def fused_attention(enabled: bool):
    """Allow (True) or forbid (False) fused SDPA kernels inside the block.

    Fused kernels are faster but do not support double backward; only enable them for inference
    with first-order forces. The previous state is restored on exit.
    """
    previous = fused_attention_enabled()
    _STATE.fused = bool(enabled)
    try:
        yield
    finally:
        _STATE.fused = previous


_LOW_PRECISION = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def attention_state() -> tuple:
    """This thread's attention settings (fused kernels, core precision), for
    :func:`restored_attention_state`."""
    return (getattr(_STATE, "fused", False), getattr(_STATE, "precision", None))


@contextlib.contextmanager
def restored_attention_state(state: tuple):
    """Run the block with the attention settings ``state`` taken by :func:`attention_state`.

    The settings are thread-local, and autograd runs the backward of CUDA tensors in its own
    worker thread: an activation-checkpointed layer recomputed there would otherwise take the
    defaults instead of the settings of its forward pass (another kernel, other saved tensors,
    and torch.utils.checkpoint refuses the mismatch).
    """
    previous = attention_state()
    _STATE.fused, _STATE.precision = state
    try:
        yield
    finally:
        _STATE.fused, _STATE.precision = previous


def attention_precision_dtype(name: str) -> torch.dtype | None:
    """The dtype of an attention-precision name (None for "float32", the model's own dtype);
    ValueError for an unknown name."""
    if name not in _LOW_PRECISION:
        raise ValueError(f"attention precision must be one of {sorted(_LOW_PRECISION)}, got {name!r}")
    return _LOW_PRECISION[name]


@contextlib.contextmanager
def attention_precision(name: str):
    """Run the spherical attention core (scores, softmax, weighted sum) in ``name``.

    ``"float32"`` (default) keeps the model's dtype; ``"bfloat16"`` / ``"float16"`` cast q, k, v
    and the bias for the attention core only and cast its output back, so projections, norms,
    experts and every other part stay in the model's dtype. Meant for GPUs (tensor cores);
    measure the force error against the model's validation error before using it
    (``benchmarks/gpu.py`` does). The previous setting is restored on exit.
    """
    low = attention_precision_dtype(name)
    previous = getattr(_STATE, "precision", None)
    _STATE.precision = low
    try:
        yield
    finally:
        _STATE.precision = previous


def legendre_matrices(points: np.ndarray | Tensor, l_roe: int) -> np.ndarray:
    """P_l(p_s . p_t) for l = 1..l_roe, float64 array (l_roe, S, S), by Bonnet's recurrence."""
    p = np.asarray(points, dtype=np.float64)
    cos = np.clip(p @ p.T, -1.0, 1.0)
    out = np.empty((l_roe, *cos.shape))
    prev, cur = np.ones_like(cos), cos
    for l in range(1, l_roe + 1):
        out[l - 1] = cur
        prev, cur = cur, ((2 * l + 1) * cos * cur - l * prev) / (l + 1)
    return out


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


class SphericalAttention(ExactBufferModule):
    """Multi-head pre-LN attention among the S grid points of each signal, with residual.

    Args:
        channels: C of the query signal (and of the output).
        grid: the SphericalGrid the signals live on (shared module; provides points and weights).
        n_heads: h; C must be divisible by h.
        l_roe: number of Legendre terms in the orientation bias (0 disables it).
        kv_channels: channels of the key/value signal for the cross-attention form; None builds
            the self-attention form only.
        chunk_size: maximal number of signals per attention call (memory and kernel limits).
    """

    def __init__(self, channels: int, grid: SphericalGrid, n_heads: int = 4, l_roe: int = 2,
                 kv_channels: int | None = None, chunk_size: int = 32768) -> None:
        super().__init__()
        if channels < 1 or n_heads < 1 or channels % n_heads:
            raise ValueError(f"SphericalAttention: channels ({channels}) must be a positive "
                             f"multiple of n_heads ({n_heads})")
        if l_roe < 0 or chunk_size < 1:
            raise ValueError(f"SphericalAttention: need l_roe >= 0 and chunk_size >= 1, "
                             f"got {l_roe}, {chunk_size}")
        if not isinstance(grid, SphericalGrid):
            raise ValueError(f"SphericalAttention: grid must be a SphericalGrid, got {type(grid)}")
        self.channels, self.n_heads, self.l_roe = channels, n_heads, l_roe
        self.head_dim = channels // n_heads
        self.kv_channels = kv_channels
        self.chunk_size = chunk_size
        self.grid = grid
        kv_in = channels if kv_channels is None else kv_channels
        self.norm = nn.LayerNorm(channels)
        self.norm_kv = nn.LayerNorm(kv_channels) if kv_channels is not None else None
        self.query = nn.Linear(channels, channels)
        self.key = nn.Linear(kv_in, channels)
        self.value = nn.Linear(kv_in, channels)
        self.out = nn.Linear(channels, channels)
        if l_roe > 0:
            w = torch.zeros(n_heads, l_roe)
            w[:, 0] = 1.0
            self.roe_weight = nn.Parameter(w)
            self.register_exact_buffer("legendre", legendre_matrices(grid.master("points"), l_roe))
        else:
            self.roe_weight = None
            self.register_exact_buffer("legendre", None)

    def orientation_bias(self) -> Tensor | None:
        """Additive logits bias (h, S, S), or None when there is neither ROE nor weights."""
        bias = None
        if self.roe_weight is not None:
            bias = torch.einsum("hl,lst->hst", self.roe_weight, self.legendre)
        log_w = self.grid.log_weights
        if log_w is not None:
            log_w = log_w.to(self.query.weight.dtype)[None, None, :]
            bias = log_w.expand(self.n_heads, self.grid.n_points, -1) if bias is None else bias + log_w
        return bias

    def _bias_in(self, dtype: torch.dtype) -> Tensor | None:
        bias = self.orientation_bias()
        return None if bias is None else bias.to(dtype)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        """softmax(q k^T + bias) v for q already scaled by 1/sqrt(d); q, k, v: [B, h, S, d]."""
        low = getattr(_STATE, "precision", None)
        if low is not None and q.dtype != low:
            out = self._attend_core(q.to(low), k.to(low), v.to(low),
                                    None if bias is None else bias.to(low))
            return out.to(q.dtype)
        return self._attend_core(q, k, v, bias)

    def _attend_core(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        # On CPU the math path below is used even when fused kernels are allowed: SDPA's CPU
        # path adds scaling passes and mask checks that cost more than they save here.
        if fused_attention_enabled() and q.is_cuda:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        b, n_heads, s, d = q.shape
        out = _AttentionCore.apply(q.reshape(b * n_heads, s, d), k.reshape(b * n_heads, s, d),
                                   v.reshape(b * n_heads, s, d), bias, n_heads)
        return out.view(b, n_heads, s, d)

    def forward(self, f: Tensor, kv: Tensor | None = None) -> Tensor:
        """Attend among grid points.

        Args:
            f: [B, S, C] query signal (B nodes or edges).
            kv: optional [B, S, Ckv] key/value signal (cross-attention form).

        Returns:
            [B, S, C]: f + W_O(attention output).
        """
        s = self.grid.n_points
        if f.dim() != 3 or f.shape[1] != s or f.shape[2] != self.channels:
            raise ValueError(f"SphericalAttention: expected f of shape [B, S={s}, "
                             f"C={self.channels}], got {tuple(f.shape)}")
        h = self.norm(f)
        if kv is None:
            src = h
        else:
            if self.norm_kv is None:
                raise ValueError("SphericalAttention: kv given but the module was built without "
                                 "kv_channels; pass kv_channels=... for the cross-attention form")
            if kv.dim() != 3 or kv.shape[:2] != f.shape[:2] or kv.shape[2] != self.kv_channels:
                raise ValueError(f"SphericalAttention: expected kv of shape [B={f.shape[0]}, "
                                 f"S={s}, Ckv={self.kv_channels}], got {tuple(kv.shape)}")
            src = self.norm_kv(kv)
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

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, n_heads={self.n_heads}, l_roe={self.l_roe}, "
                f"kv_channels={self.kv_channels}, chunk_size={self.chunk_size}")
