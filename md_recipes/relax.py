"""Geometry optimisation recipes: ``relax`` (one structure, ASE optimisers) and ``relax_many``.

``relax_many`` runs one FIRE per structure in lock step so that a calculator offering
``calculate_batch(atoms_list, properties)`` evaluates every still-active structure in a single
call. The FIRE update is the one of :class:`ase.optimize.FIRE` (same defaults, same global
``maxstep`` clip per structure), so ``relax_many`` and ``relax(optimizer="FIRE")`` follow the
same path to float round-off.

Both watch the run: a non-finite energy or force, or a largest per-atom force norm above
``max_force_eV_per_A`` (default 500 eV/Å, see :mod:`md_recipes.safety`), at the start or after any
step stops the relaxation with :class:`~md_recipes.safety.SimulationUnstable` naming the step.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from md_recipes.safety import (
    DEFAULT_RELAX_MAX_FORCE_EV_PER_A,
    SimulationUnstable,
    check_bound,
    check_energy_forces,
)

__all__ = ["RelaxResult", "relax", "relax_many", "OPTIMIZERS", "default_calculator"]

OPTIMIZERS = ("FIRE", "BFGS", "LBFGS")

# ase.optimize.FIRE defaults (Bitzek et al., PRL 97, 170201 (2006)).
_FIRE = dict(dt=0.1, maxstep=0.2, dtmax=1.0, Nmin=5, finc=1.1, fdec=0.5, astart=0.1, fa=0.99)


@dataclass
class RelaxResult:
    """Outcome of one relaxation.

    Attributes:
        atoms: final structure, a copy carrying a SinglePointCalculator with its energy and
            forces (and stress when computed).
        converged: True only when max |F| < fmax was reached within ``max_steps``.
        steps: number of optimiser steps taken.
        energies: potential energy (eV) at each visited geometry, the start included.
        fmax_eV_per_A: largest per-atom force norm (eV/Å) of the final geometry (for a cell
            relaxation: of the filter's generalised forces, which include the cell).
        uncertain_steps: steps whose largest per-atom force std exceeded the
            ``uncertainty_threshold`` of :func:`relax` (empty without one).
    """

    atoms: Atoms
    converged: bool
    steps: int
    energies: list[float] = field(default_factory=list)
    fmax_eV_per_A: float = float("nan")
    uncertain_steps: list[int] = field(default_factory=list)


#: Verlet skin (Å) of the recipes' default calculator, as the command line's ``--skin``.
DEFAULT_SKIN_A = 1.0


def default_calculator(dispersion: str | None = None, functional: str | None = None,
                       uncertainty: bool = False):
    """The project's calculator with the shipped potential and a 1 Å Verlet skin (as ``est
    relax`` / ``est md``), ``ESTCalculator(skin=DEFAULT_SKIN_A)``, imported lazily. The pairs are
    those of a fresh build at every step; the skin only saves rebuilding them.

    ``dispersion="d3bj"`` with ``functional`` (e.g. "rpbe") adds DFT-D3(BJ) (as ``est relax
    --dispersion d3bj --functional rpbe``; see :class:`est_calc.calculator.ESTCalculator`).
    ``uncertainty=True`` returns ``forces_std`` too (the shipped potential's uncertainty part)."""
    from est_calc.calculator import ESTCalculator

    return ESTCalculator(skin=DEFAULT_SKIN_A, dispersion=dispersion, functional=functional,
                         uncertainty=uncertainty)


def _check_common(fmax_eV_per_A: float, max_steps: int, optimizer: str,
                  max_force_eV_per_A: float | None) -> str:
    try:
        ok = math.isfinite(float(fmax_eV_per_A)) and fmax_eV_per_A > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"fmax_eV_per_A must be finite and > 0, got {fmax_eV_per_A!r}")
    try:
        ok = float(max_steps).is_integer() and max_steps >= 0
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise ValueError(f"max_steps must be a non-negative integer, got {max_steps!r}")
    check_bound("max_force_eV_per_A", max_force_eV_per_A)
    name = str(optimizer).upper()
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {list(OPTIMIZERS)}")
    return name


