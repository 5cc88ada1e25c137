"""Checking frames before training: count every problem by kind, then stop or skip explicitly."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from est_calc.neighbors import degenerate_cells

from ._frame import ConcatFrames, Frame, FrameSubset, frame_source

__all__ = ["ValidationReport", "frame_problems", "validate_frames", "elements_outside",
           "check_species", "species_error"]

MAX_Z = 118


@dataclass
class ValidationReport:
    """What :func:`validate_frames` found.

    Attributes:
        n_frames: frames examined.
        n_kept: frames without problems.
        counts: number of frames showing each problem kind (a frame may show several).
        examples: up to ``max_examples`` frame indices per problem kind.
        messages: the error text of frames that could not be read at all, by index.
    """

    n_frames: int = 0
    n_kept: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    messages: dict = field(default_factory=dict)

    @property
    def n_dropped(self) -> int:
        """Frames with at least one problem."""
        return self.n_frames - self.n_kept

    def summary(self) -> str:
        """One line: ``kept k of n frames; problems: kind=count, ...``."""
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())) or "none"
        return f"kept {self.n_kept} of {self.n_frames} frames; problems: {kinds}"


def frame_problems(frame: Frame, *, allowed_species=None, require_energy: bool = True,
                   require_forces: bool = True) -> list[str]:
    """List the problem kinds of one frame (empty when the frame is usable).

    Kinds: ``length_mismatch`` (numbers/tags/fixed/forces disagree with positions),
    ``unknown_element`` (Z outside 1..118), ``species_not_allowed``, ``nan_positions``,
    ``nan_cell``, ``degenerate_cell`` (periodic lattice vectors zero or linearly dependent,
    :func:`est_calc.neighbors.degenerate_cells`, which no neighbour search accepts),
    ``missing_energy``, ``nan_energy``, ``missing_forces``, ``nan_forces``, ``nan_stress``.
    """
    problems = []
    n = len(frame.positions)
    lengths_ok = all(len(getattr(frame, k)) == n for k in ("numbers", "tags", "fixed"))
    if frame.forces is not None and frame.forces.shape != (n, 3):
        lengths_ok = False
    if not lengths_ok or n == 0:
        problems.append("length_mismatch")
    z = frame.numbers
    if np.any((z < 1) | (z > MAX_Z)):
        problems.append("unknown_element")
    elif allowed_species is not None and not np.isin(z, list(allowed_species)).all():
        problems.append("species_not_allowed")
    if not np.isfinite(frame.positions).all():
        problems.append("nan_positions")
    if not np.isfinite(frame.cell).all():
        problems.append("nan_cell")
    elif frame.pbc.shape == (3,) and degenerate_cells(frame.cell, frame.pbc)[0]:
        problems.append("degenerate_cell")
    if frame.energy is None:
        if require_energy:
            problems.append("missing_energy")
    elif not np.isfinite(frame.energy):
        problems.append("nan_energy")
    if frame.forces is None:
        if require_forces:
            problems.append("missing_forces")
    elif not np.isfinite(frame.forces).all():
        problems.append("nan_forces")
    if frame.stress is not None and not np.isfinite(frame.stress).all():
        problems.append("nan_stress")
    return problems


def validate_frames(dataset, *, policy: str = "stop", allowed_species=None,
                    require_energy: bool = True, require_forces: bool = True,
                    max_examples: int = 5) -> tuple[list[int], ValidationReport]:
    """Check every frame of ``dataset``; never drop a frame without counting it.

    A frame whose reading raises (a corrupt record, or a pickle refused by the restricted
    unpickler) counts as ``unreadable``; its message is kept in ``report.messages``.

    Args:
        dataset: a sequence of :class:`Frame` (any reader of this package).
        policy: ``"stop"`` raises if any frame has a problem; ``"skip"`` returns the indices of
            the good frames together with the report.
        allowed_species: optional iterable of atomic numbers the model supports.
        require_energy, require_forces: whether a missing label is a problem.
        max_examples: frame indices remembered per problem kind.

    Returns:
        ``(good_indices, report)``.

    Raises:
        ValueError: unknown policy, or ``policy="stop"`` and some frame has a problem (the
            message gives the counts per kind and example indices).
    """
    if policy not in ("stop", "skip"):
        raise ValueError(f"policy must be 'stop' or 'skip', got {policy!r}")
    report = ValidationReport()
    good = []
    options = dict(allowed_species=allowed_species, require_energy=require_energy,
                   require_forces=require_forces)
    bulk = getattr(dataset, "frame_problems_bulk", None)  # whole-array fast path (HDF5)
    all_problems = bulk(**options) if callable(bulk) else None
    for index in range(len(dataset)):
        report.n_frames += 1
        if all_problems is not None:
            problems = all_problems[index]
        else:
            try:
                problems = frame_problems(dataset[index], **options)
            except Exception as err:  # noqa: BLE001 - a record that cannot be read, of any kind
                problems = ["unreadable"]
                report.messages[index] = f"{type(err).__name__}: {err}"
        if not problems:
            good.append(index)
            continue
        for kind in problems:
            report.counts[kind] += 1
            examples = report.examples.setdefault(kind, [])
            if len(examples) < max_examples:
                examples.append(index)
    report.n_kept = len(good)
    if policy == "stop" and report.counts:
        unreadable = ""
        if report.messages:
            first = min(report.messages)
            text = " ".join(report.messages[first].split())  # one line
            unreadable = f"; frame {first} is unreadable: {text}"
        raise ValueError(f"bad frames in {getattr(dataset, 'path', 'dataset')}: "
                         f"{report.summary()}; example indices {report.examples}{unreadable} "
                         "(use policy='skip' to train on the good frames only)")
    return good, report


def _symbol(z: int) -> str:
    from ase.data import chemical_symbols

    return chemical_symbols[z] if 0 < z < len(chemical_symbols) else f"Z={z}"


def elements_outside(frames, allowed) -> dict[int, tuple]:
    """``{k: sorted atomic numbers of frame k not in allowed}`` for every frame ``k`` of
    ``frames`` that holds such an element (packed HDF5 files are scanned as whole arrays)."""
    allowed = {int(z) for z in allowed}
    bulk = getattr(frames, "elements_outside", None)
    if callable(bulk):
        return bulk(allowed)
    if isinstance(frames, ConcatFrames):
        found, start = {}, 0
        for part in frames.parts:
            found.update({start + k: v for k, v in elements_outside(part, allowed).items()})
            start += len(part)
        return found
    if isinstance(frames, FrameSubset) and callable(getattr(frames.dataset, "elements_outside",
                                                            None)):
        inner = frames.dataset.elements_outside(allowed)
        return {k: inner[i] for k, i in enumerate(frames.indices) if i in inner}
    found = {}
    for k in range(len(frames)):
        present = {int(z) for z in np.unique(frames[k].numbers)}
        if present - allowed:
            found[k] = tuple(sorted(present - allowed))
    return found


def species_error(frames, found: dict, species, *, what: str = "data",
                  owner: str = "the potential", complete: bool = True,
                  max_examples: int = 5) -> ValueError:
    """The one-line error for frames holding elements outside ``species``.

    Args:
        frames: the sequence the keys of ``found`` index (its frames are located in their
            files with :func:`frame_source`).
        found: ``{frame index: unknown atomic numbers}``, as :func:`elements_outside` returns.
        species: the atomic numbers that are known.
        what: what the frames are ("validation data", a path ...).
        owner: who does not know the elements ("the potential", ...).
        complete: ``found`` covers all of ``frames`` (the count of affected frames is given).
    """
    unknown = sorted({int(z) for zs in found.values() for z in zs})
    examples = []
    for k in list(found)[:max_examples]:
        source, local = frame_source(frames, k)
        where = f"frame {local}" + (f" of {source}" if source is not None else "")
        examples.append(f"{where} ({', '.join(_symbol(z) for z in found[k])})")
    more = ", ..." if len(found) > max_examples else ""
    count = f" in {len(found)} of {len(frames)} frames" if complete else ""
    return ValueError(
        f"{what}: {owner} does not know element(s) {', '.join(_symbol(z) for z in unknown)} "
        f"(it knows {', '.join(_symbol(int(z)) for z in sorted(species))}); found{count}: "
        f"{', '.join(examples)}{more}")


def check_species(frames, species, *, what: str = "data", owner: str = "the potential") -> None:
    """Refuse frames holding elements outside ``species``.

    Raises:
        ValueError: one line naming the unknown elements, how many frames hold them and the
            first few of those frames (index in their file, and the file where known).
    """
    found = elements_outside(frames, species)
    if found:
        raise species_error(frames, found, species, what=what, owner=owner)
