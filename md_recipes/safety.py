"""Guards shared by the recipes: the :class:`SimulationUnstable` error, per-step checks of energy
and forces, argument checks, and whole-file (atomic) output.

A run that leaves the physical regime stops with :class:`SimulationUnstable` instead of going on
and returning numbers: a non-finite energy, force, position or momentum, or a largest per-atom
force norm

    max_i |F_i| > max_force_eV_per_A

stops it at the step where it is first seen. Outputs written in one piece go through
:func:`atomic_output`: the data go to a hidden temporary file beside the target, which replaces
the target only once complete (``os.replace``), so a crash leaves the old file or the new one,
never a part; the file is created by ``open`` and so has the mode the umask gives (0644 under
umask 022).
"""

from __future__ import annotations

import math
import os
import secrets
from contextlib import contextmanager

import numpy as np

__all__ = ["SimulationUnstable", "DEFAULT_MAX_FORCE_EV_PER_A", "DEFAULT_RELAX_MAX_FORCE_EV_PER_A",
           "atomic_output"]

#: Default bound on the largest per-atom force norm (eV/Å). The EMT-generated training data of
#: the default potential drops frames with any |F| > 50 eV/Å, so beyond it the model extrapolates;
#: forces that large also mean overlapping atoms or a run that already went wrong.
DEFAULT_MAX_FORCE_EV_PER_A = 50.0

#: Default bound for relaxations (eV/Å). A relaxation often starts from a poor guess (an adsorbate
#: placed too close, a strained cell) whose first forces exceed 50 eV/Å and which the optimiser's
#: step limit handles; forces beyond this bound are no longer a poor guess but a broken model or
#: geometry (the float32 defect of issue 21 gave 1e4 eV/Å on ideal crystals).
DEFAULT_RELAX_MAX_FORCE_EV_PER_A = 500.0


class SimulationUnstable(RuntimeError):
    """A run left the physical regime; the message is one line naming the step and the quantity.

    Attributes:
        step: step (MD step or optimiser step) at which the problem was seen.
        quantity: what was out of bounds: "energy", "forces", "positions", "momenta",
            "max force", "temperature", "total energy" or "model output".
        value: the offending value (nan for non-finite arrays).
        limit: the bound that was exceeded (None for non-finite values).
    """

    def __init__(self, message: str, *, step: int, quantity: str, value: float = math.nan,
                 limit: float | None = None):
        super().__init__(" ".join(str(message).split()))
        self.step = int(step)
        self.quantity = quantity
        self.value = float(value)
        self.limit = limit


def check_bound(name: str, value, minimum: float = 0.0) -> None:
    """Raise ValueError unless ``value`` is None (check disabled) or finite and > ``minimum``."""
    if value is None:
        return
    try:
        ok = math.isfinite(float(value)) and float(value) > minimum
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a finite number > {minimum:g} or None (no check), "
                         f"got {value!r}")


def check_energy_forces(label: str, step: int, energy, forces, max_force: float | None) -> None:
    """Raise SimulationUnstable for a non-finite energy or forces, or max_i |F_i| > max_force.

    Args:
        label: what ran, e.g. "MD" or "relaxation of structure 3" (starts the message).
        step: the step the values belong to.
        energy: potential energy (eV), or None when not known at this step.
        forces: (n, 3) forces (eV/Å), or None when not known at this step.
        max_force: bound on the largest per-atom force norm (eV/Å); None: no bound.
    """
    if energy is not None and not math.isfinite(float(energy)):
        raise SimulationUnstable(f"{label} stopped at step {step}: non-finite energy {energy}",
                                 step=step, quantity="energy")
    if forces is None:
        return
    forces = np.asarray(forces, dtype=float)
    bad = ~np.isfinite(forces).all(axis=1)
    if bad.any():
        atoms = np.flatnonzero(bad)
        raise SimulationUnstable(
            f"{label} stopped at step {step}: non-finite forces on {atoms.size} atom(s) "
            f"(first {atoms[:5].tolist()})", step=step, quantity="forces")
    if max_force is None or len(forces) == 0:
        return
    norms = np.sqrt((forces**2).sum(axis=1))
    worst = int(np.argmax(norms))
    if norms[worst] > max_force:
        raise SimulationUnstable(
            f"{label} stopped at step {step}: max force {norms[worst]:.4g} eV/Å on atom {worst} "
            f"exceeds max_force_eV_per_A={max_force:g} (atoms too close or the run blew up; "
            "raise the bound or pass None to go on regardless)",
            step=step, quantity="max force", value=norms[worst], limit=max_force)


def check_finite_state(label: str, step: int, atoms) -> None:
    """Raise SimulationUnstable when positions or momenta of ``atoms`` are not finite."""
    for quantity, values in (("positions", atoms.positions), ("momenta", atoms.get_momenta())):
        if not np.isfinite(values).all():
            raise SimulationUnstable(f"{label} stopped at step {step}: non-finite {quantity}",
                                     step=step, quantity=quantity)


def check_output_path(name: str, path) -> None:
    """Raise ValueError unless ``path`` can be created: its folder exists, it is not a folder."""
    if path is None:
        return
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{name} {path!r}: the folder {folder!r} is missing")
    if os.path.isdir(path):
        raise ValueError(f"{name} {path!r} is a folder, not a file")


@contextmanager
def atomic_output(path):
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on failure it is
    removed. The temporary name ends with the target's name, so extensions (format, compression)
    are kept. Create the file with ``open`` (mode from the umask), not with ``mkstemp`` (0600)."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{secrets.token_hex(4)}-{name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
