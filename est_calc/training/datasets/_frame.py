"""The :class:`Frame` record every reader returns, its ASE conversions, dataset concatenation."""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch.utils.data import Subset

__all__ = ["Frame", "FrameDataset", "ConcatFrames", "FrameSubset", "frame_from_atoms",
           "frame_source", "plain_value"]


def plain_value(value):
    """Turn numpy scalars/arrays (also nested in dicts, lists, tuples) into plain Python values,
    so that extras can be stored as JSON."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): plain_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    return value


def _opt_array(value) -> np.ndarray | None:
    return None if value is None else np.array(value, dtype=np.float64)


@dataclass(frozen=True, eq=False)
class Frame:
    """One labelled structure, as read from any supported file.

    Arrays are converted (copied) to fixed dtypes on construction; lengths are *not* checked here
    so that bad records can still be read and reported by :func:`validate_frames`.

    Attributes:
        positions: (n, 3) float64 Cartesian positions, Å.
        numbers: (n,) int64 atomic numbers.
        cell: (3, 3) float64 lattice vectors as rows, Å.
        pbc: (3,) bool periodic directions.
        energy: total energy in eV (referenced if the reader subtracted the reference), or None.
        forces: (n, 3) float64 raw forces in eV/Å, fixed atoms included, or None.
        stress: (3, 3) float64 stress in eV/Å^3 (ASE sign), or None.
        tags: (n,) int64 OC20 tags (0 subsurface, 1 surface, 2 adsorbate). A file with no tags
            gives all zeros; all-zero tags are kept as they are (no "all ones" rewrite).
        fixed: (n,) bool, True for atoms held by a FixAtoms constraint.
        sid: system id (int or str) or None.
        fid: frame index along the source relaxation, or None.
        reference_energy: OC20 reference energy (slab + gas references) in eV, or None.
        extra: further per-frame values carried by the source (free_energy, y_relaxed, ...).
    """

    positions: np.ndarray
    numbers: np.ndarray
    cell: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))
    pbc: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=bool))
    energy: float | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    tags: np.ndarray | None = None
    fixed: np.ndarray | None = None
    sid: int | str | None = None
    fid: int | None = None
    reference_energy: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        put = object.__setattr__
        pos = np.array(self.positions, dtype=np.float64).reshape(-1, 3)
        n = len(pos)
        put(self, "positions", pos)
        put(self, "numbers", np.array(self.numbers, dtype=np.int64).reshape(-1))
        put(self, "cell", np.array(self.cell, dtype=np.float64).reshape(3, 3))
        pbc = np.array(self.pbc, dtype=bool).reshape(-1)
        put(self, "pbc", np.repeat(pbc, 3) if pbc.size == 1 else pbc)
        put(self, "energy", None if self.energy is None else float(self.energy))
        forces = _opt_array(self.forces)
        put(self, "forces", None if forces is None else forces.reshape(-1, 3))
        stress = _opt_array(self.stress)
        if stress is not None and stress.shape == (6,):
            from ase.stress import voigt_6_to_full_3x3_stress

            stress = voigt_6_to_full_3x3_stress(stress)
        put(self, "stress", None if stress is None else stress.reshape(3, 3))
        tags = np.zeros(n, np.int64) if self.tags is None else self.tags
        put(self, "tags", np.array(tags, dtype=np.int64).reshape(-1))
        fixed = np.zeros(n, bool) if self.fixed is None else self.fixed
        put(self, "fixed", np.array(fixed).astype(bool).reshape(-1))
        if isinstance(self.sid, np.generic):
            put(self, "sid", self.sid.item())
        put(self, "fid", None if self.fid is None else int(self.fid))
        ref = self.reference_energy
        put(self, "reference_energy", None if ref is None else float(ref))
        put(self, "extra", dict(self.extra))

    @property
    def n_atoms(self) -> int:
        """Number of atoms (length of ``positions``)."""
        return len(self.positions)

    def to_atoms(self):
        """Build an ``ase.Atoms`` carrying every label of this frame.

        Returns:
            Atoms with FixAtoms on the fixed atoms, the tags, ``info["sid"]``, ``info["fid"]``,
            ``info["reference_energy"]`` when known, and a SinglePointCalculator holding the raw
            energy, forces (fixed atoms included) and stress.
        """
        from ase import Atoms
        from ase.calculators.singlepoint import SinglePointCalculator
        from ase.constraints import FixAtoms

        atoms = Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell,
                      pbc=self.pbc, tags=self.tags)
        if self.fixed.any():
            atoms.set_constraint(FixAtoms(indices=np.flatnonzero(self.fixed)))
        for key in ("sid", "fid", "reference_energy"):
            if getattr(self, key) is not None:
                atoms.info[key] = getattr(self, key)
        results = {}
        if self.energy is not None:
            results["energy"] = self.energy
        if self.forces is not None:
            results["forces"] = self.forces.copy()
        if self.stress is not None:
            results["stress"] = self.stress.copy()
        if results:
            atoms.calc = SinglePointCalculator(atoms, **results)
        return atoms


def _fixed_from_constraints(atoms) -> np.ndarray:
    from ase.constraints import FixAtoms

    fixed = np.zeros(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            fixed[constraint.get_indices()] = True
    return fixed


def frame_from_atoms(atoms, *, sid=None, fid=None, reference_energy=None,
                     extra: dict | None = None) -> Frame:
    """Turn an ``ase.Atoms`` (with an optional attached calculator) into a :class:`Frame`.

    Energy, forces and stress are taken from ``atoms.calc.results`` as stored, i.e. raw forces
    on fixed atoms are kept (ASE's ``get_forces()`` would zero them). ``atoms.info`` values
    ``energy``/``forces``/``stress`` are used when no calculator result is present. ``fixed``
    comes from FixAtoms constraints, ``tags`` from ``atoms.get_tags()``.

    Args:
        atoms: the structure.
        sid, fid, reference_energy: override the ids; by default read from ``atoms.info``.
        extra: additional values stored in ``Frame.extra``.
    """
    info = dict(atoms.info)
    results = dict(getattr(atoms.calc, "results", None) or {})
    energy = results.get("energy", info.pop("energy", None))
    forces = results.get("forces", info.pop("forces", None))
    stress = results.get("stress", info.pop("stress", None))
    sid = info.pop("sid", None) if sid is None else sid
    fid = info.pop("fid", None) if fid is None else fid
    if reference_energy is None:
        reference_energy = info.pop("reference_energy", None)
    more = {k: v for k, v in info.items() if k not in ("sid", "fid", "reference_energy")}
    if "free_energy" in results:
        more["free_energy"] = float(results["free_energy"])
    more.update(extra or {})
    return Frame(positions=atoms.get_positions(), numbers=atoms.get_atomic_numbers(),
                 cell=np.asarray(atoms.get_cell()), pbc=atoms.get_pbc(), energy=energy,
                 forces=forces, stress=stress, tags=atoms.get_tags(),
                 fixed=_fixed_from_constraints(atoms), sid=sid, fid=fid,
                 reference_energy=reference_energy, extra=more)


class FrameDataset(Sequence):
    """Base class: a random-access sequence of :class:`Frame` (``len``, ``[i]``, iteration)."""

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _get(self, index: int) -> Frame:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = int(index)
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"frame index {index} out of range for {n} frames")
        return self._get(index)

    def __iter__(self) -> Iterator[Frame]:
        for i in range(len(self)):
            yield self._get(i)

    def locate(self, index: int) -> tuple[Any, int]:
        """Where frame ``index`` comes from: ``(file, index of the frame in that file)``;
        the file is None where the dataset does not know it."""
        return getattr(self, "path", None), int(index)


class ConcatFrames(FrameDataset):
    """Several frame datasets read one after the other (e.g. a folder of shards, sorted by name)."""

    def __init__(self, parts: Sequence[FrameDataset]):
        self.parts = list(parts)
        self._ends = np.cumsum([len(p) for p in self.parts]).tolist()

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def _part(self, index: int) -> tuple[int, int]:
        part = bisect.bisect_right(self._ends, index)
        return part, index - (self._ends[part - 1] if part else 0)

    def _get(self, index: int) -> Frame:
        part, local = self._part(index)
        return self.parts[part][local]

    def locate(self, index: int) -> tuple[Any, int]:
        part, local = self._part(int(index))
        return frame_source(self.parts[part], local)


class FrameSubset(Subset):
    """The frames ``indices`` of ``dataset``, in that order (frame ``k`` is
    ``dataset[indices[k]]``): a ``torch.utils.data.Subset`` that also tells where each of its
    frames comes from (:meth:`locate`, for error messages naming the file)."""

    def __init__(self, dataset, indices):
        super().__init__(dataset, list(indices))

    def locate(self, index: int) -> tuple[Any, int]:
        return frame_source(self.dataset, self.indices[int(index)])


def frame_source(frames, index: int) -> tuple[Any, int]:
    """``(file, index within that file)`` of frame ``index`` of any sequence of frames (a plain
    list gives ``(None, index)``)."""
    locate = getattr(frames, "locate", None)
    return locate(index) if callable(locate) else (None, int(index))
