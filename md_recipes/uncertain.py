"""Watching a run's uncertainty: frames beyond a force-std threshold, recorded or stopping the run.

A calculator that returns ``forces_std`` (eV/Å per atom, ``ESTCalculator(uncertainty=True)``,
:mod:`est_calc.uncertainty`) tells where the potential is extrapolating. :class:`UncertaintyWatch`
reads the largest per-atom value and the frame's RMS after every step of :func:`md_recipes.run_md`
or :func:`md_recipes.relax`; when one exceeds its threshold the structure is appended to an extxyz
file for relabelling (positions, cell, pbc, the per-atom ``forces_std`` array and, in the info
line, the step, ``max_force_std`` and ``rms_force_std``; no model energy or forces, which would
read as labels), and the run either goes on ("record") or stops with :class:`UncertainStructure`
("stop").

Two statistics of a frame can be watched, each against its own threshold (either or both):

* the largest per-atom force std, ``uncertainty_threshold``: one new environment (an unseen
  adsorbate, a defect);
* the frame's RMS of the per-atom force std, ``uncertainty_rms_threshold``: every atom a little
  new (a strained or expanded lattice, an unseen facet), where the energy error adds up over the
  atoms while no single atom stands out. For the shipped latent estimate it is
  energy_std / (kappa sqrt N).

Thresholds to start from: the 95th percentiles of either statistic over held-out
in-distribution frames. A latent uncertainty part fitted by this version (``est train
--uncertainty``, the shipped default's) stores both, from its calibration frames, and
``"auto"`` uses them (:func:`resolve_thresholds`). A frame beyond either threshold counts as
uncertain.
"""

from __future__ import annotations

import math

import numpy as np

from est_calc.uncertainty import frame_statistics
from md_recipes.safety import SimulationUnstable, check_output_path

__all__ = ["AUTO", "ON_UNCERTAIN", "UncertainStructure", "UncertaintyWatch",
           "check_uncertainty_arguments", "make_watch", "resolve_thresholds", "watching"]

#: A threshold given as this string is the potential's own (:func:`resolve_thresholds`).
AUTO = "auto"

#: What a run does with a structure beyond the threshold: write it and go on, or write it and stop.
ON_UNCERTAIN = ("record", "stop")


class UncertainStructure(SimulationUnstable):
    """A frame's force std exceeded a threshold and the run was asked to stop.

    ``quantity`` is "force std", ``value`` the statistic that exceeded its threshold (the largest
    per-atom force std, or else the frame's RMS of it; eV/Å) and ``limit`` that threshold; the
    structure is the last frame of the run's extxyz file of uncertain frames.
    """


def check_uncertainty_arguments(uncertainty_threshold, on_uncertain: str,
                                uncertain_frames, uncertainty_rms_threshold=None) -> None:
    """Raise ValueError, naming the argument, for a threshold that is not None or finite and
    > 0, an unknown ``on_uncertain``, or an output path that cannot be created."""
    for name, threshold in (("uncertainty_threshold", uncertainty_threshold),
                            ("uncertainty_rms_threshold", uncertainty_rms_threshold)):
        if threshold is None or _is_auto(threshold):
            continue
        try:
            ok = math.isfinite(float(threshold)) and float(threshold) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{name} must be a finite number > 0 (eV/Å), 'auto' or None, "
                             f"got {threshold!r}")
    if on_uncertain not in ON_UNCERTAIN:
        raise ValueError(f"on_uncertain must be one of {list(ON_UNCERTAIN)}, got "
                         f"{on_uncertain!r}")
    check_output_path("uncertain_frames", uncertain_frames)


def _is_auto(value) -> bool:
    return isinstance(value, str) and value.strip().lower() == AUTO


def resolve_thresholds(calc, uncertainty_threshold, uncertainty_rms_threshold
                       ) -> tuple[float | None, float | None]:
    """The two thresholds with ``"auto"`` replaced by the calculator's own: 95 % of
    in-distribution calibration frames stay under each (a latent uncertainty part's stored
    ``thresholds``, or a committee's ``committee_thresholds`` from its ``.committee`` file).
    Raises ValueError, naming the argument, where there are none to use."""
    out = []
    for name, key, value in (("uncertainty_threshold", "max", uncertainty_threshold),
                             ("uncertainty_rms_threshold", "rms", uncertainty_rms_threshold)):
        if not _is_auto(value):
            out.append(None if value is None else float(value))
            continue
        if getattr(calc, "committee", None):
            stored = getattr(calc, "committee_thresholds", {}) or {}
            if key not in stored:
                raise ValueError(
                    f"{name}='auto' needs the committee's fitted thresholds (a .committee file "
                    f"beside a member, written by est train --committee or est fit-uncertainty "
                    f"A.pt B.pt ... --calibration HELD_OUT); these members have none: give a "
                    f"number (eV/Å)")
            out.append(float(stored[key]))
            continue
        part = getattr(getattr(calc, "potential", None), "uncertainty", None)
        stored = getattr(part, "thresholds", {}) or {}
        if key not in stored:
            raise ValueError(
                f"{name}='auto' needs a potential whose latent uncertainty part stores its "
                f"thresholds (fitted by est train --uncertainty); "
                f"{type(calc).__name__}'s has none: give a number (eV/Å)")
        out.append(float(stored[key]))
    return out[0], out[1]


