"""Workflow recipes over ASE: relaxation, molecular dynamics and adsorption energies.

Every function takes an ASE calculator (``calc=None`` means ``est_calc``'s
``ESTCalculator(skin=1.0)``), so the same recipe runs with EST, EMT or any other ASE calculator.
Runs that leave the physical regime (non-finite or huge forces, runaway temperature, NVE energy
not conserved) stop with :class:`SimulationUnstable` rather than return numbers.

    >>> from md_recipes import relax, run_md, adsorption_energy   # doctest: +SKIP
    >>> res = relax(atoms, calc, fmax_eV_per_A=0.02, relax_cell=True)   # doctest: +SKIP
"""

from md_recipes.adsorption import (
    AdsorptionResult,
    SiteResult,
    adsorption_energy,
    build_adsorbate,
    build_slab,
    compute_gas_references,
)
from md_recipes.md import ENSEMBLES, MDResult, read_checkpoint, run_md
from md_recipes.plotting import plot_md
from md_recipes.relax import OPTIMIZERS, RelaxResult, relax, relax_many
from md_recipes.safety import SimulationUnstable

__all__ = [
    "AdsorptionResult",
    "ENSEMBLES",
    "MDResult",
    "OPTIMIZERS",
    "RelaxResult",
    "SimulationUnstable",
    "SiteResult",
    "adsorption_energy",
    "build_adsorbate",
    "build_slab",
    "compute_gas_references",
    "plot_md",
    "read_checkpoint",
    "relax",
    "relax_many",
    "run_md",
]
