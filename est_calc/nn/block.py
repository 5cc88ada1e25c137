"""EST update block (paper Fig. 2, EST_SPEC.md sections 6 and 7.1): x <- x + MoHE(LN_sh(x))."""

from __future__ import annotations

from torch import Tensor, nn

from est_calc.nn.experts import MixtureOfHybridExperts
from est_calc.nn.so3 import EquivariantLayerNorm
from est_calc.sphere import SphericalGrid

__all__ = ["ESTUpdateBlock"]


class ESTUpdateBlock(nn.Module):
    """Pre-norm residual mixture-of-hybrid-experts block on node features.

    Args:
        l_max: maximum degree L.
        channels: C.
        grid: SphericalGrid shared by the spherical experts (grid.l_max == l_max).
        n_heads: attention heads of the spherical branch.
        l_roe: Legendre terms in the orientation bias.
        n_steerable: steerable experts E_st.
        n_spherical: spherical experts E_sp.
        hidden_mult: expert hidden width multiplier.
    """

    def __init__(self, l_max: int, channels: int, grid: SphericalGrid, n_heads: int = 4,
                 l_roe: int = 2, n_steerable: int = 1, n_spherical: int = 1,
                 hidden_mult: int = 2) -> None:
        super().__init__()
        self.norm = EquivariantLayerNorm(l_max, channels)
        self.experts = MixtureOfHybridExperts(
            l_max, channels, grid, n_steerable=n_steerable, n_spherical=n_spherical,
            n_heads=n_heads, l_roe=l_roe, hidden_mult=hidden_mult)

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, K, C] -> [N, K, C]."""
        return x + self.experts(self.norm(x))

    def forward_scalars(self, x0: Tensor) -> Tensor:
        """The l = 0 row of :meth:`forward` from the l = 0 row x0 [N, C] alone -> [N, C]
        (the norm's scalar part and :meth:`MixtureOfHybridExperts.forward_scalars`)."""
        return x0 + self.experts.forward_scalars(self.norm.forward_scalars(x0))
