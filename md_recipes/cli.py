"""Command-line front ends of the recipes: ``est relax``, ``est md`` and ``est adsorb``.

Each ``add_*_parser(subparsers)`` registers one subcommand whose handler returns an exit code;
``main_relax(argv)`` and friends run one of them on its own.

Bad input (unreadable structure file, damaged restart file, a device that is not there,
non-finite numbers, an output folder that is missing) and runs that stop with
:class:`~md_recipes.safety.SimulationUnstable` end with one line ``est <command>: error: ...``
and exit code 2, checked before any long computation where possible. Exit code 1: a relaxation
that did not converge.

    est relax IN -o OUT.traj [--cell] [--fmax F] [--optimizer FIRE|BFGS|LBFGS]
    est md IN --ensemble nvt-langevin -T 500 --steps N -o OUT.traj [--timestep] [--log] [--restart]
    est adsorb --slab Cu111 --adsorbate O [--sites fcc,hcp] [--calc emt|est|PATH]

Every command takes ``--dispersion d3bj --functional NAME`` to add DFT-D3(BJ) to the EST
potential (:mod:`est_calc.dispersion`). ``est relax`` and ``est md`` take
``--uncertainty-threshold F [--on-uncertain record|stop] [--uncertain-frames PATH]``: steps whose
largest per-atom force std exceeds F eV/Å are written to PATH (extxyz, for relabelling) and the
run goes on or stops (exit code 2 with one line naming the step; :mod:`md_recipes.uncertain`).
"""

from __future__ import annotations

import argparse
import os
import sys

from md_recipes.safety import atomic_output, check_output_path

__all__ = ["add_relax_parser", "add_md_parser", "add_adsorb_parser", "make_calculator",
           "check_dispersion", "main_relax", "main_md", "main_adsorb"]


def check_device(device: str) -> None:
    """Raise ValueError unless ``device`` ("auto", "cpu", "cuda", "cuda:N", "mps") names a torch
    device that exists on this machine (:func:`est_calc.devices.resolve_device`)."""
    from est_calc.devices import resolve_device

    resolve_device(device, what="--device")


def check_dispersion(dispersion: str | None, functional: str | None,
                     spec: str = "est") -> None:
    """Raise ValueError unless ``--dispersion`` / ``--functional`` go together and name a known
    method and a functional with D3(BJ) parameters (``--calc emt`` takes neither)."""
    if dispersion is None and functional is None:
        return
    if spec.lower() == "emt":
        raise ValueError("--dispersion/--functional apply to EST potentials, not --calc emt")
    if dispersion is None:
        raise ValueError(f"--functional {functional} selects dispersion parameters; add "
                         "--dispersion d3bj (or leave both out)")
    if functional is None:
        raise ValueError(f"--dispersion {dispersion} needs --functional, the DFT functional of "
                         "the potential's training data (e.g. pbe, rpbe)")
    from est_calc.dispersion import bj_parameters

    bj_parameters(functional)  # ValueError naming valid functionals


def make_calculator(spec: str = "est", device: str = "auto", skin: float = 0.0,
                    compile: bool | str = False, dispersion: str | None = None,
                    functional: str | None = None, uncertainty: bool = False,
                    max_atoms: int | None = None):
    """Calculator from a --calc value: "est" (default potential), "emt" (ASE EMT), a file path,
    or several file paths separated by commas (a committee, ``ESTCalculator(model=[...])``).

    ``dispersion`` ("d3bj") and ``functional`` (e.g. "rpbe") add DFT-D3(BJ) to an EST potential
    (``ESTCalculator(..., dispersion=, functional=)``); ``uncertainty`` makes it return
    ``forces_std`` (EMT has none: refused); ``compile="package"`` runs the potential as its
    cached compiled package and ``max_atoms`` evaluates large structures in groups (EST only:
    refused for EMT).

    Raises:
        ValueError: for a spec that is neither a known name nor an existing file, (EST) a
            device that does not exist here (see :func:`check_device`), or a bad dispersion
            option (see :func:`check_dispersion`).
    """
    check_dispersion(dispersion, functional, spec)
    if spec.lower() == "emt":
        if uncertainty:
            raise ValueError("--uncertainty-threshold needs an EST potential with an uncertainty "
                             "part; --calc emt has none")
        if compile == "package" or max_atoms is not None:
            raise ValueError("--package and --max-atoms apply to EST potentials; --calc emt has "
                             "neither")
        from ase.calculators.emt import EMT

        return EMT()
    files = [part.strip() for part in spec.split(",")] if "," in spec else [spec]
    for name in files:
        if (name.lower() != "est" or len(files) > 1) and not os.path.exists(name):
            raise ValueError(f"--calc {spec!r}: use 'est', 'emt', the path of a potential file "
                             f"or several paths separated by commas (a committee); {name!r} "
                             f"does not exist")
    check_device(device)
    from est_calc.calculator import ESTCalculator

    model = files if len(files) > 1 else ("default" if spec.lower() == "est" else spec)
    return ESTCalculator(model, device=device, skin=skin,
                         compile=compile, dispersion=dispersion, functional=functional,
                         uncertainty=uncertainty, max_atoms=max_atoms)


