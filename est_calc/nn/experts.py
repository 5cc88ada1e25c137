"""Mixture of hybrid experts (paper eqs. 14, 43-46; EST_SPEC.md section 6).

==============================================================  ====================================
equation                                                        code
==============================================================  ====================================
g = softmax(G(LN(x^0))), G = Linear-SiLU-Linear, E_st + E_sp    ``gates()``: ``gate_norm``, ``gate``
y_st = sum_k g_k FFN^st_k(x)                                    ``self.steerable``
  FFN^st = EqLN -> DWLinear(C, hC) -> Gate -> DWLinear(hC, C)   ``steerable_expert``
O = SphericalAttention(F(x))                                    ``self.attention``
y_sp = F^-1( sum_k g_{E_st+k} FFN^sp_k(O) )                     ``self.spherical``
  FFN^sp = LN -> Linear(C, hC) -> SiLU -> Linear(hC, C)         ``spherical_expert``
y_sp^0 <- SiLU(W_0 LN(x^0) + b_0)                               ``gates()``: ``scalar_out``
y = y_st + y_sp   (the caller adds the residual)
==============================================================  ====================================

The gate is dense (no top-k, no balance loss) and invariant, since it reads only l = 0 channels;
the steerable branch is exactly equivariant, the spherical branch up to grid discreteness.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from est_calc.nn.attention import SphericalAttention
from est_calc.nn.so3 import DWLinear, EquivariantLayerNorm, Gate
from est_calc.sphere import SphericalGrid

__all__ = ["MixtureOfHybridExperts", "steerable_expert", "spherical_expert"]


def steerable_expert(l_max: int, channels: int, hidden: int) -> nn.Sequential:
    """EquivariantLayerNorm -> DWLinear(C, H) -> Gate -> DWLinear(H, C) on [N, K, C]."""
    return nn.Sequential(
        EquivariantLayerNorm(l_max, channels),
        DWLinear(l_max, channels, hidden),
        Gate(l_max, hidden),
        DWLinear(l_max, hidden, channels),
    )


def spherical_expert(channels: int, hidden: int) -> nn.Sequential:
    """Point-wise LayerNorm -> Linear(C, H) -> SiLU -> Linear(H, C) on [..., S, C]."""
    return nn.Sequential(
        nn.LayerNorm(channels), nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, channels)
    )


class MixtureOfHybridExperts(nn.Module):
    """Dense mixture of steerable and spherical experts; returns the update y (no residual).

    Args:
        l_max: maximum degree L of the features.
        channels: C.
        grid: SphericalGrid with grid.l_max == l_max (shared with other blocks).
        n_steerable: E_st >= 0.
        n_spherical: E_sp >= 0 (0 drops the spherical branch, attention included).
        n_heads: attention heads.
        l_roe: Legendre terms of the orientation bias.
        hidden_mult: expert hidden width h, H = h * C.
    """

    def __init__(self, l_max: int, channels: int, grid: SphericalGrid, n_steerable: int = 1,
                 n_spherical: int = 1, n_heads: int = 4, l_roe: int = 2,
                 hidden_mult: int = 2) -> None:
        super().__init__()
        if n_steerable < 0 or n_spherical < 0 or n_steerable + n_spherical < 1:
            raise ValueError(f"MixtureOfHybridExperts: need n_steerable, n_spherical >= 0 and at "
                             f"least one expert, got {n_steerable}, {n_spherical}")
        if hidden_mult < 1:
            raise ValueError(f"MixtureOfHybridExperts: hidden_mult must be >= 1, got {hidden_mult}")
        if not isinstance(grid, SphericalGrid) or grid.l_max != l_max:
            raise ValueError(f"MixtureOfHybridExperts: grid must be a SphericalGrid with "
                             f"l_max={l_max}, got {grid!r}")
        self.l_max, self.channels = l_max, channels
        self.n_steerable, self.n_spherical = n_steerable, n_spherical
        hidden = hidden_mult * channels
        n_experts = n_steerable + n_spherical
        self.gate_norm = nn.LayerNorm(channels)
        self.gate = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(),
                                  nn.Linear(channels, n_experts))
        self.steerable = nn.ModuleList(
            steerable_expert(l_max, channels, hidden) for _ in range(n_steerable))
        if n_spherical > 0:
            self.grid = grid
            self.attention = SphericalAttention(channels, grid, n_heads=n_heads, l_roe=l_roe)
            self.spherical = nn.ModuleList(
                spherical_expert(channels, hidden) for _ in range(n_spherical))
            self.scalar_out = nn.Linear(channels, channels)
        else:
            self.grid = self.attention = self.spherical = self.scalar_out = None

    def gates(self, x0: Tensor) -> tuple[Tensor, Tensor | None]:
        """From the l = 0 row x0 (N, C) of the block input: the expert weights
        g = softmax(G(LN(x0))) (N, E_st + E_sp), invariant, and the spherical branch's l = 0 row
        SiLU(W_0 LN(x0) + b_0) (N, C) (None without spherical experts)."""
        h = self.gate_norm(x0)
        g = torch.softmax(self.gate(h), dim=-1)
        scalars = torch.nn.functional.silu(self.scalar_out(h)) if self.spherical is not None else None
        return g, scalars

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, K, C] -> update y [N, K, C]."""
        k = (self.l_max + 1) ** 2
        if x.dim() != 3 or x.shape[1] != k or x.shape[2] != self.channels:
            raise ValueError(f"MixtureOfHybridExperts: expected x of shape [N, K={k}, "
                             f"C={self.channels}], got {tuple(x.shape)}")
        g, scalars = self.gates(x[:, 0])
        y = None
        for e, expert in enumerate(self.steerable):
            term = g[:, e, None, None] * expert(x)
            y = term if y is None else y + term
        if self.spherical is not None:
            o = self.attention(self.grid.to_grid(x))  # (N, S, C)
            mix = None
            for e, expert in enumerate(self.spherical):
                term = g[:, self.n_steerable + e, None, None] * expert(o)
                mix = term if mix is None else mix + term
            y_sp = self.grid.from_grid(mix)
            sp = torch.cat([scalars[:, None], y_sp[:, 1:]], dim=1)
            y = sp if y is None else y + sp
        return y

    def extra_repr(self) -> str:
        return (f"l_max={self.l_max}, channels={self.channels}, n_steerable={self.n_steerable}, "
                f"n_spherical={self.n_spherical}")
