"""Exactly SO(3)-equivariant operations on steerable features x of shape [N, K, C].

K = (L+1)^2 components in e3nn order (index l^2 + l + m). Every layer here commutes with the
block-diagonal Wigner matrix D(R) acting on the K axis:

* :class:`DWLinear` mixes channels with one matrix per degree l, shared over m (D^l commutes with
  anything that acts on channels only).
* :class:`EquivariantLayerNorm` normalises with rotation-invariant statistics (|x^l|^2 summed over m).
* :class:`Gate` multiplies each l > 0 block by an invariant sigmoid gate from the l = 0 channels.

The l = 0 output of each of them depends on the l = 0 input only (what lets the model's last
layer compute that row alone, :class:`est_calc.nn.block.ScalarUpdateBlock`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["degree_index", "DWLinear", "EquivariantLayerNorm", "Gate"]


def degree_index(l_max: int, device=None) -> Tensor:
    """Degree l of each of the K = (L+1)^2 components, LongTensor (K,): [0, 1, 1, 1, 2, ...]."""
    if l_max < 0:
        raise ValueError(f"degree_index: l_max must be >= 0, got {l_max}")
    return torch.repeat_interleave(
        torch.arange(l_max + 1, device=device), 2 * torch.arange(l_max + 1, device=device) + 1
    )


def _check_features(x: Tensor, n_coeffs: int, channels: int, name: str) -> None:
    if x.dim() != 3 or x.shape[1] != n_coeffs or x.shape[2] != channels:
        raise ValueError(f"{name}: expected x of shape [N, K={n_coeffs}, C={channels}], "
                         f"got {tuple(x.shape)}")


class DWLinear(nn.Module):
    """Degree-wise linear map: y^l_m = x^l_m W_l (+ b on l = 0), [N, K, Cin] -> [N, K, Cout].

    Args:
        l_max: maximum degree L.
        in_channels: Cin.
        out_channels: Cout.
        bias: add a learnable bias to the l = 0 output (a bias on l > 0 would break equivariance).
    """

    def __init__(self, l_max: int, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__()
        if l_max < 0 or in_channels < 1 or out_channels < 1:
            raise ValueError(f"DWLinear: need l_max >= 0 and channels >= 1, got l_max={l_max}, "
                             f"in={in_channels}, out={out_channels}")
        self.l_max, self.in_channels, self.out_channels = l_max, in_channels, out_channels
        bound = 1.0 / math.sqrt(in_channels)
        self.weight = nn.Parameter(torch.empty(l_max + 1, in_channels, out_channels).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.register_buffer("_degree", degree_index(l_max), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, K, Cin] -> [N, K, Cout]."""
        _check_features(x, (self.l_max + 1) ** 2, self.in_channels, "DWLinear")
        y = torch.einsum("nki,kio->nko", x, self.weight[self._degree])
        if self.bias is None:
            return y
        return torch.cat([y[:, :1] + self.bias, y[:, 1:]], dim=1)

    def extra_repr(self) -> str:
        return (f"l_max={self.l_max}, in_channels={self.in_channels}, "
                f"out_channels={self.out_channels}, bias={self.bias is not None}")