def _add_calc_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calc", default="est",
                   help="'est' (default EST potential), 'emt' (ASE EMT, for demonstration), "
                        "a path to a potential file, or several paths separated by commas (a "
                        "committee)")
    p.add_argument("--device", default="auto", help="device for EST: auto, cpu, cuda, ...")
    p.add_argument("--skin", type=float, default=1.0,
                   help="Verlet skin in Å for EST: the neighbour list is rebuilt only when an atom "
                        "moved by more than skin/2 (pairs stay exact); 0 rebuilds every step")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the EST network (GPU runs; the first step compiles)")
    p.add_argument("--package", action="store_true",
                   help="run the EST potential as its compiled package (est export), made once "
                        "into a cache (~1 min): faster for small molecules")
    p.add_argument("--max-atoms", type=int, default=None, metavar="N",
                   help="evaluate structures of more than N atoms in groups of at most N (each "
                        "with its halo): bounded memory for large cells, same results")
    p.add_argument("--dispersion", default=None, type=str.lower, choices=["d3bj"],
                   help="add DFT-D3(BJ) dispersion to the EST potential (needs --functional)")
    p.add_argument("--functional", default=None,
                   help="DFT functional of the potential's training data, which selects the "
                        "D3(BJ) parameters (e.g. pbe, rpbe)")


def _compile_of(args) -> bool | str:
    """ESTCalculator's ``compile`` from --compile / --package (one of them)."""
    if args.compile and args.package:
        raise ValueError("--compile and --package: choose one (torch.compile, or the compiled "
                         "package)")
    return "package" if args.package else bool(args.compile)


def _add_uncertainty_args(p: argparse.ArgumentParser) -> None:
    from md_recipes.uncertain import ON_UNCERTAIN

    p.add_argument("--uncertainty-threshold", type=_threshold, default=None, metavar="F",
                   help="watch the largest per-atom force std (eV/Å): steps above F are written "
                        "to --uncertain-frames (the potential needs an uncertainty part); "
                        "'auto': the potential's (or committee's) own 95 %% in-distribution "
                        "value")
    p.add_argument("--uncertainty-rms-threshold", type=_threshold, default=None, metavar="F",
                   help="watch the RMS over the atoms of the per-atom force std (eV/Å; a whole "
                        "frame a little new, e.g. a strained lattice): steps above F are "
                        "written too; 'auto' as above")
    p.add_argument("--on-uncertain", default="record", choices=ON_UNCERTAIN,
                   help="record: write the frame and go on (default); stop: write it and stop")
    p.add_argument("--uncertain-frames", default="uncertain.extxyz", metavar="PATH",
                   help="extxyz file of the frames above the threshold (default uncertain.extxyz)")


def _threshold(text: str):
    """argparse type of an uncertainty threshold: a number or "auto" (checked later, with the
    recipes' own message)."""
    from md_recipes.uncertain import AUTO

    if text.strip().lower() == AUTO:
        return AUTO
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number (eV/Å) or 'auto', got {text!r}") from None


def _resolve_auto(calc, kwargs: dict) -> None:
    """Replace "auto" thresholds in ``kwargs`` by the calculator's numbers (which the report
    line then prints)."""
    from md_recipes.uncertain import resolve_thresholds

    if not _watched(kwargs):
        return
    kwargs["uncertainty_threshold"], kwargs["uncertainty_rms_threshold"] = resolve_thresholds(
        calc, kwargs["uncertainty_threshold"], kwargs["uncertainty_rms_threshold"])


def _uncertainty_kwargs(args) -> dict:
    """The recipes' uncertainty arguments of the command line, checked."""
    from md_recipes.uncertain import check_uncertainty_arguments, watching

    on = watching(args.uncertainty_threshold, args.uncertainty_rms_threshold)
    kwargs = dict(uncertainty_threshold=args.uncertainty_threshold,
                  on_uncertain=args.on_uncertain,
                  uncertain_frames=args.uncertain_frames if on else None,
                  uncertainty_rms_threshold=args.uncertainty_rms_threshold)
    check_uncertainty_arguments(**kwargs)
    return kwargs


