"""Neural-network building blocks of EST, one concept per file.

* :mod:`est_calc.nn.so3` - exactly equivariant layers on [N, K, C] features (DWLinear,
  EquivariantLayerNorm, Gate).
* :mod:`est_calc.nn.attention` - spherical attention with the Legendre orientation bias.
* :mod:`est_calc.nn.experts` - the mixture of hybrid (steerable + spherical) experts.
* :mod:`est_calc.nn.block` - the EST update block x + MoHE(LN(x)).
"""

from est_calc.nn.attention import SphericalAttention, fused_attention, fused_attention_enabled
from est_calc.nn.block import ESTUpdateBlock
from est_calc.nn.experts import MixtureOfHybridExperts
from est_calc.nn.so3 import DWLinear, EquivariantLayerNorm, Gate, degree_index

__all__ = [
    "DWLinear",
    "ESTUpdateBlock",
    "EquivariantLayerNorm",
    "Gate",
    "MixtureOfHybridExperts",
    "SphericalAttention",
    "degree_index",
    "fused_attention",
    "fused_attention_enabled",
]
