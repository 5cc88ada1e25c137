"""OC20-style synthetic S2EF data with ASE's EMT as the teacher (seeded and deterministic).

Each adsorbate+slab *system* is an fcc(111)/(100)/(110) slab of one metal or a random binary alloy
with one OC20 adsorbate (H/C/N/O only) on an ontop, bridge or hollow site. Its frames come from a
short EMT FIRE relaxation (every ``relax_stride``-th step), Gaussian rattles of the free atoms, and
a short Langevin run. Strained, rattled bulk cells (with stress) and isolated gas molecules are
added as extra systems. Labels are recomputed with EMT on positions rounded to 1e-8 Å, the
precision of the extxyz writer, so every written structure reproduces its labels exactly.

Tags follow OC20: 0 subsurface (FixAtoms), 1 top layer (free), 2 adsorbate. Bulk atoms get tag 1
(free); gas molecules tag 2. ``reference_energy`` = E(EMT-relaxed clean slab) + sum of gas
references of the adsorbate atoms, with mu_H = E(H2)/2, mu_O = E(H2O) - E(H2),
mu_C = E(CO) - mu_O, mu_N = E(N2)/2 from EMT-relaxed molecules; it is 0.0 for bulk and gas
frames (their ``energy`` is the plain total). Frames with a per-atom force norm above
``max_force_eV_per_A`` are dropped and counted (their ``fid`` is left as a gap).

Every system draws from its own generator ``default_rng([seed, index])``, so a seed fixes every
array bit for bit on a given platform.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.md.langevin import Langevin
try:  # ASE >= 3.29
    from ase.md.velocitydistribution import thermalize_momenta
except ImportError:  # pragma: no cover - older ASE
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta
from ase.optimize import FIRE

from ._synthetic_structures import (DEFAULT_ADSORBATES_PATH, DEFAULT_METALS, FACETS, GAS_MOLECULES,
                                    SLAB_SIZES, alloy, build_slab, emt_lattice_constant,
                                    gas_references, load_adsorbates, pick_composition, place,
                                    rattle, relax, relaxed_gas_molecule)

__all__ = ["generate", "add_generate_parser", "load_adsorbates", "emt_lattice_constant",
           "gas_references", "DEFAULT_ADSORBATES_PATH", "DEFAULT_METALS", "FORMATS"]

FORMATS = ("extxyz", "aselmdb", "hdf5")


def _label(atoms: Atoms, kind: str, calc: EMT, stress: bool = False) -> Atoms:
    """Copy, round positions to the extxyz precision, and attach EMT labels as a single point.

    ``calc`` is reused within a system so that its neighbour list is only updated, not rebuilt.
    """
    frame = atoms.copy()
    frame.positions = np.round(frame.positions, 8)
    frame.calc = calc
    results = {"energy": frame.get_potential_energy(),
               "forces": frame.get_forces(apply_constraint=False)}
    if stress:
        results["stress"] = frame.get_stress(voigt=False)
    frame.calc = SinglePointCalculator(frame, **results)
    frame.info = {"kind": kind}
    return frame


def _adslab_frames(rng, spec: dict, ads_table: dict, lattice: dict, mu: dict) -> list[Atoms]:
    """All frames of one adsorbate+slab system (relaxation, rattles, MD) with their reference."""
    name = list(ads_table)[rng.integers(len(ads_table))]
    ads, binding = ads_table[name]
    size = SLAB_SIZES[rng.integers(len(SLAB_SIZES))]
    if len(ads) > 3:
        size = (3, 3, size[2])
    facet = str(rng.choice(spec["facets"]))
    slab = build_slab(rng, facet, size, spec["metals"], spec["alloy_fraction"],
                      spec["alloys_only"], lattice, spec["alloy_components"])
    e_slab = relax(slab, 0.05, 100)
    reference = e_slab + sum(mu[s] for s in ads.get_chemical_symbols())
    atoms, site_kind = place(slab, ads, binding, rng)
    n_total = spec["frames_per_system"]
    n_relax, n_md = max(1, int(0.4 * n_total)), int(0.3 * n_total)
    stride = spec["relax_stride"]
    frames: list[Atoms] = []
    labeler = EMT()
    atoms.calc = EMT()
    opt = FIRE(atoms, logfile=None)
    opt.attach(lambda: len(frames) < n_relax and frames.append(_label(atoms, "relax", labeler)),
               interval=stride)
    opt.run(fmax=0.05, steps=n_relax * stride)
    relaxed = atoms.copy()
    n_rattle = n_total - n_md - len(frames)  # a relaxation that converged early gives more rattles
    for _ in range(n_rattle):
        frames.append(_label(rattle(relaxed, rng, rng.uniform(0.05, 0.15)), "rattle", labeler))
    if n_md:
        md = relaxed.copy()
        md.calc = EMT()
        t_lo, t_hi = spec["md_temperatures_K"]
        temp = float(rng.uniform(t_lo, t_hi))
        thermalize_momenta(md, temperature_K=temp, rng=rng)
        dyn = Langevin(md, 0.5 * units.fs, temperature_K=temp, friction=0.02 / units.fs,
                       fixcm=False, rng=rng)
        for _ in range(n_md):
            dyn.run(spec["md_stride"])
            frames.append(_label(md, "md", labeler))
    for frame in frames:
        frame.info.update(reference_energy=reference, adsorbate=name, facet=facet, site=site_kind)
    return frames


def _bulk_frames(rng, spec: dict, lattice: dict) -> list[Atoms]:
    """Randomly strained (symmetric, up to 3 %) and rattled fcc supercells with stress labels."""
    host, guest, x = pick_composition(rng, spec["metals"], spec["alloy_fraction"],
                                      spec["alloys_only"], spec["alloy_components"])
    base = bulk(host, "fcc", a=lattice[host], cubic=True).repeat((2, 2, 2))
    a = alloy(base, rng, host, guest, x, lattice)
    base.set_cell(base.cell.array * a / lattice[host], scale_atoms=True)
    base.set_tags(1)
    frames, labeler = [], EMT()
    for _ in range(spec["frames_per_system"]):
        eps = rng.uniform(-0.03, 0.03, size=(3, 3))
        strained = base.copy()
        strained.set_cell(base.cell.array @ (np.eye(3) + (eps + eps.T) / 2), scale_atoms=True)
        strained = rattle(strained, rng, rng.uniform(0.02, 0.08))
        frames.append(_label(strained, "bulk", labeler, stress=True))
    for frame in frames:
        frame.info["reference_energy"] = 0.0
    return frames


def _gas_frames(rng, atoms: Atoms, n_frames: int) -> list[Atoms]:
    """The molecule plus rattles, alone in a 14 Å box without periodicity (pbc False)."""
    mol = atoms.copy()
    mol.cell, mol.pbc = np.eye(3) * 14.0, False
    mol.center()
    mol.set_tags(2)
    labeler = EMT()
    frames = [_label(mol, "gas", labeler)]
    frames += [_label(rattle(mol, rng, rng.uniform(0.02, 0.08)), "gas", labeler)
               for _ in range(n_frames - 1)]
    for frame in frames:
        frame.info["reference_energy"] = 0.0
    return frames


def _check_options(n_systems, metals, facets, formats, alloys_only, md_temperatures_K,
                   frames_per_system, alloy_fraction, relax_stride, md_stride,
                   alloy_components):
    if int(n_systems) < 0:
        raise ValueError(f"n_systems must be >= 0, got {n_systems}")
    if int(frames_per_system) < 1:
        raise ValueError(f"frames_per_system must be >= 1, got {frames_per_system}")
    bad = [m for m in metals if m not in DEFAULT_METALS]
    if not metals or bad:
        raise ValueError(f"metals must be a non-empty subset of {DEFAULT_METALS}, got {metals}")
    if alloys_only and len(set(metals)) < 2:
        raise ValueError("alloys_only=True needs at least two metals")
    if alloy_components not in (2, 3):
        raise ValueError(f"alloy_components must be 2 or 3, got {alloy_components!r}")
    if alloy_components == 3 and len(set(metals)) < 3:
        raise ValueError("alloy_components=3 needs at least three metals")
    if not facets or any(f not in FACETS for f in facets):
        raise ValueError(f"facets must be a non-empty subset of {tuple(FACETS)}, got {facets}")
    if any(f not in FORMATS for f in formats):
        raise ValueError(f"formats must be a subset of {FORMATS}, got {formats}")
    if int(relax_stride) < 1 or int(md_stride) < 1:
        raise ValueError(f"relax_stride and md_stride must be >= 1, got {relax_stride}, {md_stride}")
    if not 0.0 <= alloy_fraction <= 1.0:
        raise ValueError(f"alloy_fraction must be in [0, 1], got {alloy_fraction}")
    if len(md_temperatures_K) != 2 or not 0 < md_temperatures_K[0] <= md_temperatures_K[1]:
        raise ValueError(f"md_temperatures_K must be (low, high) > 0, got {md_temperatures_K}")


def _write(frames: list[Atoms], out_dir: Path, formats, stem: str) -> list[str]:
    """Write the frames in each requested format with the est_calc.training.datasets writers."""
    from est_calc.training.datasets import (frame_from_atoms, write_ase_db,
                                            write_extxyz_with_sidecar, write_hdf5)

    records = [frame_from_atoms(a) for a in frames]
    written = []
    if "extxyz" in formats:
        write_extxyz_with_sidecar(records, out_dir / f"{stem}.extxyz")
        written += [str(out_dir / f"{stem}.extxyz"), str(out_dir / f"{stem}.txt")]
    if "aselmdb" in formats:
        write_ase_db(records, out_dir / f"{stem}.aselmdb")
        written.append(str(out_dir / f"{stem}.aselmdb"))
    if "hdf5" in formats:
        write_hdf5(records, out_dir / f"{stem}.h5",
                   metadata={"generator": "est_calc.training.synthetic"})
        written.append(str(out_dir / f"{stem}.h5"))
    return written


def generate(out_dir, *, n_systems: int, seed: int, metals=DEFAULT_METALS, facets=("111", "100"),
             alloy_fraction: float = 0.3, alloys_only: bool = False, alloy_components: int = 2,
             adsorbates=None,
             adsorbates_path=DEFAULT_ADSORBATES_PATH, frames_per_system: int = 10,
             md_temperatures_K=(300.0, 1000.0), include_bulk: bool = True,
             include_gas: bool = True, formats=FORMATS, max_force_eV_per_A: float = 50.0,
             relax_stride: int = 5, md_stride: int = 8, stem: str = "synthetic",
             progress: bool = True) -> dict:
    """Generate an OC20-style EMT data set into ``out_dir``.

    Args:
        out_dir: output folder (created). Files: ``<stem>.extxyz`` + ``<stem>.txt``,
            ``<stem>.aselmdb``, ``<stem>.h5`` (as chosen by ``formats``) and ``summary.json``.
        n_systems: number of adsorbate+slab systems, each giving ``frames_per_system`` frames
            (before force filtering).
        seed: fixes every random choice; the same seed gives identical arrays.
        metals: metals to draw slabs and alloy components from (subset of DEFAULT_METALS).
        facets: fcc facets among "111", "100", "110".
        alloy_fraction: probability that a system is a random binary alloy.
        alloys_only: make every slab and bulk cell an alloy (for an unseen-alloy hold-out set).
        alloy_components: 2 (random binary alloys) or 3 (random ternary alloys: an alloy class
            the default data never contains, for an out-of-distribution set).
        adsorbates: SMILES to use; None means every H/C/N/O adsorbate of the OC20 set.
        adsorbates_path: the OC20 ``oc20_adsorbates.extxyz``.
        frames_per_system: frames per slab or bulk system (about 40 % relaxation, 30 % MD, the
            rest rattles); gas systems get ``max(2, frames_per_system // 3)``.
        md_temperatures_K: (low, high) range of Langevin temperatures, K.
        include_bulk: add ``max(1, n_systems // 10)`` strained bulk systems with stress labels.
        include_gas: add H2, H2O, CO, N2 and up to four adsorbates in vacuum.
        formats: subset of ("extxyz", "aselmdb", "hdf5").
        max_force_eV_per_A: frames with a larger per-atom force norm are dropped and counted.
        relax_stride: keep every this-many-th FIRE step.
        md_stride: Langevin steps (0.5 fs each) between kept MD frames.
        stem: base name of the data files.
        progress: show a tqdm bar.

    Returns:
        Summary dict: frames by kind, filtered counts, atom counts, element counts, lattice
        constants, gas references, files written and seconds taken.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    metals, facets, formats = tuple(metals), tuple(str(f) for f in facets), tuple(formats)
    _check_options(n_systems, metals, facets, formats, alloys_only, md_temperatures_K,
                   frames_per_system, alloy_fraction, relax_stride, md_stride, alloy_components)
    ads_table = load_adsorbates(adsorbates_path, adsorbates)
    if not ads_table:
        raise ValueError("no adsorbate made of H, C, N, O was selected")
    lattice = {m: emt_lattice_constant(m) for m in sorted(set(metals))}
    gas_e, mu = gas_references()
    spec = dict(metals=metals, facets=facets, alloy_fraction=alloy_fraction,
                alloy_components=int(alloy_components),
                alloys_only=alloys_only, frames_per_system=int(frames_per_system),
                md_temperatures_K=tuple(md_temperatures_K), relax_stride=int(relax_stride),
                md_stride=int(md_stride))
    jobs = [("adslab", None)] * int(n_systems)
    if include_bulk:
        jobs += [("bulk", None)] * max(1, int(n_systems) // 10)
    if include_gas:
        jobs += [("gas", name) for name in GAS_MOLECULES]
        picks = np.random.default_rng([seed, 1 << 30]).permutation(len(ads_table))[:4]
        jobs += [("gas", list(ads_table)[i]) for i in sorted(picks)]
    sids = np.random.default_rng(seed).choice(10**9, size=len(jobs), replace=False)

    kept, filtered = [], {}
    for index, (kind, name) in enumerate(tqdm(jobs, desc="EMT systems", disable=not progress)):
        rng = np.random.default_rng([seed, index])
        if kind == "adslab":
            frames = _adslab_frames(rng, spec, ads_table, lattice, mu)
        elif kind == "bulk":
            frames = _bulk_frames(rng, spec, lattice)
        else:
            mol = relaxed_gas_molecule(name) if name in GAS_MOLECULES else ads_table[name][0]
            frames = _gas_frames(rng, mol, max(2, int(frames_per_system) // 3))
        for fid, frame in enumerate(frames):
            frame.info.update(sid=int(sids[index]), fid=fid)
            f_max = np.linalg.norm(frame.calc.results["forces"], axis=1).max()
            if f_max > max_force_eV_per_A:
                filtered[frame.info["kind"]] = filtered.get(frame.info["kind"], 0) + 1
            else:
                kept.append(frame)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = _write(kept, out_dir, formats, stem) if kept else []
    by_kind, elements = {}, {}
    for frame in kept:
        by_kind[frame.info["kind"]] = by_kind.get(frame.info["kind"], 0) + 1
        for sym in frame.get_chemical_symbols():
            elements[sym] = elements.get(sym, 0) + 1
    sizes = [len(f) for f in kept] or [0]
    summary = {"seed": int(seed), "n_systems": len(jobs), "n_frames": len(kept),
               "frames_by_kind": dict(sorted(by_kind.items())),
               "n_filtered": sum(filtered.values()),
               "filtered_by_kind": dict(sorted(filtered.items())),
               "max_force_eV_per_A": float(max_force_eV_per_A), "n_atoms_total": int(sum(sizes)),
               "atoms_per_frame": [int(min(sizes)), int(max(sizes))],
               "elements": dict(sorted(elements.items())), "lattice_constants_A": lattice,
               "gas_energies_eV": gas_e, "gas_references_eV": mu, "files": files}
    on_disk = dict(summary, files=[Path(f).name for f in files])  # no absolute paths: reproducible
    (out_dir / "summary.json").write_text(json.dumps(on_disk, indent=1))
    files.append(str(out_dir / "summary.json"))
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary


def _print_summary(summary: dict) -> None:
    rows = [("frames kept", summary["n_frames"]), ("systems", summary["n_systems"])]
    rows += [(f"  {k} frames", v) for k, v in summary["frames_by_kind"].items()]
    rows += [(f"filtered (|F| > {summary['max_force_eV_per_A']:g} eV/A)", summary["n_filtered"])]
    rows += [(f"  {k} filtered", v) for k, v in summary["filtered_by_kind"].items()]
    rows += [("atoms total", summary["n_atoms_total"]),
             ("atoms per frame", "{}-{}".format(*summary["atoms_per_frame"])),
             ("elements", " ".join(f"{k}:{v}" for k, v in summary["elements"].items())),
             ("seconds", summary.get("seconds", ""))]
    rows += [("file", f) for f in summary["files"]]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _run_generate(args: argparse.Namespace) -> int:
    summary = generate(args.out_dir, n_systems=args.n_systems, seed=args.seed,
                       formats=tuple(args.formats), metals=tuple(args.metals),
                       facets=tuple(args.facets), adsorbates=args.adsorbates,
                       adsorbates_path=args.adsorbates_path, alloy_fraction=args.alloy_fraction,
                       alloys_only=args.alloys_only, alloy_components=args.alloy_components,
                       frames_per_system=args.frames_per_system,
                       include_bulk=not args.no_bulk, include_gas=not args.no_gas,
                       max_force_eV_per_A=args.max_force, progress=not args.quiet)
    _print_summary(summary)
    return 0


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``generate OUT_DIR --n-systems N --seed S ...`` to an argparse subparsers object.

    The parser's ``func`` default runs :func:`generate` and prints the summary as a table.
    """
    p = subparsers.add_parser("generate", help="generate OC20-style synthetic data with EMT",
                              description=generate.__doc__.split("\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--n-systems", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    p.add_argument("--metals", nargs="+", default=list(DEFAULT_METALS))
    p.add_argument("--facets", nargs="+", default=["111", "100"], choices=tuple(FACETS))
    p.add_argument("--adsorbates", nargs="+", default=None, help="SMILES, e.g. '*CO' '*OH'")
    p.add_argument("--adsorbates-path", default=str(DEFAULT_ADSORBATES_PATH))
    p.add_argument("--alloy-fraction", type=float, default=0.3)
    p.add_argument("--alloys-only", action="store_true")
    p.add_argument("--alloy-components", type=int, default=2, choices=(2, 3),
                   help="3: random ternary alloys (absent from default data; hold-out sets)")
    p.add_argument("--frames-per-system", type=int, default=10)
    p.add_argument("--max-force", type=float, default=50.0, help="eV/A filter threshold")
    p.add_argument("--no-bulk", action="store_true")
    p.add_argument("--no-gas", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_generate)
    return p