def watching(uncertainty_threshold, uncertainty_rms_threshold) -> bool:
    """Whether a run watches its uncertainty: either threshold is given (its calculator must
    then return ``forces_std``)."""
    return uncertainty_threshold is not None or uncertainty_rms_threshold is not None


def make_watch(calc, uncertainty_threshold, uncertainty_rms_threshold, on_uncertain: str,
               path, *, label: str, append: bool = False) -> UncertaintyWatch | None:
    """The :class:`UncertaintyWatch` of a run whose calculator is ``calc`` ("auto" thresholds
    resolved from it), or None when neither threshold is given."""
    if not watching(uncertainty_threshold, uncertainty_rms_threshold):
        return None
    max_t, rms_t = resolve_thresholds(calc, uncertainty_threshold, uncertainty_rms_threshold)
    return UncertaintyWatch(max_t, on_uncertain, path, label=label, append=append,
                            rms_threshold=rms_t)


class UncertaintyWatch:
    """Compare each step's largest per-atom force std, and the frame's RMS of it, with their
    thresholds (module docstring).

    Args:
        threshold: eV/Å (> 0) bound on the largest per-atom force std, or None.
        on_uncertain: "record" or "stop".
        path: extxyz file the uncertain frames are written to (None: not written).
        label: what runs, for messages ("MD", "relaxation").
        append: add to an existing ``path`` (a restarted run) instead of starting it afresh.
        rms_threshold: eV/Å (> 0) bound on the RMS over the frame's atoms of the per-atom force
            std, or None. At least one of the two thresholds is given.

    Attributes:
        steps: the steps whose structure exceeded a threshold, in order.
        last: the largest per-atom force std of the last checked step (eV/Å).
        last_rms: the RMS per-atom force std of the last checked step (eV/Å).
    """

    def __init__(self, threshold: float | None, on_uncertain: str = "record", path=None, *,
                 label: str = "run", append: bool = False, rms_threshold: float | None = None):
        check_uncertainty_arguments(threshold, on_uncertain, path, rms_threshold)
        if threshold is None and rms_threshold is None:
            raise ValueError("an uncertainty watch needs uncertainty_threshold or "
                             "uncertainty_rms_threshold")
        self.threshold = None if threshold is None else float(threshold)
        self.rms_threshold = None if rms_threshold is None else float(rms_threshold)
        self.on_uncertain = on_uncertain
        self.path = path
        self.label = label
        self.steps: list[int] = []
        self.last = math.nan
        self.last_rms = math.nan
        self._append = bool(append)

    def max_std(self, atoms) -> tuple[float, np.ndarray]:
        """(largest per-atom force std, the per-atom array) of the calculator's last results."""
        results = getattr(atoms.calc, "results", None) or {}
        std = results.get("forces_std")
        if std is None:
            atoms.get_forces()
            std = atoms.calc.results.get("forces_std")
        if std is None:
            raise ValueError(
                f"an uncertainty threshold needs a calculator that returns forces_std "
                f"(ESTCalculator(..., uncertainty=True)); {type(atoms.calc).__name__} does not")
        std = np.asarray(std, dtype=float)
        return float(frame_statistics(std)[0][0]), std

    def __call__(self, step: int, atoms) -> float:
        """Check the structure ``atoms`` at ``step``; returns its largest force std (eV/Å).

        Raises:
            UncertainStructure: beyond a threshold with ``on_uncertain="stop"`` (after the
                frame is written).
        """
        value, std = self.max_std(atoms)
        rms = float(frame_statistics(std)[1][0])
        self.last, self.last_rms = value, rms
        over_max = self.threshold is not None and value > self.threshold
        over_rms = self.rms_threshold is not None and rms > self.rms_threshold
        if not (over_max or over_rms):
            return value
        self.steps.append(int(step))
        if self.path is not None:
            self._write(step, atoms, value, std, rms)
        if self.on_uncertain == "stop":
            where = f" (written to {self.path})" if self.path is not None else ""
            if over_max:
                what, got, limit, name = ("largest per-atom force std", value, self.threshold,
                                          "uncertainty_threshold")
            else:
                what, got, limit, name = ("RMS per-atom force std", rms, self.rms_threshold,
                                          "uncertainty_rms_threshold")
            raise UncertainStructure(
                f"{self.label} stopped at step {step}: {what} {got:.4g} eV/Å exceeds "
                f"{name}={limit:g}; the potential is extrapolating here{where}",
                step=step, quantity="force std", value=got, limit=limit)
        return value

    def _write(self, step: int, atoms, value: float, std: np.ndarray, rms: float) -> None:
        from ase import Atoms
        from ase.io import write

        frame = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell,
                      pbc=atoms.pbc)
        frame.info.update(step=int(step), max_force_std=value, rms_force_std=rms)
        frame.arrays["forces_std"] = np.asarray(std, dtype=float).copy()
        write(self.path, frame, format="extxyz", append=self._append)
        self._append = True
