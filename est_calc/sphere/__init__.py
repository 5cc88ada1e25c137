"""The spherical domain of EST: sample points and the transforms between coefficients and grids.

* :mod:`est_calc.sphere.points` - Fibonacci lattices, Lebedev rules, the e3nn lat/long grid.
* :mod:`est_calc.sphere.grid` - :class:`SphericalGrid` (to_grid / from_grid as float64-derived
  buffers) and :func:`make_grid`.
"""

from est_calc.sphere.grid import GRID_KINDS, ExactBufferModule, SphericalGrid, make_grid, real_sh
from est_calc.sphere.points import (
    PointSet,
    fibonacci,
    fibonacci_poles,
    lat_long,
    lebedev,
    lebedev_degrees,
)

__all__ = [
    "GRID_KINDS",
    "ExactBufferModule",
    "PointSet",
    "SphericalGrid",
    "fibonacci",
    "fibonacci_poles",
    "lat_long",
    "lebedev",
    "lebedev_degrees",
    "make_grid",
    "real_sh",
]