def _snapshot(atoms: Atoms) -> Atoms:
    """A copy of ``atoms`` whose calculator holds the results already computed."""
    out = atoms.copy()
    results = {k: np.copy(v) if isinstance(v, np.ndarray) else v
               for k, v in atoms.calc.results.items()
               if k in ("energy", "free_energy", "forces", "stress")}
    out.calc = SinglePointCalculator(out, **results)
    return out


def _report(converged: bool, steps: int, fmax: float, limit: float, label: str = "") -> None:
    if not converged:
        warnings.warn(
            f"relaxation{label} did NOT converge: max force {fmax:.4f} eV/Å > {limit} eV/Å "
            f"after {steps} steps",
            RuntimeWarning,
            stacklevel=3,
        )


def relax(
    atoms: Atoms,
    calc=None,
    *,
    fmax_eV_per_A: float = 0.05,
    max_steps: int = 500,
    optimizer: str = "FIRE",
    relax_cell: bool = False,
    trajectory: str | None = None,
    logfile: str | None = None,
    max_force_eV_per_A: float | None = DEFAULT_RELAX_MAX_FORCE_EV_PER_A,
    uncertainty_threshold: float | str | None = None,
    on_uncertain: str = "record",
    uncertain_frames: str | None = None,
    uncertainty_rms_threshold: float | str | None = None,
) -> RelaxResult:
    """Relax atomic positions (and optionally the cell) until max |F| < fmax.

    The input is not modified; constraints (e.g. FixAtoms) are kept and respected.

    Args:
        atoms: structure to relax.
        calc: ASE calculator; None means ``ESTCalculator(skin=1.0)``.
        fmax_eV_per_A: force criterion (eV/Å) on the largest per-atom force norm.
        max_steps: most optimiser steps.
        optimizer: "FIRE", "BFGS" or "LBFGS" (ASE implementations, ASE defaults).
        relax_cell: also relax the cell through :class:`ase.filters.FrechetCellFilter`
            (stress criterion fmax in eV/Å, as ASE scales it by the volume).
        trajectory: optional ASE .traj path written at each step.
        logfile: optional text log path of the optimiser (None: silent).
        max_force_eV_per_A: bound on max_i |F_i| (eV/Å) of the atoms' raw forces at every visited
            geometry; None: no bound.
        uncertainty_threshold: eV/Å (> 0) bound on the largest per-atom force std of every
            visited geometry (the calculator must return ``forces_std``; the default one then
            does); the log gets a line ``Uncertainty: step max_force_std ... rms_force_std ...``
            per step. "auto": the potential's (or committee's) own 95 % in-distribution value
            (:func:`md_recipes.uncertain.resolve_thresholds`). None: not watched.
        on_uncertain: "record" (write the geometry to ``uncertain_frames`` and go on) or "stop"
            (write it and stop with :class:`~md_recipes.uncertain.UncertainStructure`).
        uncertain_frames: extxyz path of the geometries beyond the threshold; None: not written.
        uncertainty_rms_threshold: eV/Å (> 0) bound on the RMS over the atoms of the per-atom
            force std (:mod:`md_recipes.uncertain`); None: not watched. A geometry beyond either
            threshold counts.

    Returns:
        RelaxResult; ``converged=False`` (with a RuntimeWarning) when the criterion was not met.

    Raises:
        SimulationUnstable: non-finite energy or forces (a calculator's FloatingPointError
            included), or max_i |F_i| > ``max_force_eV_per_A``, at the step named. Trajectory and
            log keep every step up to that one, the offending geometry included.
    """
    from ase.optimize import BFGS, FIRE, LBFGS

    from md_recipes.uncertain import check_uncertainty_arguments, make_watch, watching

    name = _check_common(fmax_eV_per_A, max_steps, optimizer, max_force_eV_per_A)
    check_uncertainty_arguments(uncertainty_threshold, on_uncertain, uncertain_frames,
                                uncertainty_rms_threshold)
    if len(atoms) == 0:
        raise ValueError("cannot relax an empty Atoms object")
    work = atoms.copy()
    work.calc = (default_calculator(uncertainty=watching(uncertainty_threshold,
                                                         uncertainty_rms_threshold))
                 if calc is None else calc)
    uncertainty = make_watch(work.calc, uncertainty_threshold, uncertainty_rms_threshold,
                             on_uncertain, uncertain_frames, label="relaxation")
    target = work
    if relax_cell:
        if not work.pbc.all():
            raise ValueError(f"relax_cell=True needs a periodic cell in 3D, got pbc={work.pbc}")
        from ase.filters import FrechetCellFilter

        target = FrechetCellFilter(work)
    cls = {"FIRE": FIRE, "BFGS": BFGS, "LBFGS": LBFGS}[name]
    energies: list[float] = []
    with cls(target, logfile=logfile, trajectory=trajectory) as opt:  # closes log and traj

        def watch():
            energies.append(float(work.get_potential_energy()))
            check_energy_forces("relaxation", opt.nsteps, energies[-1],
                                work.get_forces(apply_constraint=False), max_force_eV_per_A)
            if uncertainty is not None:
                value = uncertainty(opt.nsteps, work)
                if opt.logfile is not None:
                    opt.logfile.write(f"Uncertainty: {opt.nsteps:3d} max_force_std "
                                      f"{value:.5f} eV/Å rms_force_std "
                                      f"{uncertainty.last_rms:.5f} eV/Å\n")

        opt.attach(watch, interval=1)
        try:
            converged = bool(opt.run(fmax=fmax_eV_per_A, steps=int(max_steps)))
        except FloatingPointError as exc:
            raise SimulationUnstable(f"relaxation stopped at step {opt.nsteps}: {exc}",
                                     step=opt.nsteps, quantity="model output") from exc
    fmax = float(np.sqrt((target.get_forces() ** 2).sum(axis=1).max()))
    _report(converged, opt.nsteps, fmax, fmax_eV_per_A)
    return RelaxResult(_snapshot(work), converged, int(opt.nsteps), energies, fmax,
                       list(uncertainty.steps) if uncertainty is not None else [])


