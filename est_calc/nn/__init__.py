"""The plain EST, one concept per file; every block's ``forward`` follows EST_SPEC.

* :mod:`est_calc.nn.edges` - :class:`EdgeFeatures`, what every block reads about the edges.
* :mod:`est_calc.nn.radial` - radial bases, the cutoff envelope, radial MLPs.
* :mod:`est_calc.nn.wigner` - edge frames and Wigner-D rotations into them.
* :mod:`est_calc.nn.so3` - exactly equivariant layers on [N, K, C] features (DWLinear,
  EquivariantLayerNorm, Gate).
* :mod:`est_calc.nn.embedding` - atom and edge-degree embeddings.
* :mod:`est_calc.nn.message_so2` - the SO(2) message: rotate, modulate, conv, gate, conv, attend,
  rotate back.
* :mod:`est_calc.nn.message` - the full-EST message (spherical cross-attention per edge).
* :mod:`est_calc.nn.attention` - spherical attention with the Legendre orientation bias.
* :mod:`est_calc.nn.experts` - the mixture of hybrid (steerable + spherical) experts.
* :mod:`est_calc.nn.block` - the EST update block x + MoHE(LN(x)): to the grid, attention,
  experts, back.
* :mod:`est_calc.nn.repulsion` - the ZBL short-range repulsion.

Speed-ups that leave these functions unchanged live in :mod:`est_calc.accel`.
"""

from est_calc.nn.attention import SphericalAttention
from est_calc.nn.block import ESTUpdateBlock, ScalarUpdateBlock
from est_calc.nn.edges import EdgeFeatures, encode_edges
from est_calc.nn.experts import MixtureOfHybridExperts
from est_calc.nn.so3 import DWLinear, EquivariantLayerNorm, Gate, degree_index

__all__ = [
    "DWLinear",
    "ESTUpdateBlock",
    "EdgeFeatures",
    "EquivariantLayerNorm",
    "Gate",
    "MixtureOfHybridExperts",
    "ScalarUpdateBlock",
    "SphericalAttention",
    "degree_index",
    "encode_edges",
]
