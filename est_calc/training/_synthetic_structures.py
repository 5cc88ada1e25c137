"""Structures for the synthetic EMT data: adsorbates, EMT lattice constants and gas references,
slabs and alloys with OC20 tags and constraints, surface sites and adsorbate placement.

Used by :mod:`est_calc.training.synthetic`; every random choice draws from the generator passed in.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk, fcc100, fcc110, fcc111, molecule
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.data import reference_states
from ase.optimize import BFGS, FIRE

def _find_shared_adsorbates() -> Path:
    """The OC20 adsorbate set in the project's shared/ folder (beside the source tree)."""
    rel = Path("shared") / "data" / "oc20_format" / "oc20_adsorbates.extxyz"
    repo = Path(__file__).resolve().parents[2]
    for base in (repo.parent, repo, Path("/work")):
        if (base / rel).is_file():
            return base / rel
    return repo.parent / rel  # reported as missing, with this path, when used


DEFAULT_ADSORBATES_PATH = _find_shared_adsorbates()
DEFAULT_METALS = ("Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al")
GAS_MOLECULES = ("H2", "H2O", "CO", "N2")
FACETS = {"111": fcc111, "100": fcc100, "110": fcc110}
SLAB_SIZES = ((2, 2, 3), (2, 2, 4), (3, 3, 3), (3, 3, 4))
_ADS_ELEMENTS = frozenset("HCNO")

__all__ = ["DEFAULT_ADSORBATES_PATH", "DEFAULT_METALS", "GAS_MOLECULES", "FACETS", "SLAB_SIZES",
           "load_adsorbates", "emt_lattice_constant", "relax", "gas_references",
           "relaxed_gas_molecule", "rattle", "pick_composition", "alloy", "build_slab",
           "surface_site", "place"]


def load_adsorbates(path=DEFAULT_ADSORBATES_PATH,
                    names=None) -> dict[str, tuple[Atoms, np.ndarray]]:
    """Read the OC20 adsorbate set and keep the entries made of H, C, N, O only.

    Args:
        path: the ``oc20_adsorbates.extxyz`` file (SMILES in ``info["smiles"]``, binding atom
            indices in ``info["binding_indices"]``).
        names: SMILES to keep (e.g. ``["*CO", "*OH"]``); None keeps all H/C/N/O entries.

    Returns:
        ``{smiles: (atoms, binding_indices)}`` in file order; ``binding_indices`` is (k,) int.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: an unknown name, or a name with an element other than H, C, N, O.
    """
    import ase.io

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"OC20 adsorbate file not found: {path} (pass adsorbates_path=...)")
    table = {}
    for atoms in ase.io.read(path, ":", format="extxyz"):
        binding = np.atleast_1d(np.asarray(atoms.info["binding_indices"], dtype=np.int64))
        table[str(atoms.info["smiles"])] = (atoms, binding)
    allowed = {k: v for k, v in table.items() if set(v[0].get_chemical_symbols()) <= _ADS_ELEMENTS}
    if names is None:
        return allowed
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown adsorbates {unknown}; known SMILES include {list(table)[:8]}...")
    bad = [n for n in names if n not in allowed]
    if bad:
        raise ValueError(f"adsorbates {bad} contain elements other than H, C, N, O")
    return {n: allowed[n] for n in dict.fromkeys(names)}


@functools.lru_cache(maxsize=None)
def emt_lattice_constant(metal: str) -> float:
    """EMT's own fcc lattice constant (Å): the zero of the EMT pressure, bracketed at +-6 %.

    Found by Brent's method on the analytic EMT stress of the primitive cell, starting from
    ASE's reference lattice constant; cached per process.
    """
    from scipy.optimize import brentq

    def pressure(a: float) -> float:
        cell = bulk(metal, "fcc", a=a)
        cell.calc = EMT()
        return float(cell.get_stress()[:3].mean())

    a0 = reference_states[bulk(metal).numbers[0]]["a"]
    return float(brentq(pressure, 0.94 * a0, 1.06 * a0, xtol=1e-10))


def relax(atoms: Atoms, fmax: float, steps: int, optimizer=FIRE) -> float:
    """Relax ``atoms`` in place with EMT (fmax in eV/Å, at most ``steps``); return E in eV."""
    atoms.calc = EMT()
    optimizer(atoms, logfile=None).run(fmax=fmax, steps=steps)
    return float(atoms.get_potential_energy())