def _watched(kwargs: dict) -> bool:
    from md_recipes.uncertain import watching

    return watching(kwargs["uncertainty_threshold"], kwargs["uncertainty_rms_threshold"])


def _report_uncertain(steps: list, kwargs: dict) -> None:
    if _watched(kwargs):
        where = f" -> {kwargs['uncertain_frames']}" if steps else ""
        bounds = [f"max {kwargs['uncertainty_threshold']:g}"
                  if kwargs["uncertainty_threshold"] is not None else None,
                  f"RMS {kwargs['uncertainty_rms_threshold']:g}"
                  if kwargs["uncertainty_rms_threshold"] is not None else None]
        print(f"{'uncertain frames':<22}{len(steps)} above "
              f"{' or '.join(b for b in bounds if b)} eV/Å{where}")


def _bound(text: str) -> float | None:
    """argparse type of a stability bound: a number, or "none"/"off" for no check."""
    if text.strip().lower() in ("none", "off"):
        return None
    return float(text)


def _read(path: str):
    """The last frame of a structure file; ValueError naming the file when it cannot be read."""
    from ase.io import read

    if not os.path.exists(path):
        raise FileNotFoundError(f"no such structure file: {path}")
    if os.path.isdir(path):
        raise ValueError(f"structure file {path} is a folder")
    if os.path.getsize(path) == 0:
        raise ValueError(f"structure file {path} is empty")
    try:
        atoms = read(path, index=-1)
    except Exception as exc:  # noqa: BLE001 - ASE's readers fail in many ways on bad input
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise ValueError(f"cannot read structure file {path} ({reason})") from exc
    if isinstance(atoms, list) or len(atoms) == 0:
        raise ValueError(f"structure file {path} holds no atoms")
    return atoms


def _check_structure_output(flag: str, path: str | None) -> None:
    """ValueError unless ``path`` can be written by ``ase.io.write`` (folder exists, known
    format that ASE can write)."""
    if path is None:
        return
    from ase.io.formats import UnknownFileTypeError, filetype, ioformats

    check_output_path(flag, path)
    try:
        fmt = filetype(path, read=False)
    except UnknownFileTypeError:
        fmt = None
    if fmt not in ioformats or not ioformats[fmt].can_write:
        raise ValueError(f"{flag} {path}: ASE cannot write this format; use a known extension "
                         "(.traj, .xyz, .extxyz, .cif, .vasp, ...)")


def _write_structures(path: str, images) -> None:
    """``ase.io.write`` into a temporary file beside ``path``, renamed once complete."""
    from ase.io import write
    from ase.io.formats import filetype

    fmt = filetype(path, read=False)
    with atomic_output(path) as tmp:
        write(tmp, images, format=fmt)


# ---------------------------------------------------------------------------------- relax
def add_relax_parser(sub) -> argparse.ArgumentParser:
    """Register ``relax`` on an argparse subparsers object."""
    from md_recipes.relax import OPTIMIZERS

    p = sub.add_parser("relax", help="relax positions (and the cell with --cell)")
    p.add_argument("input", help="structure file readable by ASE (last frame is used)")
    p.add_argument("-o", "--output", default="relaxed.traj", help="output (default relaxed.traj)")
    p.add_argument("--cell", action="store_true", help="relax the cell too (FrechetCellFilter)")
    p.add_argument("--fmax", type=float, default=0.05, help="force criterion in eV/Å")
    p.add_argument("--optimizer", default="FIRE", type=str.upper, choices=OPTIMIZERS)
    p.add_argument("--steps", type=int, default=500, help="most optimiser steps")
    p.add_argument("--log", default=None, help="optimiser log file")
    _add_max_force_arg(p)
    _add_uncertainty_args(p)
    _add_calc_args(p)
    p.set_defaults(func=_run_relax)
    return p


def _add_max_force_arg(p: argparse.ArgumentParser) -> None:
    from md_recipes.safety import DEFAULT_MAX_FORCE_EV_PER_A

    p.add_argument("--max-force", type=_bound, default=DEFAULT_MAX_FORCE_EV_PER_A,
                   metavar="F", help="stop when any atom's force exceeds F eV/Å "
                   f"(default {DEFAULT_MAX_FORCE_EV_PER_A:g}; 'none': no check)")


