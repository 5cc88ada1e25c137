"""EST update block (paper Fig. 2, EST_SPEC.md sections 6 and 7.1): x <- x + MoHE(LN_sh(x)).

:class:`ESTUpdateBlock` maps node features (N, K, C) to (N, K, C): to the grid, spherical
attention, the mixture of hybrid experts, back (:mod:`est_calc.nn.experts`).

:class:`ScalarUpdateBlock` is the same block built for the model's last layer, whose l > 0 output
nothing reads: it maps the l = 0 row (N, C) to the l = 0 row of the full block's result. Every
operation of the block maps l = 0 to l = 0 (LayerNorm's l = 0 part is an ordinary LayerNorm, a
DW-Linear's l = 0 row is x^0 W_0 + b, the Gate's is SiLU(x^0), the gate weights read x^0 only) and
the spherical branch's l = 0 row is replaced by SiLU(W_0 LN(x^0) + b_0), so

    y^0 = x^0 + sum_k g_k FFN^st_k(LN(x))^0 + SiLU(W_0 LN_g(LN(x)^0) + b_0)

with FFN^st^0 = (SiLU(LN(h^0) W^1_0 + b^1)) W^2_0 + b^2. No grid, no attention, no spherical
expert. It holds the full block's parameters (files and optimizer states written for the full
layer load unchanged); those it does not read get no gradient.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from est_calc.nn.experts import MixtureOfHybridExperts
from est_calc.nn.so3 import DWLinear, EquivariantLayerNorm
from est_calc.sphere import SphericalGrid

__all__ = ["ESTUpdateBlock", "ScalarUpdateBlock"]


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


def _row0(linear: DWLinear, x0: Tensor) -> Tensor:
    """The l = 0 row of a DW-Linear from the l = 0 row x0 [N, Cin]: x0 W_0 (+ b)."""
    return x0 @ linear.weight[0] if linear.bias is None else linear.bias.addmm(x0, linear.weight[0])


class ScalarUpdateBlock(ESTUpdateBlock):
    """The l = 0 row of :class:`ESTUpdateBlock` from the l = 0 row of its input (module
    docstring); same constructor and parameters."""

    def forward(self, x0: Tensor) -> Tensor:
        """x0: [N, C] -> [N, C], the l = 0 row of ``ESTUpdateBlock.forward`` of any x with
        x[:, 0] = x0."""
        experts = self.experts
        if x0.dim() != 2 or x0.shape[1] != experts.channels:
            raise ValueError(f"ScalarUpdateBlock: expected x0 of shape [N, C={experts.channels}], "
                             f"got {tuple(x0.shape)}")
        h0 = self.norm.scalar_norm(x0)
        g, scalars = experts.gates(h0)
        y = None
        for e, (norm, lin1, _gate, lin2) in enumerate(experts.steerable):
            hidden = F.silu(_row0(lin1, norm.scalar_norm(h0)))
            term = g[:, e, None] * _row0(lin2, hidden)
            y = term if y is None else y + term
        if scalars is not None:
            y = scalars if y is None else y + scalars
        return x0 + y