def gas_references() -> tuple[dict[str, float], dict[str, float]]:
    """EMT-relaxed gas molecule energies and the OC20 per-element chemical potentials.

    Returns:
        ``({"H2": E, "H2O": E, "CO": E, "N2": E}, {"H": mu_H, "C": mu_C, "N": mu_N, "O": mu_O})``,
        all in eV.
    """
    e, mu = _gas_references()
    return dict(e), dict(mu)


@functools.lru_cache(maxsize=1)
def _gas_references():
    e = {name: _relaxed_gas_molecule(name).get_potential_energy() for name in GAS_MOLECULES}
    mu_o = e["H2O"] - e["H2"]
    return e, {"H": e["H2"] / 2, "O": mu_o, "C": e["CO"] - mu_o, "N": e["N2"] / 2}


def relaxed_gas_molecule(name: str) -> Atoms:
    """``ase.build.molecule(name)`` relaxed with EMT (BFGS, fmax 1e-4 eV/Å); a fresh copy."""
    return _relaxed_gas_molecule(name).copy()


@functools.lru_cache(maxsize=None)
def _relaxed_gas_molecule(name: str) -> Atoms:
    mol = molecule(name)
    relax(mol, 1e-4, 500, BFGS)
    return mol


def rattle(atoms: Atoms, rng, sigma: float) -> Atoms:
    """A copy with N(0, sigma^2) Å displacements on every atom not held by FixAtoms."""
    out = atoms.copy()
    free = ~_fixed_mask(out)
    out.positions[free] += rng.normal(0.0, sigma, size=(int(free.sum()), 3))
    return out


def _fixed_mask(atoms: Atoms) -> np.ndarray:
    mask = np.zeros(len(atoms), bool)
    for c in atoms.constraints:
        if isinstance(c, FixAtoms):
            mask[c.get_indices()] = True
    return mask


def pick_composition(rng, metals, alloy_fraction: float, alloys_only: bool, n_components: int = 2):
    """Choose a metal or a random alloy; return (host, guest or None, guest fraction).

    ``n_components = 2``: a binary alloy, guest a symbol. ``n_components = 3``: a ternary alloy,
    guest a tuple of two symbols sharing the guest fraction (an alloy class absent from the
    default data, for hold-out sets). The binary path draws exactly what it always drew.
    """
    if alloys_only or (len(metals) > 1 and rng.random() < alloy_fraction):
        if n_components == 3:
            host, g1, g2 = (str(m) for m in rng.choice(metals, 3, replace=False))
            return host, (g1, g2), float(rng.uniform(0.3, 0.6))
        host, guest = (str(m) for m in rng.choice(metals, 2, replace=False))
        return host, guest, float(rng.uniform(0.15, 0.5))
    return str(rng.choice(metals)), None, 0.0


def alloy(atoms: Atoms, rng, host, guest, x, lattice) -> float:
    """Substitute a fraction x of atoms by ``guest`` (a symbol, or a pair sharing x equally);
    return the Vegard lattice constant."""
    if guest is None:
        return lattice[host]
    n_sub = int(np.clip(round(x * len(atoms)), 1, len(atoms) - 1))
    idx = rng.choice(len(atoms), n_sub, replace=False)
    symbols = np.array(atoms.get_chemical_symbols())
    guests = (guest,) if isinstance(guest, str) else tuple(guest)
    parts = np.array_split(idx, len(guests))
    for g, part in zip(guests, parts):
        symbols[part] = g
    atoms.set_chemical_symbols(symbols.tolist())
    a = (1 - n_sub / len(atoms)) * lattice[host]
    for g, part in zip(guests, parts):
        a += len(part) / len(atoms) * lattice[g]
    return a