def _run_relax(args) -> int:
    from md_recipes.relax import _check_common, relax

    _check_common(args.fmax, args.steps, args.optimizer, args.max_force)
    unc = _uncertainty_kwargs(args)
    check_dispersion(args.dispersion, args.functional, args.calc)
    _check_structure_output("-o/--output", args.output)
    check_output_path("--log", args.log)
    atoms = _read(args.input)
    calc = make_calculator(args.calc, args.device, args.skin, _compile_of(args), args.dispersion,
                           args.functional, uncertainty=_watched(unc),
                           max_atoms=args.max_atoms)
    _resolve_auto(calc, unc)
    res = relax(atoms, calc, fmax_eV_per_A=args.fmax, max_steps=args.steps,
                optimizer=args.optimizer, relax_cell=args.cell, trajectory=None, logfile=args.log,
                max_force_eV_per_A=args.max_force, **unc)
    _write_structures(args.output, res.atoms)
    print(f"{'structure':<12}{res.atoms.get_chemical_formula()}")
    print(f"{'converged':<12}{res.converged} after {res.steps} steps ({args.optimizer})")
    print(f"{'energy':<12}{res.energies[0]:.6f} -> {res.energies[-1]:.6f} eV")
    print(f"{'max force':<12}{res.fmax_eV_per_A:.4f} eV/Å (criterion {args.fmax})")
    _report_uncertain(res.uncertain_steps, unc)
    if args.cell:
        a, b, c, al, be, ga = res.atoms.cell.cellpar()
        print(f"{'cell':<12}a={a:.4f} b={b:.4f} c={c:.4f} Å  {al:.2f} {be:.2f} {ga:.2f} deg")
    print(f"{'written':<12}{args.output}")
    return 0 if res.converged else 1


