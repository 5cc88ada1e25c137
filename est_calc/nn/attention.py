"""Spherical attention over grid points with a relative-orientation bias (paper eqs. 9 and 13).

For one spatial signal f in R^{S x C} (a node or an edge):

==========================================================  =======================================
equation                                                    code
==========================================================  =======================================
H = LN(f), H_kv = LN_kv(kv) (or H)                          ``self.norm``, ``self.norm_kv``
Q = H W_Q, K = H_kv W_K, V = H_kv W_V, split into h heads    ``self.query``, ``self.key``, ``self.value``
B^h_st = sum_{l=1..L_roe} w^h_l P_l(p_s . p_t) + log w_t     ``orientation_bias()``
O^h = softmax(Q^h K^h^T / sqrt(d) + B^h) V^h                ``attend()``
out = f + concat_h(O^h) W_O                                 ``self.out``
==========================================================  =======================================

The bias depends on the grid only through p_s . p_t and the key weights w_t, so it is invariant
when the grid and the signal rotate together; the remaining equivariance error comes from the
discreteness of the grid (EST_SPEC.md sections 5 and 10). With w_1 = 1 and the other w_l = 0 the
bias equals the author code's concatenation of p_s to q and k.

The softmax is written out, so every derivative exists (training on forces differentiates the
forces again). Faster kernels with the same function (transposed products with their own
backward, fused SDPA, a reduced-precision core) are in :mod:`est_calc.accel.attention`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from est_calc.sphere import ExactBufferModule, SphericalGrid

__all__ = ["SphericalAttention", "legendre_matrices"]


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
            log_w = log_w[None, None, :]
            bias = log_w.expand(self.n_heads, self.grid.n_points, -1) if bias is None else bias + log_w
        return bias

    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        """softmax(q k^T / sqrt(d) + bias) v for q, k, v of shape [B, h, S, d], bias [h, S, S]."""
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        if bias is not None:
            scores = scores + bias
        return torch.softmax(scores, dim=-1) @ v

    def normed(self, f: Tensor, kv: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """H = LN(f) and H_kv = LN_kv(kv) (H itself in the self-attention form); checks shapes."""
        s = self.grid.n_points
        if f.dim() != 3 or f.shape[1] != s or f.shape[2] != self.channels:
            raise ValueError(f"SphericalAttention: expected f of shape [B, S={s}, "
                             f"C={self.channels}], got {tuple(f.shape)}")
        h = self.norm(f)
        if kv is None:
            return h, h
        if self.norm_kv is None:
            raise ValueError("SphericalAttention: kv given but the module was built without "
                             "kv_channels; pass kv_channels=... for the cross-attention form")
        if kv.dim() != 3 or kv.shape[:2] != f.shape[:2] or kv.shape[2] != self.kv_channels:
            raise ValueError(f"SphericalAttention: expected kv of shape [B={f.shape[0]}, "
                             f"S={s}, Ckv={self.kv_channels}], got {tuple(kv.shape)}")
        return h, self.norm_kv(kv)

    def forward(self, f: Tensor, kv: Tensor | None = None) -> Tensor:
        """Attend among grid points.

        Args:
            f: [B, S, C] query signal (B nodes or edges).
            kv: optional [B, S, Ckv] key/value signal (cross-attention form).

        Returns:
            [B, S, C]: f + W_O(attention output).
        """
        h, src = self.normed(f, kv)
        b, s = f.shape[0], self.grid.n_points

        def heads(t: Tensor) -> Tensor:  # [B, S, C] -> [B, h, S, d]
            return t.view(b, s, self.n_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.query(h)), heads(self.key(src)), heads(self.value(src))
        bias = self.orientation_bias()
        n = self.chunk_size
        o = torch.cat([self.attend(q[i:i + n], k[i:i + n], v[i:i + n], bias)
                       for i in range(0, b, n)], dim=0) if b > n else self.attend(q, k, v, bias)
        return f + self.out(o.transpose(1, 2).reshape(b, s, self.channels))

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, n_heads={self.n_heads}, l_roe={self.l_roe}, "
                f"kv_channels={self.kv_channels}, chunk_size={self.chunk_size}")
