"""Molecular dynamics recipe over ASE integrators, with exact (step-for-step) restarts.

Ensembles and the ASE 3.29 integrator behind each:

=================  ==============================================================
"nve"              :class:`ase.md.verlet.VelocityVerlet`
"nvt-langevin"     :class:`ase.md.langevin.Langevin` with ``fixcm=False``; an
                   :class:`ase.constraints.FixCom` is added when the structure has no
                   constraints (``fixcm=True`` is deprecated, it does not sample NVT)
"nvt-bussi"        :class:`ase.md.bussi.Bussi` (stochastic velocity rescaling)
"nvt-nose-hoover"  :class:`ase.md.nose_hoover_chain.NoseHooverChainNVT`
"npt"              :class:`ase.md.nose_hoover_chain.IsotropicMTKNPT`: the
                   Martyna-Tobias-Klein isotropic barostat with Nose-Hoover chains, the
                   modern NPT of ASE with a conserved quantity (preferred over the older
                   Melchionna ``NPT``). It needs stress and no constraints.
=================  ==============================================================

Initial momenta come from :func:`ase.md.velocitydistribution.thermalize_momenta` (the 3.29
replacement of the deprecated ``MaxwellBoltzmannDistribution``) drawn from
``numpy.random.default_rng(seed)``, followed by :func:`Stationary`; the same Generator drives the
Langevin and Bussi noise so that a checkpoint holding its state reproduces the run exactly.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms, units

from md_recipes.relax import default_calculator
from md_recipes.safety import (
    DEFAULT_MAX_FORCE_EV_PER_A,
    SimulationUnstable,
    atomic_output,
    check_bound,
    check_energy_forces,
    check_finite_state,
    check_output_path,
)
from md_recipes.uncertain import check_uncertainty_arguments, make_watch, watching

__all__ = ["ENSEMBLES", "MDResult", "run_md", "read_checkpoint", "SimulationUnstable",
           "TEMPERATURE_FLOOR_K"]

ENSEMBLES = ("nve", "nvt-langevin", "nvt-bussi", "nvt-nose-hoover", "npt")
_CHECKPOINT_VERSION = 1
_CHECKPOINT_ARRAYS = ("header", "numbers", "positions", "momenta", "cell", "pbc")

#: Thermostatted runs stop when T > max_temperature_ratio * max(target, TEMPERATURE_FLOOR_K):
#: the floor keeps a low target (10 K) from turning ordinary warming into an error.
TEMPERATURE_FLOOR_K = 100.0


@dataclass
class MDResult:
    """Sampled observables of one ``run_md`` call (every ``log_every`` steps).

    Attributes:
        atoms: final structure (a copy with a SinglePointCalculator).
        step: (n_samples,) int step indices of the samples.
        time_fs: (n_samples,) simulation time in fs.
        epot: (n_samples,) potential energy in eV.
        ekin: (n_samples,) kinetic energy in eV.
        etot: (n_samples,) epot + ekin in eV.
        temperature: (n_samples,) instantaneous temperature in K.
        pressure: (n_samples,) instantaneous pressure in GPa (virial + ideal gas) for fully
            periodic systems with stress, else None.
        n_steps: total step count reached (counting the steps of earlier restarted runs).
        start_step: step this call started from: 0 for a fresh run, the checkpoint's step on
            restart. ``start_step == n_steps`` on a restart means the run had already finished:
            nothing was run or written, and the single sample is the checkpoint's state.
        uncertain_steps: steps of this call whose largest per-atom force std exceeded
            ``uncertainty_threshold`` (empty without one).
    """

    atoms: Atoms
    step: np.ndarray
    time_fs: np.ndarray
    epot: np.ndarray
    ekin: np.ndarray
    etot: np.ndarray
    temperature: np.ndarray
    pressure: np.ndarray | None
    n_steps: int
    start_step: int = 0
    uncertain_steps: list[int] = field(default_factory=list)


def _make_dynamics(atoms, ensemble, dt, temperature_K, pressure_GPa, friction_per_fs, rng,
                   taut_fs, taup_fs):
    from ase.md.bussi import Bussi
    from ase.md.langevin import Langevin
    from ase.md.nose_hoover_chain import IsotropicMTKNPT, NoseHooverChainNVT
    from ase.md.verlet import VelocityVerlet

    taut = (taut_fs if taut_fs is not None else 100.0 * dt / units.fs) * units.fs
    taup = (taup_fs if taup_fs is not None else 1000.0 * dt / units.fs) * units.fs
    if ensemble == "nve":
        return VelocityVerlet(atoms, timestep=dt)
    if ensemble == "nvt-langevin":
        return Langevin(atoms, timestep=dt, temperature_K=temperature_K,
                        friction=friction_per_fs / units.fs, fixcm=False, rng=rng)
    if ensemble == "nvt-bussi":
        return Bussi(atoms, timestep=dt, temperature_K=temperature_K, taut=taut, rng=rng)
    if ensemble == "nvt-nose-hoover":
        return NoseHooverChainNVT(atoms, timestep=dt, temperature_K=temperature_K, tdamp=taut)
    if atoms.constraints:
        raise ValueError("ensemble 'npt' (IsotropicMTKNPT) does not support constraints; "
                         f"remove {[type(c).__name__ for c in atoms.constraints]}")
    if not atoms.pbc.all():
        raise ValueError(f"ensemble 'npt' needs a 3D periodic cell, got pbc={atoms.pbc}")
    return IsotropicMTKNPT(atoms, timestep=dt, temperature_K=temperature_K,
                           pressure_au=pressure_GPa * units.GPa, tdamp=taut, pdamp=taup)


def _integrator_state(dyn, ensemble: str) -> dict:
    """Internal variables of the integrator that a restart must restore."""
    state: dict = {}
    if ensemble in ("nvt-nose-hoover", "npt"):
        state["eta"] = dyn._thermostat._eta.copy()
        state["p_eta"] = dyn._thermostat._p_eta.copy()
    if ensemble == "npt":
        state["xi"] = dyn._barostat._xi.copy()
        state["p_xi"] = dyn._barostat._p_xi.copy()
        state["eps"] = np.float64(dyn._eps)
        state["p_eps"] = np.float64(dyn._p_eps)
        state["cell0"] = dyn._cell0.copy()
        state["volume0"] = np.float64(dyn._volume0)
    return state


def _restore_integrator(dyn, ensemble: str, state) -> None:
    if ensemble in ("nvt-nose-hoover", "npt"):
        dyn._thermostat._eta = np.array(state["eta"])
        dyn._thermostat._p_eta = np.array(state["p_eta"])
    if ensemble == "npt":
        dyn._barostat._xi = np.array(state["xi"])
        dyn._barostat._p_xi = np.array(state["p_xi"])
        dyn._eps = float(state["eps"])
        dyn._p_eps = float(state["p_eps"])
        dyn._cell0 = np.array(state["cell0"])
        dyn._volume0 = float(state["volume0"])


def _write_checkpoint(path, atoms, dyn, ensemble, step, rng, meta) -> None:
    """Atomically write an .npz checkpoint (no pickled objects): see
    :func:`md_recipes.safety.atomic_output`."""
    header = dict(meta, version=_CHECKPOINT_VERSION, ensemble=ensemble, step=int(step),
                  rng_state=rng.bit_generator.state)
    arrays = dict(
        header=np.array(json.dumps(header)),
        numbers=atoms.get_atomic_numbers(),
        positions=atoms.get_positions(),
        momenta=atoms.get_momenta(),
        cell=np.array(atoms.get_cell()),
        pbc=atoms.get_pbc(),
    )
    arrays.update({f"integrator_{k}": np.asarray(v)
                   for k, v in _integrator_state(dyn, ensemble).items()})
    with atomic_output(path) as tmp, open(tmp, "xb") as fh:
        np.savez(fh, **arrays)


def _last_column_line(logfile) -> str | None:
    """The last "# step ..." column line of an MD log, or None (no such file or line)."""
    try:
        with open(logfile) as handle:
            lines = [line.rstrip("\n") for line in handle if line.startswith("# step")]
    except FileNotFoundError:
        return None
    return lines[-1] if lines else None


def read_checkpoint(path) -> tuple[dict, dict]:
    """Read a checkpoint written by :func:`run_md`.

    Returns:
        (header, arrays): the JSON header (ensemble, step, rng_state, run parameters) and a
        dict of arrays (numbers, positions, momenta, cell, pbc, integrator_*).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a folder, an unreadable, truncated or corrupt file (the message names it),
            or a checkpoint of another version.
    """
    if os.path.isdir(path):
        raise ValueError(f"restart file {path}: is a folder, not a checkpoint")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such restart file: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        header = json.loads(str(arrays.pop("header")))
        missing = [k for k in _CHECKPOINT_ARRAYS[1:] if k not in arrays]
        if not isinstance(header, dict):
            raise TypeError("the header is not a JSON object")
        missing += [k for k in ("version", "ensemble", "step", "rng_state") if k not in header]
        if missing:
            raise KeyError(f"missing {missing}")
    except Exception as exc:  # noqa: BLE001 - any failure to parse the file means it is damaged
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise ValueError(f"restart file {path} is unreadable or corrupt ({reason}); "
                         "remove it to start afresh") from exc
    if header.get("version") != _CHECKPOINT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint version {header.get('version')}")
    return header, arrays


def _pressure_GPa(atoms) -> float | None:
    if not atoms.pbc.all():
        return None
    from ase.calculators.calculator import PropertyNotImplementedError

    try:
        stress = atoms.get_stress(voigt=False, include_ideal_gas=True)
    except PropertyNotImplementedError:
        return None
    return float(-np.trace(stress) / 3.0 / units.GPa)


def _finite(name: str, value, *, positive: bool = False, allow_zero: bool = True) -> None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if not math.isfinite(x) or (positive and (x < 0 or (x == 0 and not allow_zero))):
        need = "finite" + ((" and >= 0" if allow_zero else " and > 0") if positive else "")
        raise ValueError(f"{name} must be {need}, got {value!r}")


def _integer(name: str, value, minimum: int) -> None:
    try:
        ok = float(value).is_integer() and value >= minimum
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_arguments(*, ensemble="nve", temperature_K=300.0, pressure_GPa=0.0, timestep_fs=1.0,
                     n_steps=0, log_every=10, friction_per_fs=0.01, taut_fs=None, taup_fs=None,
                     max_force_eV_per_A=None, max_temperature_ratio=None,
                     max_energy_drift_eV_per_atom=None, trajectory=None, logfile=None,
                     restart=None, plot=None, uncertainty_threshold=None,
                     on_uncertain="record", uncertain_frames=None,
                     uncertainty_rms_threshold=None) -> None:
    """Raise ValueError, naming the argument, for any value :func:`run_md` cannot use (before
    any structure is read or any energy computed)."""
    if ensemble not in ENSEMBLES:
        raise ValueError(f"unknown ensemble {ensemble!r}; choose one of {list(ENSEMBLES)}")
    _integer("n_steps", n_steps, 0)
    _integer("log_every", log_every, 1)
    _finite("timestep_fs", timestep_fs, positive=True, allow_zero=False)
    _finite("temperature_K", temperature_K, positive=True, allow_zero=ensemble == "nve")
    _finite("pressure_GPa", pressure_GPa)
    _finite("friction_per_fs", friction_per_fs, positive=True,
            allow_zero=ensemble != "nvt-langevin")
    for name, value in (("taut_fs", taut_fs), ("taup_fs", taup_fs)):
        if value is not None:
            _finite(name, value, positive=True, allow_zero=False)
    check_bound("max_force_eV_per_A", max_force_eV_per_A)
    check_bound("max_temperature_ratio", max_temperature_ratio, minimum=1.0)
    check_bound("max_energy_drift_eV_per_atom", max_energy_drift_eV_per_atom)
    for name, path in (("trajectory", trajectory), ("logfile", logfile), ("restart", restart),
                       ("plot", plot)):
        check_output_path(name, path)
    check_uncertainty_arguments(uncertainty_threshold, on_uncertain, uncertain_frames,
                                uncertainty_rms_threshold)


def run_md(
    atoms: Atoms,
    calc=None,
    *,
    ensemble: str = "nve",
    temperature_K: float = 300.0,
    pressure_GPa: float = 0.0,
    timestep_fs: float = 1.0,
    n_steps: int,
    seed: int = 0,
    trajectory: str | None = None,
    logfile: str | None = None,
    log_every: int = 10,
    restart: str | None = None,
    friction_per_fs: float = 0.01,
    taut_fs: float | None = None,
    taup_fs: float | None = None,
    progress: bool = True,
    plot: str | None = None,
    max_force_eV_per_A: float | None = DEFAULT_MAX_FORCE_EV_PER_A,
    max_temperature_ratio: float | None = 10.0,
    max_energy_drift_eV_per_atom: float | None = 0.1,
    uncertainty_threshold: float | str | None = None,
    on_uncertain: str = "record",
    uncertain_frames: str | None = None,
    uncertainty_rms_threshold: float | str | None = None,
) -> MDResult:
    """Run molecular dynamics in one of :data:`ENSEMBLES`.

    The run watches itself: after every step (and at the start) it checks the state and stops
    with :class:`SimulationUnstable`, naming the step and the quantity, when

    * positions, momenta, the energy or the forces are not finite (a calculator's
      ``FloatingPointError`` during a step is reported the same way);
    * the largest per-atom force norm max_i |F_i| exceeds ``max_force_eV_per_A``;
    * thermostatted ensembles (all but "nve"): the instantaneous temperature exceeds
      ``max_temperature_ratio * max(temperature_K, TEMPERATURE_FLOOR_K)`` (3000 K for a
      300 K target, 1000 K for any target up to 100 K);
    * "nve": the total energy moved by more than ``max_energy_drift_eV_per_atom`` per atom,
      |E_tot(step) - E_tot(start)| / N, with "start" the first step of this call. 0.1 eV/atom
      would heat the system by 2 * 0.1 eV / (3 k_B) = 774 K; a sound NVE run stays far below.

    With ``uncertainty_threshold`` (or ``uncertainty_rms_threshold``) the calculator must return
    ``forces_std`` (``ESTCalculator(uncertainty=True)``; the default calculator then has it):
    every step whose largest per-atom force std (or RMS per-atom force std) exceeds its
    threshold is written to ``uncertain_frames`` (extxyz,
    for relabelling; :mod:`md_recipes.uncertain`) and listed in ``MDResult.uncertain_steps``, and
    with ``on_uncertain="stop"`` the run stops there with
    :class:`~md_recipes.uncertain.UncertainStructure` (a SimulationUnstable). The log then has
    columns ``max_Fstd`` and ``rms_Fstd``, the largest and the RMS per-atom force std (eV/Å) of
    each sample.

    The energy enters the checks at every step where the calculator produced it with the forces
    (ASE calculators that compute both together, EMT and EST included), else every
    ``log_every`` steps. Each bound is disabled by None. When the run stops, everything written
    so far stays: trajectory and log up to the last sample (the log gets a "# " line with the
    reason), and the checkpoint of the last good sample, from which the run can go on with a
    smaller ``timestep_fs``.

    Args:
        atoms: starting structure (not modified). Zero momenta are replaced by a
            Maxwell-Boltzmann draw at ``temperature_K`` (seeded), non-zero momenta are kept.
        calc: ASE calculator; None means ``ESTCalculator(skin=1.0)``.
        ensemble: one of :data:`ENSEMBLES`.
        temperature_K: thermostat target and initial temperature (K); finite, >= 0 for "nve",
            > 0 otherwise.
        pressure_GPa: barostat target (GPa), "npt" only.
        timestep_fs: time step in fs (finite, > 0).
        n_steps: TOTAL number of steps of the run; a restarted run continues up to it.
        seed: seeds the Generator of the initial momenta and of the stochastic thermostats.
        trajectory: ASE .traj written every ``log_every`` steps (appended on restart).
        logfile: text log of step, time, Epot, Ekin, Etot, T (and P) every ``log_every`` steps
            (appended on restart; when the columns differ from the log's last column line, e.g.
            a watch added on restart, the column line is repeated where the new part starts).
        log_every: sampling interval in steps (log, trajectory, checkpoint, result arrays).
        restart: checkpoint path (.npz); written every ``log_every`` steps and at the end, each
            time as a whole file (temporary file, then rename). If it exists, the run continues
            from it, step for step as if never interrupted; if it already reached ``n_steps``,
            nothing is run or written (``MDResult.start_step == n_steps``).
        friction_per_fs: Langevin friction (1/fs).
        taut_fs: thermostat time constant (fs) for Bussi, Nose-Hoover and NPT; 100 steps if None.
        taup_fs: barostat time constant (fs) for NPT; 1000 steps if None.
        progress: show a tqdm progress bar.
        plot: PNG path for energies and temperature vs time (not redrawn for a finished run).
        max_force_eV_per_A: bound on max_i |F_i| (eV/Å); the default potential's training data
            has no frame beyond 50 eV/Å.
        max_temperature_ratio: runaway bound of thermostatted ensembles, relative to the target
            (> 1).
        max_energy_drift_eV_per_atom: bound on the total-energy change per atom in "nve".
        uncertainty_threshold: eV/Å (> 0) bound on the largest per-atom force std; "auto": the
            potential's own (its uncertainty part's 95 % in-distribution value, or a
            committee's fitted one, :func:`md_recipes.uncertain.resolve_thresholds`); None: not
            watched.
        on_uncertain: "record" (write the frame and go on) or "stop" (write it and stop).
        uncertain_frames: extxyz path of the frames beyond the threshold (appended to on
            restart); None: not written.
        uncertainty_rms_threshold: eV/Å (> 0) bound on the RMS over the atoms of the per-atom
            force std (a whole frame a little new, e.g. a strained lattice); "auto" as above;
            None: not watched. Either threshold, or both, may be given; a frame beyond either
            counts.

    Returns:
        MDResult with the samples of this call.

    Raises:
        ValueError: bad arguments (non-finite or out of range, output folder missing, damaged
            checkpoint), checked before any energy is computed.
        SimulationUnstable: the run left the bounds above (UncertainStructure: the force std
            exceeded ``uncertainty_threshold`` with ``on_uncertain="stop"``).
    """
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixCom
    from ase.md.velocitydistribution import Stationary, thermalize_momenta
    from tqdm.auto import tqdm

    _check_arguments(ensemble=ensemble, temperature_K=temperature_K, pressure_GPa=pressure_GPa,
                     timestep_fs=timestep_fs, n_steps=n_steps, log_every=log_every,
                     friction_per_fs=friction_per_fs, taut_fs=taut_fs, taup_fs=taup_fs,
                     max_force_eV_per_A=max_force_eV_per_A,
                     max_temperature_ratio=max_temperature_ratio,
                     max_energy_drift_eV_per_atom=max_energy_drift_eV_per_atom,
                     trajectory=trajectory, logfile=logfile, restart=restart, plot=plot,
                     uncertainty_threshold=uncertainty_threshold, on_uncertain=on_uncertain,
                     uncertain_frames=uncertain_frames,
                     uncertainty_rms_threshold=uncertainty_rms_threshold)
    n_steps, log_every = int(n_steps), int(log_every)
    if len(atoms) == 0:
        raise ValueError("cannot run MD on an empty Atoms object")

    resuming = restart is not None and os.path.exists(restart)
    header, saved = (read_checkpoint(restart) if resuming else (None, None))
    work = atoms.copy()
    watched = watching(uncertainty_threshold, uncertainty_rms_threshold)
    work.calc = default_calculator(uncertainty=watched) if calc is None else calc
    watch = make_watch(work.calc, uncertainty_threshold, uncertainty_rms_threshold, on_uncertain,
                       uncertain_frames, label="MD", append=resuming)
    if ensemble == "nvt-langevin" and not work.constraints:
        work.set_constraint(FixCom())
    rng = np.random.default_rng(seed)
    meta = dict(timestep_fs=timestep_fs, temperature_K=temperature_K,
                pressure_GPa=pressure_GPa, friction_per_fs=friction_per_fs, seed=seed)
    start = 0
    if resuming:
        if header["ensemble"] != ensemble:
            raise ValueError(f"checkpoint {restart} is for ensemble {header['ensemble']!r}, "
                             f"not {ensemble!r}")
        if not np.array_equal(saved["numbers"], work.get_atomic_numbers()):
            raise ValueError(f"checkpoint {restart} holds a different structure "
                             f"({len(saved['numbers'])} atoms)")
        changed = {k: (header[k], v) for k, v in meta.items() if header.get(k) != v}
        if changed:
            import warnings

            warnings.warn(f"continuing {restart} with changed settings {changed} (old, new): "
                          "the run will not match an uninterrupted one", RuntimeWarning,
                          stacklevel=2)
        start = int(header["step"])
        if start > n_steps:
            raise ValueError(f"checkpoint {restart} is at step {start} > n_steps={n_steps}")
        rng.bit_generator.state = header["rng_state"]
        work.set_cell(saved["cell"], scale_atoms=False)
        work.set_positions(saved["positions"], apply_constraint=False)
        work.set_momenta(saved["momenta"], apply_constraint=False)
    elif not np.any(work.get_momenta()) and temperature_K > 0:
        thermalize_momenta(work, temperature_K, rng=rng)
        Stationary(work)
    finished = resuming and start == n_steps

    dt = timestep_fs * units.fs
    dyn = _make_dynamics(work, ensemble, dt, temperature_K, pressure_GPa, friction_per_fs,
                         rng, taut_fs, taup_fs)
    if saved is not None:
        _restore_integrator(dyn, ensemble, {k[len("integrator_"):]: v for k, v in saved.items()
                                            if k.startswith("integrator_")})
    dyn.nsteps = start

    t_limit = None
    if ensemble != "nve" and max_temperature_ratio is not None:
        t_limit = max_temperature_ratio * max(temperature_K, TEMPERATURE_FLOOR_K)
    n_atoms = len(work)
    etot_ref: list[float] = []  # E_tot at the first check of this call ("nve" only)

    def check(step: int, energy: float | None) -> None:
        """Stop with SimulationUnstable when the state at ``step`` is out of bounds."""
        results = getattr(work.calc, "results", None) or {}
        if energy is None:
            energy = results.get("energy")
        forces = results.get("forces")
        if forces is None:
            check_finite_state("MD", step, work)
            forces = work.get_forces(apply_constraint=False)
        check_energy_forces("MD", step, energy, forces, max_force_eV_per_A)  # causes first
        check_finite_state("MD", step, work)
        where = f"MD stopped at step {step} (t = {step * timestep_fs:g} fs)"
        if t_limit is not None:
            temp = float(work.get_temperature())
            if not temp <= t_limit:
                raise SimulationUnstable(
                    f"{where}: temperature {temp:.4g} K exceeds {t_limit:.4g} K = "
                    f"max_temperature_ratio={max_temperature_ratio:g} x max(target "
                    f"{temperature_K:g} K, {TEMPERATURE_FLOOR_K:g} K); the dynamics ran away "
                    "(try a smaller timestep_fs)",
                    step=step, quantity="temperature", value=temp, limit=t_limit)
        if ensemble == "nve" and max_energy_drift_eV_per_atom is not None and energy is not None:
            etot = float(energy) + float(work.get_kinetic_energy())
            if not etot_ref:
                etot_ref.append(etot)
            drift = (etot - etot_ref[0]) / n_atoms
            if not abs(drift) <= max_energy_drift_eV_per_atom:
                raise SimulationUnstable(
                    f"{where}: total energy changed by {drift:+.4g} eV/atom since step {start}, "
                    f"beyond max_energy_drift_eV_per_atom={max_energy_drift_eV_per_atom:g}; NVE "
                    "is not conserving energy (try a smaller timestep_fs)",
                    step=step, quantity="total energy", value=abs(drift),
                    limit=max_energy_drift_eV_per_atom)
        if watch is not None:
            watch(step, work)

    records: list[tuple] = []
    traj = None
    log = None
    bar = None
    if not finished:
        if trajectory is not None:
            from ase.io import Trajectory

            traj = Trajectory(trajectory, "a" if resuming else "w", work)
        columns = ("# step  time_fs  Epot_eV  Ekin_eV  Etot_eV  T_K  P_GPa"
                   + ("  max_Fstd_eV_per_A  rms_Fstd_eV_per_A" if watch is not None else ""))
        if logfile is not None and resuming:
            # The columns this run writes may differ from those of the log it appends to (the
            # earlier part ran without an uncertainty watch, or with another version's columns):
            # then the column line is repeated where this part starts.
            previous = _last_column_line(logfile)
            log = open(logfile, "a")
            if previous != columns:
                log.write(f"# restarted at step {start}; columns from here on:\n{columns}\n")
        elif logfile is not None:
            log = open(logfile, "w")
            log.write(f"# {ensemble} dt={timestep_fs} fs T={temperature_K} K seed={seed}\n"
                      f"{columns}\n")

    def sample(step: int, write: bool = True) -> None:
        epot = float(work.get_potential_energy())
        check(step, epot)
        ekin = float(work.get_kinetic_energy())
        temp = float(work.get_temperature())
        pres = _pressure_GPa(work)
        records.append((step, step * timestep_fs, epot, ekin, epot + ekin, temp,
                        np.nan if pres is None else pres))
        if not write:
            return
        if log is not None:
            p = "nan" if pres is None else f"{pres:.5f}"
            u = f" {watch.last:.5f} {watch.last_rms:.5f}" if watch is not None else ""
            log.write(f"{step:8d} {step * timestep_fs:12.3f} {epot:14.6f} {ekin:12.6f} "
                      f"{epot + ekin:14.6f} {temp:10.3f} {p}{u}\n")
            log.flush()
        if traj is not None:
            traj.write()

    try:
        if finished:
            sample(n_steps, write=False)  # the checkpoint's state, for the result only
        else:
            if resuming:
                check(start, float(work.get_potential_energy()))  # also the reference E_tot
            else:
                sample(0)
                if restart is not None and n_steps == 0:
                    _write_checkpoint(restart, work, dyn, ensemble, 0, rng, meta)
            bar = tqdm(total=n_steps, initial=start, disable=not progress, unit="step",
                       desc=f"MD {ensemble}")
            for step in range(start + 1, n_steps + 1):
                try:
                    dyn.step()
                except FloatingPointError as exc:
                    raise SimulationUnstable(f"MD stopped at step {step}: {exc}", step=step,
                                             quantity="model output") from exc
                except ValueError as exc:
                    # A calculator refusing non-finite positions: the dynamics blew up.
                    check_finite_state("MD", step, work)
                    raise
                dyn.nsteps = step
                bar.update(1)
                if step % log_every == 0 or step == n_steps:
                    sample(step)
                    if restart is not None:
                        _write_checkpoint(restart, work, dyn, ensemble, step, rng, meta)
                else:
                    check(step, None)
    except SimulationUnstable as exc:
        if log is not None:
            log.write(f"# {exc}\n")
        raise
    finally:
        if bar is not None:
            bar.close()
        if traj is not None:
            traj.close()
        if log is not None:
            log.close()

    rec = np.array(records, dtype=float).reshape(-1, 7)
    pressure = None if np.all(np.isnan(rec[:, 6])) else rec[:, 6]
    final = work.copy()
    if ensemble == "nvt-langevin" and not atoms.constraints:
        final.set_constraint()  # drop the FixCom added for the run
    results = {k: v for k, v in work.calc.results.items() if k in ("energy", "forces", "stress")}
    final.calc = SinglePointCalculator(final, **results)
    result = MDResult(final, rec[:, 0].astype(int), rec[:, 1], rec[:, 2], rec[:, 3], rec[:, 4],
                      rec[:, 5], pressure, n_steps, start,
                      list(watch.steps) if watch is not None else [])
    if plot is not None and not finished:
        from md_recipes.plotting import plot_md

        plot_md(result, plot)
    return result