# ---------------------------------------------------------------------------------- md
def add_md_parser(sub) -> argparse.ArgumentParser:
    """Register ``md`` on an argparse subparsers object."""
    from md_recipes.md import ENSEMBLES

    p = sub.add_parser("md", help="molecular dynamics (NVE, NVT, NPT)")
    p.add_argument("input", help="structure file readable by ASE (last frame is used)")
    p.add_argument("--ensemble", default="nve", choices=ENSEMBLES)
    p.add_argument("-T", "--temperature", type=float, default=300.0, help="temperature in K")
    p.add_argument("-P", "--pressure", type=float, default=0.0, help="pressure in GPa (npt)")
    p.add_argument("--steps", type=int, required=True, help="total number of MD steps")
    p.add_argument("--timestep", type=float, default=1.0, help="time step in fs")
    p.add_argument("-o", "--output", default="md.traj", help="trajectory (default md.traj)")
    p.add_argument("--log", default=None, help="text log of energies and temperature")
    p.add_argument("--log-every", type=int, default=10, help="sampling interval in steps")
    p.add_argument("--restart", default=None,
                   help="checkpoint .npz: written during the run, continued from if present")
    p.add_argument("--friction", type=float, default=0.01, help="Langevin friction in 1/fs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, help="PNG of energies and temperature vs time")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_max_force_arg(p)
    p.add_argument("--max-temperature-ratio", type=_bound, default=10.0, metavar="R",
                   help="thermostatted ensembles: stop when T > R x max(target, 100 K) "
                        "(default 10; 'none': no check)")
    p.add_argument("--max-energy-drift", type=_bound, default=0.1, metavar="E",
                   help="nve: stop when the total energy moved by more than E eV/atom "
                        "(default 0.1; 'none': no check)")
    _add_uncertainty_args(p)
    _add_calc_args(p)
    p.set_defaults(func=_run_md)
    return p


def _run_md(args) -> int:
    import numpy as np

    from md_recipes.md import _check_arguments, run_md

    kwargs = dict(ensemble=args.ensemble, temperature_K=args.temperature,
                  pressure_GPa=args.pressure, timestep_fs=args.timestep, n_steps=args.steps,
                  trajectory=args.output, logfile=args.log, log_every=args.log_every,
                  restart=args.restart, friction_per_fs=args.friction, plot=args.plot,
                  max_force_eV_per_A=args.max_force,
                  max_temperature_ratio=args.max_temperature_ratio,
                  max_energy_drift_eV_per_atom=args.max_energy_drift)
    kwargs.update(_uncertainty_kwargs(args))
    _check_arguments(**kwargs)  # before the structure is read and the potential loaded
    check_dispersion(args.dispersion, args.functional, args.calc)
    if args.restart is not None and os.path.exists(args.restart):
        from md_recipes.md import read_checkpoint

        read_checkpoint(args.restart)  # a damaged restart file is named before any work
    atoms = _read(args.input)
    calc = make_calculator(args.calc, args.device, args.skin, _compile_of(args), args.dispersion,
                           args.functional,
                           uncertainty=_watched(kwargs),
                           max_atoms=args.max_atoms)
    _resolve_auto(calc, kwargs)
    res = run_md(atoms, calc, seed=args.seed, progress=not args.no_progress, **kwargs)
    if args.restart is not None and res.start_step == res.n_steps > 0:
        print(f"{'restart':<22}{args.restart} is already at step {res.n_steps}: "
              "the run is finished, nothing was run or written")
        return 0
    half = slice(len(res.time_fs) // 2, None)
    span_ps = (res.time_fs[-1] - res.time_fs[0]) / 1000.0
    drift = (res.etot[-1] - res.etot[0]) / len(atoms) / span_ps * 1000 if span_ps > 0 else 0.0
    print(f"{'ensemble':<22}{args.ensemble} ({len(atoms)} atoms, {args.steps} steps "
          f"x {args.timestep} fs)")
    print(f"{'<T> second half':<22}{np.mean(res.temperature[half]):.1f} K "
          f"(target {args.temperature} K)")
    print(f"{'Etot start -> end':<22}{res.etot[0]:.5f} -> {res.etot[-1]:.5f} eV "
          f"({drift:+.3f} meV/atom/ps)")
    if res.pressure is not None:
        print(f"{'<P> second half':<22}{np.mean(res.pressure[half]):.3f} GPa")
    _report_uncertain(res.uncertain_steps, kwargs)
    print(f"{'trajectory':<22}{args.output}")
    return 0


# ---------------------------------------------------------------------------------- adsorb
def add_adsorb_parser(sub) -> argparse.ArgumentParser:
    """Register ``adsorb`` on an argparse subparsers object."""
    p = sub.add_parser("adsorb", help="adsorption energies on the sites of a slab (OC20 scheme)")
    p.add_argument("--slab", required=True, help="a name such as Cu111, Pt100, or a structure file")
    p.add_argument("--adsorbate", required=True, help="O, H, C, N, OH, CO, H2O, NH3, ...")
    p.add_argument("--sites", default="all", help="comma-separated site names, or 'all'")
    p.add_argument("--fmax", type=float, default=0.05, help="force criterion in eV/Å")
    p.add_argument("--height", type=float, default=1.8, help="initial height in Å")
    p.add_argument("--steps", type=int, default=300, help="most steps per relaxation")
    p.add_argument("-o", "--output", default=None, help="write the relaxed systems to this file")
    _add_calc_args(p)
    p.set_defaults(func=_run_adsorb)
    return p


def _run_adsorb(args) -> int:
    from md_recipes.adsorption import adsorption_energy

    check_dispersion(args.dispersion, args.functional, args.calc)
    _check_structure_output("-o/--output", args.output)
    slab = _read(args.slab) if os.path.exists(args.slab) else args.slab
    sites = "all" if args.sites == "all" else [s.strip() for s in args.sites.split(",") if s]
    calc = make_calculator(args.calc, args.device, args.skin, _compile_of(args), args.dispersion,
                           args.functional, max_atoms=args.max_atoms)
    res = adsorption_energy(slab, args.adsorbate, calc, sites=sites, fmax_eV_per_A=args.fmax,
                            height_A=args.height, max_steps=args.steps)
    print(f"{args.adsorbate} on {args.slab} ({args.calc})")
    print(res.table())
    print(f"most stable: {res.best.site} ({res.best.E_ads_eV:.4f} eV)")
    if args.output:
        _write_structures(args.output, [s.atoms for s in res.sites])
        print(f"relaxed systems written to {args.output}")
    return 0


def _main(add, argv) -> int:
    parser = argparse.ArgumentParser(prog="est")
    sub = parser.add_subparsers(dest="command", required=True)
    p = add(sub)
    args = parser.parse_args([p.prog.split()[-1]] + list(sys.argv[1:] if argv is None else argv))
    from est_calc.cli import run_command

    return run_command(args)


def main_relax(argv=None) -> int:
    """``est relax`` on its own (argv without the subcommand name)."""
    return _main(add_relax_parser, argv)


def main_md(argv=None) -> int:
    """``est md`` on its own (argv without the subcommand name)."""
    return _main(add_md_parser, argv)


def main_adsorb(argv=None) -> int:
    """``est adsorb`` on its own (argv without the subcommand name)."""
    return _main(add_adsorb_parser, argv)
