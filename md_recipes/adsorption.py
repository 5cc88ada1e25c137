"""Adsorption energies in the OC20 scheme.

E_ads = E(adsorbate + slab) - E(slab) - sum_i mu_i over the adsorbate's atoms, with the
atomic references taken from gas molecules relaxed with the same calculator:

    mu_H = E(H2) / 2,  mu_O = E(H2O) - E(H2),  mu_C = E(CO) - mu_O,  mu_N = E(N2) / 2

The clean slab and each adsorbate placement are relaxed with the subsurface held fixed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms
from ase.constraints import FixAtoms

from md_recipes.relax import default_calculator, relax, relax_many

__all__ = ["AdsorptionResult", "SiteResult", "adsorption_energy", "build_slab",
           "build_adsorbate", "compute_gas_references"]

_GAS_NEEDS = {"H": ("H2",), "O": ("H2O", "H2"), "C": ("CO", "H2O", "H2"), "N": ("N2",)}


@dataclass
class SiteResult:
    """One adsorption site.

    Attributes:
        site: site name ("ontop", "fcc", ...) or "(x, y)" for a Cartesian position in Å.
        E_ads_eV: adsorption energy in eV (negative: binding).
        energy_eV: total energy of the relaxed adsorbate + slab in eV.
        atoms: relaxed adsorbate + slab.
        converged: whether that relaxation met the force criterion.
    """

    site: str
    E_ads_eV: float
    energy_eV: float
    atoms: Atoms
    converged: bool


@dataclass
class AdsorptionResult:
    """Outcome of :func:`adsorption_energy`.

    Attributes:
        sites: one SiteResult per requested site, in request order.
        E_slab_eV: energy of the relaxed clean slab (eV).
        slab: the relaxed clean slab.
        slab_converged: whether the clean-slab relaxation converged.
        gas_references: the atomic references mu_X (eV) that were used.
    """

    sites: list[SiteResult]
    E_slab_eV: float
    slab: Atoms
    slab_converged: bool
    gas_references: dict[str, float] = field(default_factory=dict)

    @property
    def best(self) -> SiteResult:
        """The converged site with the lowest E_ads (any site if none converged)."""
        pool = [s for s in self.sites if s.converged] or self.sites
        return min(pool, key=lambda s: s.E_ads_eV)

    def table(self) -> str:
        """A short text table of the sites, most stable first."""
        lines = [f"{'site':<16}{'E_ads (eV)':>12}  converged"]
        for s in sorted(self.sites, key=lambda s: s.E_ads_eV):
            lines.append(f"{s.site:<16}{s.E_ads_eV:>12.4f}  {s.converged}")
        refs = ", ".join(f"mu_{k}={v:.4f}" for k, v in sorted(self.gas_references.items()))
        lines.append(f"E_slab = {self.E_slab_eV:.4f} eV; {refs}")
        return "\n".join(lines)


def build_slab(name: str, size=(3, 3, 4), vacuum_A: float = 10.0, a_A: float | None = None,
               n_fixed_layers: int = 2) -> Atoms:
    """Build a tagged slab by name, e.g. "Cu111", "Pt100", "Fe110", "Ru0001".

    Layers are tagged 1 (top) to n (bottom) by ASE; the bottom ``n_fixed_layers`` are fixed.

    Args:
        name: element symbol followed by the Miller index of the element's ASE reference lattice.
        size: repetitions (a, b, layers).
        vacuum_A: vacuum on each side in Å.
        a_A: lattice constant in Å (ASE's reference value if None).
        n_fixed_layers: number of bottom layers held by FixAtoms.

    Returns:
        The slab with adsorbate site info in ``slab.info["adsorbate_info"]``.
    """
    from ase import build
    from ase.data import atomic_numbers, reference_states

    match = re.fullmatch(r"([A-Z][a-z]?)(\d{3,4})", name.strip())
    if match is None or match.group(1) not in atomic_numbers:
        raise ValueError(f"slab name {name!r} is not like 'Cu111' (element + Miller index)")
    symbol, facet = match.groups()
    lattice = (reference_states[atomic_numbers[symbol]] or {}).get("symmetry")
    builder = getattr(build, f"{lattice}{facet}", None)
    if builder is None:
        raise ValueError(f"no {facet} surface builder for {symbol} ({lattice} reference lattice);"
                         " known: fcc111/100/110, bcc100/110/111, hcp0001/10m10")
    kwargs = {"vacuum": vacuum_A}
    if a_A is not None:
        kwargs["a"] = a_A
    slab = builder(symbol, size=tuple(size), **kwargs)
    n_layers = int(slab.get_tags().max())
    if not 0 <= n_fixed_layers < n_layers:
        raise ValueError(f"n_fixed_layers={n_fixed_layers} must be in [0, {n_layers})")
    slab.set_constraint(FixAtoms(mask=slab.get_tags() > n_layers - n_fixed_layers))
    return slab


def build_adsorbate(spec) -> Atoms:
    """An adsorbate with its binding atom first, at the origin, and the rest pointing up (+z).

    Args:
        spec: an Atoms (atom 0 binds) or a name: a chemical symbol ("O") or a molecule of
            :func:`ase.build.molecule` ("CO", "OH", "H2O", "NH3"). For names the binding atom is
            the first non-H element of the formula as written (C in "CO", O in "OH").
    """
    from ase.build import molecule
    from ase.collections import g2
    from ase.data import atomic_numbers

    if isinstance(spec, Atoms):
        ads = spec.copy()
        if len(ads) == 0:
            raise ValueError("the adsorbate has no atoms")
    elif isinstance(spec, str) and spec in atomic_numbers:
        return Atoms(spec, positions=[[0.0, 0.0, 0.0]])
    elif isinstance(spec, str) and spec in g2.names:
        ads = molecule(spec)
        heavy = [s for s in re.findall(r"[A-Z][a-z]?", spec) if s != "H"]
        binder = heavy[0] if heavy else "H"
        first = ads.get_chemical_symbols().index(binder)
        order = [first] + [i for i in range(len(ads)) if i != first]
        ads = ads[order]
    else:
        raise ValueError(f"unknown adsorbate {spec!r}: give an Atoms, an element symbol or a "
                         "molecule name of ase.build.molecule")
    ads.set_constraint()
    ads.positions -= ads.positions[0]
    ads.cell = np.zeros((3, 3))
    ads.pbc = False
    if len(ads) > 1:
        direction = ads.positions[1:].mean(axis=0)
        if np.linalg.norm(direction) > 1e-6:
            ads.rotate(direction, "z")
    return ads


def _element_counts(atoms: Atoms) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in atoms.get_chemical_symbols():
        counts[s] = counts.get(s, 0) + 1
    return counts


def compute_gas_references(elements, calc=None, *, fmax_eV_per_A: float = 0.01,
                   max_steps: int = 500, vacuum_A: float = 8.0) -> dict[str, float]:
    """OC20 atomic references mu_X (eV) for H, O, C, N from relaxed gas molecules."""
    from ase.build import molecule

    unknown = sorted(set(elements) - set(_GAS_NEEDS))
    if unknown:
        raise ValueError(f"no default gas reference for {unknown}; pass gas_references="
                         "{element: mu_eV} (defaults exist for H, O, C, N)")
    calc = default_calculator() if calc is None else calc
    needed = sorted({m for e in elements for m in _GAS_NEEDS[e]})
    E = {}
    for name in needed:
        mol = molecule(name)
        mol.center(vacuum=vacuum_A)
        res = relax(mol, calc, fmax_eV_per_A=fmax_eV_per_A, max_steps=max_steps, optimizer="BFGS")
        E[name] = float(res.atoms.get_potential_energy())
    mu = {}
    if "H2" in E:
        mu["H"] = E["H2"] / 2
    if "H2O" in E:
        mu["O"] = E["H2O"] - E["H2"]
    if "CO" in E:
        mu["C"] = E["CO"] - mu["O"]
    if "N2" in E:
        mu["N"] = E["N2"] / 2
    return {e: mu[e] for e in sorted(set(elements))}


def _fix_subsurface(slab: Atoms) -> Atoms:
    """Return slab; when it has no constraint, fix its bottom half of layers."""
    if slab.constraints:
        return slab
    tags = slab.get_tags()
    if tags.max() > 0 and np.all(tags > 0):
        n = int(tags.max())
        mask = tags > n - n // 2
    else:
        z = slab.positions[:, 2]
        levels = np.unique(np.round(z / 0.5))  # layers within 0.5 Å merge
        n_fix = len(levels) // 2
        mask = np.round(z / 0.5) <= levels[n_fix - 1] if n_fix else np.zeros(len(slab), bool)
    slab.set_constraint(FixAtoms(mask=mask))
    return slab


def adsorption_energy(
    slab: Atoms | str,
    adsorbate,
    calc=None,
    *,
    sites="all",
    gas_references: dict[str, float] | None = None,
    fmax_eV_per_A: float = 0.05,
    height_A: float = 1.8,
    max_steps: int = 300,
    optimizer: str = "FIRE",
) -> AdsorptionResult:
    """Adsorption energy of an adsorbate on every requested site of a slab.

    Args:
        slab: Atoms (with ASE site info for named sites) or a name for :func:`build_slab`.
        adsorbate: Atoms (atom 0 binds) or a name (see :func:`build_adsorbate`).
        calc: ASE calculator; None means ``ESTCalculator(skin=1.0)``.
        sites: "all" (every named site of the slab), or a list of site names and/or
            Cartesian (x, y) positions in Å.
        gas_references: {element: mu_eV}; None computes the OC20 references with ``calc``.
        fmax_eV_per_A: force criterion of every relaxation.
        height_A: initial height of the binding atom above the top layer (Å).
        max_steps: most steps per relaxation.
        optimizer: "FIRE" (batched over sites when the calculator offers calculate_batch),
            "BFGS" or "LBFGS".

    Returns:
        AdsorptionResult with one SiteResult per site.
    """
    from ase.build import add_adsorbate

    calc = default_calculator() if calc is None else calc
    slab = build_slab(slab) if isinstance(slab, str) else _fix_subsurface(slab.copy())
    ads = build_adsorbate(adsorbate)
    info = slab.info.get("adsorbate_info", {}).get("sites", {})
    if isinstance(sites, str):
        if sites != "all":
            sites = [sites]
        elif not info:
            raise ValueError("the slab has no named sites (slab.info['adsorbate_info']); "
                             "pass sites as (x, y) positions in Å")
        else:
            sites = list(info)
    if not sites:
        raise ValueError("no sites requested")
    for s in sites:
        if isinstance(s, str) and s not in info:
            raise ValueError(f"unknown site {s!r}; this slab has {list(info)}")

    counts = _element_counts(ads)
    if gas_references is None:
        mu = compute_gas_references(list(counts), calc, fmax_eV_per_A=min(fmax_eV_per_A, 0.01))
    else:
        missing = sorted(set(counts) - set(gas_references))
        if missing:
            raise ValueError(f"gas_references lacks {missing} (adsorbate elements {list(counts)})")
        mu = {e: float(gas_references[e]) for e in counts}
    mu_sum = sum(n * mu[e] for e, n in counts.items())

    clean = relax(slab, calc, fmax_eV_per_A=fmax_eV_per_A, max_steps=max_steps,
                  optimizer=optimizer)
    E_slab = float(clean.atoms.get_potential_energy())
    placed, labels = [], []
    for s in sites:
        system = clean.atoms.copy()
        system.calc = None
        system.info = dict(slab.info)
        position = s if isinstance(s, str) else tuple(float(v) for v in s)
        add_adsorbate(system, ads, height_A, position=position, mol_index=0)
        placed.append(system)
        labels.append(s if isinstance(s, str) else f"({position[0]:.2f}, {position[1]:.2f})")
    relaxed = relax_many(placed, calc, fmax_eV_per_A=fmax_eV_per_A, max_steps=max_steps,
                         optimizer=optimizer)
    results = []
    for label, r in zip(labels, relaxed):
        E = float(r.atoms.get_potential_energy())
        results.append(SiteResult(label, E - E_slab - mu_sum, E, r.atoms, r.converged))
    return AdsorptionResult(results, E_slab, clean.atoms, clean.converged, mu)
