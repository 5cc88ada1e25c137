"""Neural-network building blocks of EST, one concept per file.

* :mod:`est_calc.nn.so3` - exactly equivariant layers on [N, K, C] features (DWLinear,
  EquivariantLayerNorm, Gate).
"""

from est_calc.nn.so3 import DWLinear, EquivariantLayerNorm, Gate, degree_index

__all__ = ["DWLinear", "EquivariantLayerNorm", "Gate", "degree_index"]
