"""Watching a run's uncertainty: frames beyond a force-std threshold, recorded or stopping the run.

A calculator that returns ``forces_std`` (eV/Å per atom, ``ESTCalculator(uncertainty=True)``,
:mod:`est_calc.uncertainty`) tells where the potential is extrapolating. :class:`UncertaintyWatch`
reads the largest per-atom value after every step of :func:`md_recipes.run_md` or
:func:`md_recipes.relax`; when it exceeds the threshold the structure is appended to an extxyz
file for relabelling (positions, cell, pbc, the per-atom ``forces_std`` array and, in the info
line, the step and ``max_force_std``; no model energy or forces, which would read as labels), and
the run either goes on ("record") or stops with :class:`UncertainStructure` ("stop").

A threshold to start from: the 95th percentile of the per-frame largest force std of held-out
in-distribution frames (benchmarks/RESULTS.md, "Uncertainty", gives it for the shipped potential).
"""

from __future__ import annotations

import math

import numpy as np

from md_recipes.safety import SimulationUnstable, check_output_path

__all__ = ["ON_UNCERTAIN", "UncertainStructure", "UncertaintyWatch", "check_uncertainty_arguments"]

#: What a run does with a structure beyond the threshold: write it and go on, or write it and stop.
ON_UNCERTAIN = ("record", "stop")


class UncertainStructure(SimulationUnstable):
    """The largest per-atom force std exceeded the threshold and the run was asked to stop.

    ``quantity`` is "force std", ``value`` the largest per-atom force std (eV/Å) and ``limit``
    the threshold; the structure is the last frame of the run's extxyz file of uncertain frames.
    """


def check_uncertainty_arguments(uncertainty_threshold, on_uncertain: str,
                                uncertain_frames) -> None:
    """Raise ValueError, naming the argument, for a threshold that is not None or finite and
    > 0, an unknown ``on_uncertain``, or an output path that cannot be created."""
    threshold = uncertainty_threshold
    if threshold is not None:
        try:
            ok = math.isfinite(float(threshold)) and float(threshold) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"uncertainty_threshold must be a finite number > 0 (eV/Å) or None, "
                             f"got {threshold!r}")
    if on_uncertain not in ON_UNCERTAIN:
        raise ValueError(f"on_uncertain must be one of {list(ON_UNCERTAIN)}, got "
                         f"{on_uncertain!r}")
    check_output_path("uncertain_frames", uncertain_frames)


class UncertaintyWatch:
    """Compare each step's largest per-atom force std with a threshold (module docstring).

    Args:
        threshold: eV/Å (> 0).
        on_uncertain: "record" or "stop".
        path: extxyz file the uncertain frames are written to (None: not written).
        label: what runs, for messages ("MD", "relaxation").
        append: add to an existing ``path`` (a restarted run) instead of starting it afresh.

    Attributes:
        steps: the steps whose structure exceeded the threshold, in order.
        last: the largest per-atom force std of the last checked step (eV/Å).
    """

    def __init__(self, threshold: float, on_uncertain: str = "record", path=None, *,
                 label: str = "run", append: bool = False):
        check_uncertainty_arguments(threshold, on_uncertain, path)
        self.threshold = float(threshold)
        self.on_uncertain = on_uncertain
        self.path = path
        self.label = label
        self.steps: list[int] = []
        self.last = math.nan
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
        return float(std.max()) if std.size else 0.0, std

    def __call__(self, step: int, atoms) -> float:
        """Check the structure ``atoms`` at ``step``; returns its largest force std (eV/Å).

        Raises:
            UncertainStructure: beyond the threshold with ``on_uncertain="stop"`` (after the
                frame is written).
        """
        value, std = self.max_std(atoms)
        self.last = value
        if not value > self.threshold:
            return value
        self.steps.append(int(step))
        if self.path is not None:
            self._write(step, atoms, value, std)
        if self.on_uncertain == "stop":
            where = f" (written to {self.path})" if self.path is not None else ""
            raise UncertainStructure(
                f"{self.label} stopped at step {step}: largest per-atom force std {value:.4g} "
                f"eV/Å exceeds uncertainty_threshold={self.threshold:g}; the potential is "
                f"extrapolating here{where}",
                step=step, quantity="force std", value=value, limit=self.threshold)
        return value

    def _write(self, step: int, atoms, value: float, std: np.ndarray) -> None:
        from ase import Atoms
        from ase.io import write

        frame = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell,
                      pbc=atoms.pbc)
        frame.info.update(step=int(step), max_force_std=value)
        frame.arrays["forces_std"] = np.asarray(std, dtype=float).copy()
        write(self.path, frame, format="extxyz", append=self._append)
        self._append = True
