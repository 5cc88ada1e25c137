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
import os
from dataclasses import dataclass

import numpy as np
from ase import Atoms, units

from md_recipes.relax import default_calculator

__all__ = ["ENSEMBLES", "MDResult", "run_md", "read_checkpoint"]

ENSEMBLES = ("nve", "nvt-langevin", "nvt-bussi", "nvt-nose-hoover", "npt")
_CHECKPOINT_VERSION = 1


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
    """Atomically write an .npz checkpoint (no pickled objects)."""
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
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)


def read_checkpoint(path) -> tuple[dict, dict]:
    """Read a checkpoint written by :func:`run_md`.

    Returns:
        (header, arrays): the JSON header (ensemble, step, rng_state, run parameters) and a
        dict of arrays (numbers, positions, momenta, cell, pbc, integrator_*).
    """
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    header = json.loads(str(arrays.pop("header")))
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
) -> MDResult:
    """Run molecular dynamics in one of :data:`ENSEMBLES`.

    Args:
        atoms: starting structure (not modified). Zero momenta are replaced by a
            Maxwell-Boltzmann draw at ``temperature_K`` (seeded), non-zero momenta are kept.
        calc: ASE calculator; None means ``ESTCalculator(skin=1.0)``.
        ensemble: one of :data:`ENSEMBLES`.
        temperature_K: thermostat target and initial temperature (K).
        pressure_GPa: barostat target (GPa), "npt" only.
        timestep_fs: time step in fs.
        n_steps: TOTAL number of steps of the run; a restarted run continues up to it.
        seed: seeds the Generator of the initial momenta and of the stochastic thermostats.
        trajectory: ASE .traj written every ``log_every`` steps (appended on restart).
        logfile: text log of step, time, Epot, Ekin, Etot, T (and P) every ``log_every`` steps.
        log_every: sampling interval in steps (log, trajectory, checkpoint, result arrays).
        restart: checkpoint path (.npz); written every ``log_every`` steps and at the end. If
            it exists, the run continues from it, step for step as if never interrupted.
        friction_per_fs: Langevin friction (1/fs).
        taut_fs: thermostat time constant (fs) for Bussi, Nose-Hoover and NPT; 100 steps if None.
        taup_fs: barostat time constant (fs) for NPT; 1000 steps if None.
        progress: show a tqdm progress bar.
        plot: PNG path for energies and temperature vs time.

    Returns:
        MDResult with the samples of this call.
    """
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixCom
    from ase.md.velocitydistribution import Stationary, thermalize_momenta
    from tqdm.auto import tqdm

    if ensemble not in ENSEMBLES:
        raise ValueError(f"unknown ensemble {ensemble!r}; choose one of {list(ENSEMBLES)}")
    if int(n_steps) != n_steps or n_steps < 0:
        raise ValueError(f"n_steps must be a non-negative integer, got {n_steps}")
    if int(log_every) != log_every or log_every < 1:
        raise ValueError(f"log_every must be a positive integer, got {log_every}")
    if not timestep_fs > 0:
        raise ValueError(f"timestep_fs must be positive, got {timestep_fs}")
    if temperature_K < 0 or (ensemble != "nve" and temperature_K == 0):
        raise ValueError(f"temperature_K must be positive for {ensemble}, got {temperature_K}")
    if len(atoms) == 0:
        raise ValueError("cannot run MD on an empty Atoms object")

    work = atoms.copy()
    work.calc = default_calculator() if calc is None else calc
    if ensemble == "nvt-langevin" and not work.constraints:
        work.set_constraint(FixCom())
    rng = np.random.default_rng(seed)
    meta = dict(timestep_fs=timestep_fs, temperature_K=temperature_K,
                pressure_GPa=pressure_GPa, friction_per_fs=friction_per_fs, seed=seed)
    resuming = restart is not None and os.path.exists(restart)
    start, saved = 0, None
    if resuming:
        header, saved = read_checkpoint(restart)
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

    dt = timestep_fs * units.fs
    dyn = _make_dynamics(work, ensemble, dt, temperature_K, pressure_GPa, friction_per_fs,
                         rng, taut_fs, taup_fs)
    if saved is not None:
        _restore_integrator(dyn, ensemble, {k[len("integrator_"):]: v for k, v in saved.items()
                                            if k.startswith("integrator_")})
    dyn.nsteps = start

    records: list[tuple] = []
    traj = None
    if trajectory is not None:
        from ase.io import Trajectory

        traj = Trajectory(trajectory, "a" if resuming else "w", work)
    log = open(logfile, "a" if resuming else "w") if logfile is not None else None
    if log is not None and not resuming:
        log.write(f"# {ensemble} dt={timestep_fs} fs T={temperature_K} K seed={seed}\n"
                  "# step  time_fs  Epot_eV  Ekin_eV  Etot_eV  T_K  P_GPa\n")

    def sample(step: int) -> None:
        epot = float(work.get_potential_energy())
        ekin = float(work.get_kinetic_energy())
        temp = float(work.get_temperature())
        pres = _pressure_GPa(work)
        records.append((step, step * timestep_fs, epot, ekin, epot + ekin, temp,
                        np.nan if pres is None else pres))
        if log is not None:
            p = "nan" if pres is None else f"{pres:.5f}"
            log.write(f"{step:8d} {step * timestep_fs:12.3f} {epot:14.6f} {ekin:12.6f} "
                      f"{epot + ekin:14.6f} {temp:10.3f} {p}\n")
            log.flush()
        if traj is not None:
            traj.write()

    try:
        if not resuming:
            sample(0)
        bar = tqdm(total=n_steps, initial=start, disable=not progress, unit="step",
                   desc=f"MD {ensemble}")
        for step in range(start + 1, n_steps + 1):
            dyn.step()
            dyn.nsteps = step
            bar.update(1)
            if step % log_every == 0 or step == n_steps:
                sample(step)
                if restart is not None:
                    _write_checkpoint(restart, work, dyn, ensemble, step, rng, meta)
        bar.close()
        if restart is not None and start == n_steps:
            _write_checkpoint(restart, work, dyn, ensemble, n_steps, rng, meta)
        if not records:
            sample(n_steps)
    finally:
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
                      rec[:, 5], pressure, int(n_steps))
    if plot is not None:
        from md_recipes.plotting import plot_md

        plot_md(result, plot)
    return result