def _constrained_forces(atoms: Atoms, forces: np.ndarray) -> np.ndarray:
    """Apply every constraint's ``adjust_forces`` (FixAtoms zeroes fixed rows)."""
    f = np.array(forces, dtype=float, copy=True)
    for constraint in atoms.constraints:
        constraint.adjust_forces(atoms, f)
    return f


class _FireState:
    """Per-structure FIRE variables (as in ase.optimize.FIRE, no downhill check)."""

    def __init__(self):
        self.vel: np.ndarray | None = None
        self.dt = _FIRE["dt"]
        self.a = _FIRE["astart"]
        self.n_pos = 0  # consecutive steps with P = F.v > 0

    def displacement(self, forces: np.ndarray) -> np.ndarray:
        """One FIRE update from the constrained forces (n, 3) eV/Å -> displacement (n, 3) Å."""
        g = forces.ravel()
        if self.vel is None:
            self.vel = np.zeros_like(g)
        else:
            vf = np.vdot(g, self.vel)
            if vf > 0.0:
                g2 = np.vdot(g, g)
                self.vel = (1.0 - self.a) * self.vel + self.a * g / np.sqrt(g2) * np.sqrt(
                    np.vdot(self.vel, self.vel)
                )
                if self.n_pos > _FIRE["Nmin"]:
                    self.dt = min(self.dt * _FIRE["finc"], _FIRE["dtmax"])
                    self.a *= _FIRE["fa"]
                self.n_pos += 1
            else:
                self.vel[:] = 0.0
                self.a = _FIRE["astart"]
                self.dt *= _FIRE["fdec"]
                self.n_pos = 0
        self.vel += self.dt * g
        dr = self.dt * self.vel
        norm = np.sqrt(np.vdot(dr, dr))
        if norm > _FIRE["maxstep"]:
            dr = _FIRE["maxstep"] * dr / norm
        return dr.reshape(forces.shape)


