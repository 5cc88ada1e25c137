"""Deployment: a potential exported to a self-contained AOTInductor package (``.pt2``).

::

    from est_calc.deploy import export_potential, load_package
    export_potential("est-emt-small", "model.pt2", dtype="float64")   # est export ... -o model.pt2
    calc = ESTCalculator(model="model.pt2", dtype="float64")           # runs the package
    calc = ESTCalculator("est-3bpa", compile="package")   # exported once into a cache (.cache)

A package holds one function with dynamic atom and pair counts (``export.EdgeEnergyModel``). It
takes every pair of neighbours once, as one edge i -> j; the reverse j -> i (vector -r_e) is
implied (format version 2; version 1 packages took both directions and are refused):

====================  ===============  ==================================================
input                 shape            meaning
====================  ===============  ==================================================
``positions``         (n, 3) float     Å
``atomic_numbers``    (n,) int64       Z of every atom (local and ghost)
``edge_index``        (2, P) int64     one edge i -> j per pair (which of the two does
                                       not matter; a periodic image of an atom itself
                                       once, with one of its two shifts)
``edge_shifts``       (P, 3) float     Å: r_e = positions[j] - positions[i] + edge_shifts[e]
                                       (ASE: unit shifts @ cell; LAMMPS: an image of a
                                       local atom folded onto it, x_image - x_owner;
                                       ghosts of other ranks: zeros)
``local_mask``        (n,) bool        atoms whose energies count (LAMMPS local atoms)
====================  ===============  ==================================================

====================  ===============  ==================================================
output                shape            meaning
====================  ===============  ==================================================
``energy``            () float         eV, sum of ``energies`` over the local atoms
``energies``          (n,) float       eV, every atom's energy (ghosts' are not used)
``forces``            (n, 3) float     eV/Å, -d energy / d positions (ghosts too)
``virial``            (3, 3) float     eV, W = -d energy / d strain (stress = -W / V)
``atom_virial``       (n, 3, 3) float  eV, symmetric, summing to ``virial``
====================  ===============  ==================================================

float is the package's dtype. LAMMPS gives periodic images of a rank's own atoms as edges to those
atoms with lattice-vector shifts, and other ranks' atoms as ghosts with real positions and zero
shifts (est_lammps/README.md). The energy of atom i depends on the atoms within n_layers + 1 hops
(the edge-degree embedding is one hop, each layer one more): every atom within (n_layers + 1) x
cutoff of a local atom must be present (itself, or as the owner of a shifted edge), and every atom
within n_layers x cutoff must have all its pairs, for the local energies, and so the forces
summed onto the owners of the ghosts, to be exact. Edges longer than the cutoff (a neighbour list
with a skin) contribute exactly nothing.

The package's AOTInductor metadata (strings, read in C++ with
``AOTIModelPackageLoader::get_metadata()``) names the format, its version, the species, the
cutoff, the number of layers, the ghost reach, the dtype and the versions that made it
(:mod:`.package`).

Deployment depends on the core (model, forces, potential), never the reverse: the calculator
imports this package only when it is given a ``.pt2`` file.
"""

from est_calc.deploy.cache import cached_package
from est_calc.deploy.export import EdgeEnergyModel, ExportError, export_potential
from est_calc.deploy.package import (
    FORMAT,
    FORMAT_VERSION,
    INPUTS,
    OUTPUTS,
    DeployedPotential,
    is_package_path,
    load_package,
    read_metadata,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "INPUTS",
    "OUTPUTS",
    "DeployedPotential",
    "EdgeEnergyModel",
    "ExportError",
    "cached_package",
    "export_potential",
    "is_package_path",
    "load_package",
    "read_metadata",
]