def build_slab(rng, facet, size, metals, alloy_fraction, alloys_only, lattice,
               alloy_components: int = 2) -> Atoms:
    """An fcc slab (metal or random binary alloy) with OC20 tags and FixAtoms below the top layer.

    Args:
        facet: "111", "100" or "110". size: (nx, ny, layers). lattice: {metal: a in Å}.
        The vacuum (each side) is drawn from 7-10 Å; pbc is True in all directions as in OC20.
    """
    host, guest, x = pick_composition(rng, metals, alloy_fraction, alloys_only, alloy_components)
    probe = FACETS[facet](host, size=size, a=lattice[host], vacuum=1.0)
    a = alloy(probe, rng, host, guest, x, lattice)  # decides which sites carry the guest
    slab = FACETS[facet](host, size=size, a=a, vacuum=float(rng.uniform(7.0, 10.0)))
    slab.set_chemical_symbols(probe.get_chemical_symbols())
    layer = slab.get_tags()  # ASE numbers layers from the top: 1 = top layer
    slab.set_tags(np.where(layer == 1, 1, 0))
    slab.set_constraint(FixAtoms(mask=layer != 1))
    slab.pbc = True
    return slab


def surface_site(slab: Atoms, rng) -> tuple[str, np.ndarray]:
    """A random ontop, bridge or hollow site (x, y) on the top layer."""
    top = slab.positions[slab.get_tags() == 1]
    i = int(rng.integers(len(top)))
    cell = slab.cell.array
    shifts = np.array([(p, q, 0) for p in (-1, 0, 1) for q in (-1, 0, 1)]) @ cell
    vecs = (top[None, :, :] + shifts[:, None, :] - top[i]).reshape(-1, 3)[:, :2]
    dist = np.linalg.norm(vecs, axis=1)
    d_nn = dist[dist > 1e-6].min()
    near = vecs[(dist > 1e-6) & (dist < 1.45 * d_nn)]
    kind = str(rng.choice(["ontop", "bridge", "hollow"]))
    if kind == "bridge":
        first = near[np.linalg.norm(near, axis=1) < 1.05 * d_nn]
        return kind, top[i, :2] + first[rng.integers(len(first))] / 2
    if kind == "hollow":
        # Triangle (60 deg, fcc111) or rectangle (90 deg, fcc100/110) spanned by two in-plane
        # neighbours, at least one of them a first neighbour (two diagonals would meet an atom).
        length = np.linalg.norm(near, axis=1)
        cos = (near @ near.T) / np.outer(length, length)
        first = length < 1.05 * d_nn
        tri, rect = np.abs(cos - 0.5) < 0.05, np.abs(cos) < 0.05
        pairs = [(j, k, 3.0 if tri[j, k] else 2.0)
                 for j in range(len(near)) for k in range(j + 1, len(near))
                 if (first[j] or first[k]) and (tri[j, k] or rect[j, k])]
        if pairs:
            j, k, div = pairs[rng.integers(len(pairs))]
            return kind, top[i, :2] + (near[j] + near[k]) / div
    return "ontop", top[i, :2].copy()


def place(slab: Atoms, ads: Atoms, binding: np.ndarray, rng) -> tuple[Atoms, str]:
    """Put the adsorbate's binding atom(s) 1.5-2.0 Å above a site, randomly turned about z.

    The molecule is first turned so that its centroid lies straight above the binding atom(s);
    it is lifted further if any atom would come closer than 1 Å to the top layer's height.

    Returns:
        (adslab with tags 0/1/2 and FixAtoms on tag 0, wrapped into the cell; site kind).
    """
    kind, xy = surface_site(slab, rng)
    mol = ads.copy()
    anchor = mol.positions[binding].mean(axis=0)
    up = mol.positions.mean(axis=0) - anchor  # binding atom(s) down: the rest points along +z
    if np.linalg.norm(up) > 0.1:
        mol.rotate(up, (0.0, 0.0, 1.0), center=anchor)
    mol.rotate(float(rng.uniform(0.0, 360.0)), "z", center=anchor)
    z_top = slab.positions[slab.get_tags() == 1, 2].max()
    target = np.array([xy[0], xy[1], z_top + rng.uniform(1.5, 2.0)])
    mol.positions += target - mol.positions[binding].mean(axis=0)
    mol.positions[:, 2] += max(0.0, z_top + 1.0 - mol.positions[:, 2].min())
    mol.set_tags(2)
    mol.cell, mol.pbc = slab.cell, slab.pbc
    out = slab.copy() + mol
    out.set_constraint(FixAtoms(mask=out.get_tags() == 0))
    out.wrap()
    return out, kind