def relax_many(
    atoms_list: list[Atoms],
    calc=None,
    *,
    fmax_eV_per_A: float = 0.05,
    max_steps: int = 500,
    optimizer: str = "FIRE",
    relax_cell: bool = False,
    max_force_eV_per_A: float | None = DEFAULT_RELAX_MAX_FORCE_EV_PER_A,
) -> list[RelaxResult]:
    """Relax many structures, batched when the calculator offers ``calculate_batch``.

    With a batch-capable calculator, FIRE, and fixed cells, all structures advance together and
    each leaves the active set once its own max |F| < fmax. Otherwise each structure goes
    through :func:`relax` in turn.

    Args:
        atoms_list: structures (any sizes); not modified.
        calc: ASE calculator, optionally with ``calculate_batch(atoms_list, properties) ->
            list[dict]`` (keys "energy", "forces"); None means ``ESTCalculator(skin=1.0)``.
        fmax_eV_per_A: force criterion (eV/Å) per structure.
        max_steps: most FIRE steps per structure.
        optimizer: as in :func:`relax`; batching is only done for "FIRE".
        relax_cell: as in :func:`relax`; batching is only done without cell relaxation.
        max_force_eV_per_A: as in :func:`relax`, per structure.

    Returns:
        One RelaxResult per input, in input order.

    Raises:
        SimulationUnstable: as in :func:`relax`, naming the structure and its step; the whole
            call stops (no partial list is returned).
    """
    name = _check_common(fmax_eV_per_A, max_steps, optimizer, max_force_eV_per_A)
    calc = default_calculator() if calc is None else calc
    if not hasattr(calc, "calculate_batch") or name != "FIRE" or relax_cell:
        out = []
        for k, a in enumerate(atoms_list):
            try:
                out.append(relax(a, calc, fmax_eV_per_A=fmax_eV_per_A, max_steps=max_steps,
                                 optimizer=name, relax_cell=relax_cell,
                                 max_force_eV_per_A=max_force_eV_per_A))
            except SimulationUnstable as exc:
                raise SimulationUnstable(
                    str(exc).replace("relaxation", f"relaxation of structure {k}", 1),
                    step=exc.step, quantity=exc.quantity, value=exc.value, limit=exc.limit,
                ) from exc
        return out
    works = [a.copy() for a in atoms_list]
    if any(len(a) == 0 for a in works):
        raise ValueError("cannot relax an empty Atoms object")
    states = [_FireState() for _ in works]
    energies: list[list[float]] = [[] for _ in works]
    steps = [0] * len(works)
    fmaxes = [float("nan")] * len(works)
    converged = [False] * len(works)
    last: list[dict] = [{} for _ in works]
    active = list(range(len(works)))
    while active:
        try:
            results = calc.calculate_batch([works[k] for k in active], ["energy", "forces"])
        except FloatingPointError as exc:
            step = max(steps[k] for k in active)
            raise SimulationUnstable(
                f"relaxation of structures {active[:10]} stopped at step {step}: {exc}",
                step=step, quantity="model output") from exc
        still = []
        for k, res in zip(active, results):
            check_energy_forces(f"relaxation of structure {k}", steps[k], res["energy"],
                                res["forces"], max_force_eV_per_A)
            forces = _constrained_forces(works[k], res["forces"])
            energies[k].append(float(res["energy"]))
            last[k] = {"energy": float(res["energy"]), "forces": np.asarray(res["forces"])}
            fmaxes[k] = float(np.sqrt((forces**2).sum(axis=1).max()))
            if fmaxes[k] < fmax_eV_per_A:
                converged[k] = True
            elif steps[k] < max_steps:
                works[k].set_positions(works[k].get_positions() + states[k].displacement(forces))
                steps[k] += 1
                still.append(k)
        active = still
    out = []
    for k, work in enumerate(works):
        work.calc = SinglePointCalculator(work, **last[k])
        _report(converged[k], steps[k], fmaxes[k], fmax_eV_per_A, f" of structure {k}")
        out.append(RelaxResult(work, converged[k], steps[k], energies[k], fmaxes[k]))
    return out