class EquivariantLayerNorm(nn.Module):
    """Layer norm for steerable features.

    l = 0: ordinary LayerNorm over channels (mean mu, variance var_0, affine weight and bias).
    l > 0: no centring; every l > 0 component is divided by one RMS per node and scaled by a
    learnable g per (l, channel), no bias. Two statistics are available (``joint``):

    * ``joint=True`` (default; EquiformerV2's "rms_norm_sh" statistic, with the centred l = 0
      part in it):

          rms^2 = (1/(L+1)) [ var_0 + sum_{l=1..L} (1/(2l+1)) (1/C) sum_{m,c} (x^l_{m,c})^2 ].

      The l > 0 part is measured against the whole feature, so its gain is bounded by
      g / sqrt(var_0 / (L+1) + eps): a part that vanishes by symmetry (every l > 0 feature of an
      atom in a cubic crystal) stays at its rounding level relative to the node's scale.
    * ``joint=False`` (potentials written before est_calc 0.2; ``ModelConfig.vector_norm =
      "separate"``): the l > 0 statistic alone,

          rms^2 = (1/L) sum_{l=1..L} (1/(2l+1)) (1/C) sum_{m,c} (x^l_{m,c})^2.

      Its gain at x^l -> 0 is g / sqrt(eps) (~316 for eps = 1e-5). Chained over the norms of a
      two-layer model this multiplies float32 rounding (~1e-7) of features that should cancel by
      symmetry by ~1e10: forces of 1e4 eV/Å on ideal crystals in float32 (float64 is not
      affected to visible precision). Kept only to evaluate such potentials as they were trained.

    Then x^l_{m,c} <- x^l_{m,c} g_{l,c} / sqrt(rms^2 + eps) for l > 0. The l = 0 output depends
    on the l = 0 input only in both forms: it is ``scalar_norm`` of that row.

    Args:
        l_max: maximum degree L.
        channels: C.
        eps: added to the variance / mean square.
        joint: the statistic of the l > 0 part (above).
    """

    def __init__(self, l_max: int, channels: int, eps: float = 1e-5, joint: bool = True) -> None:
        super().__init__()
        if l_max < 0 or channels < 1:
            raise ValueError(f"EquivariantLayerNorm: need l_max >= 0, channels >= 1, "
                             f"got {l_max}, {channels}")
        self.l_max, self.channels, self.eps = l_max, channels, eps
        self.joint = bool(joint)
        self.scalar_norm = nn.LayerNorm(channels, eps=eps)
        self.weight = nn.Parameter(torch.ones(l_max, channels)) if l_max > 0 else None
        self.register_buffer("_degree", degree_index(l_max)[1:] - 1, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, K, C] -> [N, K, C]."""
        _check_features(x, (self.l_max + 1) ** 2, self.channels, "EquivariantLayerNorm")
        if self.l_max == 0:
            return self.scalar_norm(x)
        x0, vec = x[:, :1], x[:, 1:]
        n_degrees = self.l_max + 1 if self.joint else self.l_max
        l = (self._degree + 1).to(x.dtype)                          # degree of each l > 0 row
        balance = 1.0 / ((2 * l + 1) * (n_degrees * self.channels))  # (K - 1,)
        mean_sq = ((vec * vec).sum(dim=-1) * balance).sum(dim=-1)   # (N,)
        if self.joint:
            mean_sq = mean_sq + x0[:, 0].var(dim=-1, unbiased=False) / n_degrees
        inv = torch.rsqrt(mean_sq + self.eps)[:, None, None]
        return torch.cat([self.scalar_norm(x0), vec * inv * self.weight[self._degree]], dim=1)

    def extra_repr(self) -> str:
        return (f"l_max={self.l_max}, channels={self.channels}, eps={self.eps}, "
                f"joint={self.joint}")


class Gate(nn.Module):
    """Gate activation: SiLU on scalars, sigmoid gates from the l = 0 channels on l > 0 blocks.

    y^0 = SiLU(x^0);  y^l_{m,c} = x^l_{m,c} * sigmoid(g_{l,c}),  g = Linear(x^0) in R^{L x C}.

    Args:
        l_max: maximum degree L.
        channels: C.
    """

    def __init__(self, l_max: int, channels: int) -> None:
        super().__init__()
        if l_max < 0 or channels < 1:
            raise ValueError(f"Gate: need l_max >= 0, channels >= 1, got {l_max}, {channels}")
        self.l_max, self.channels = l_max, channels
        self.gate = nn.Linear(channels, l_max * channels) if l_max > 0 else None
        self.register_buffer("_degree", degree_index(l_max)[1:] - 1, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, K, C] -> [N, K, C]."""
        _check_features(x, (self.l_max + 1) ** 2, self.channels, "Gate")
        if self.l_max == 0:
            return torch.nn.functional.silu(x)
        x0, x_rest = x.split([1, x.shape[1] - 1], dim=1)
        gates = torch.sigmoid(self.gate(x0[:, 0])).view(-1, self.l_max, self.channels)
        # index_select (not fancy indexing): its backward is an index_add, not an accumulating put.
        return torch.cat([torch.nn.functional.silu(x0),
                          x_rest * gates.index_select(1, self._degree)], dim=1)

    def extra_repr(self) -> str:
        return f"l_max={self.l_max}, channels={self.channels}"
