"""est_calc: Equivariant Spherical Transformer potentials for ASE.

Public entry points:

* :class:`est_calc.ESTCalculator` - the ASE calculator (``atoms.calc = ESTCalculator()``).
* :class:`est_calc.batch.AtomsBatch` and :func:`est_calc.neighbors.build_graph` - the batch object
  and graph that every code path (calculator, training, recipes, benchmarks) shares.
* :func:`est_calc.forces.energy_forces_stress` - the only place forces and stress are computed.
* :mod:`est_calc.nn` and :class:`est_calc.model.ESTModel` - the plain EST (the reference);
  :func:`est_calc.accel.accelerate` - the same function with every speed-up, which the
  calculator and the trainer run.
"""

from est_calc.threads import set_short_spin

__version__ = "0.3.0"

# OpenMP reads its spin count once, when torch loads: set it before anything imports torch
# (unless the user chose a wait policy), so that threads waiting at a barrier sleep after a few
# microseconds instead of spinning on a core another process needs (est_calc/threads.py).
set_short_spin()

__all__ = ["ESTCalculator", "__version__"]


def __getattr__(name):
    # The calculator pulls in ASE and the model; import it lazily so that `import est_calc.sphere`
    # stays light.
    if name == "ESTCalculator":
        from est_calc.calculator import ESTCalculator

        return ESTCalculator
    raise AttributeError(f"module 'est_calc' has no attribute {name!r}")
