"""Packed HDF5 frame files: one file, contiguous per-atom arrays and per-frame arrays.

Layout (format ``est_calc-frames``, version 1), n_frames = F, total atoms = N:

=====================  ==============  ===========================================================
dataset                shape, dtype    meaning
=====================  ==============  ===========================================================
frame_ptr              (F+1,) int64    atoms of frame i are rows frame_ptr[i]:frame_ptr[i+1]
positions              (N, 3) f8       Å
numbers                (N,) i8         atomic numbers
forces                 (N, 3) f8       eV/Å, raw (fixed atoms included); NaN where has_forces=0
tags, fixed            (N,) i8, bool   OC20 tags; True = FixAtoms
energy / has_energy    (F,) f8 / bool  eV; NaN where missing
cell, pbc              (F,3,3), (F,3)  Å rows; periodic directions
stress / has_stress    (F,3,3) / bool  eV/Å^3 (ASE sign)
has_forces             (F,) bool
sid, sid_kind          (F,) str, i1    sid as text; 0 = None, 1 = int, 2 = str
fid / has_fid          (F,) i8 / bool
reference_energy       (F,) f8         eV, NaN where unknown
extra_json             (F,) str        JSON of the frame's JSON-serialisable extras
=====================  ==============  ===========================================================

File attributes: ``format``, ``version``, ``source``, ``n_frames``, ``n_atoms``, ``created``
(UTC ISO time), ``creator`` (est_calc version) and ``metadata_json`` (user metadata).
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import numpy as np

from ._frame import Frame, FrameDataset, plain_value

__all__ = ["HDF5Dataset", "write_hdf5", "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_NAME = "est_calc-frames"
FORMAT_VERSION = 1

_ATOM_FIELDS = {"positions": ((3,), "f8"), "numbers": ((), "i8"), "forces": ((3,), "f8"),
                "tags": ((), "i8"), "fixed": ((), "bool")}
_FRAME_FIELDS = {"energy": ((), "f8"), "has_energy": ((), "bool"), "cell": ((3, 3), "f8"),
                 "pbc": ((3,), "bool"), "stress": ((3, 3), "f8"), "has_stress": ((), "bool"),
                 "has_forces": ((), "bool"), "sid_kind": ((), "i1"), "fid": ((), "i8"),
                 "has_fid": ((), "bool"), "reference_energy": ((), "f8")}
_STR_FIELDS = ("sid", "extra_json")


def _all_finite(values: np.ndarray, axes) -> np.ndarray:
    return np.isfinite(values).all(axis=axes)


def _extra_json(extra: dict) -> str:
    keep = {}
    for key, value in extra.items():
        value = plain_value(value)
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        keep[str(key)] = value
    return json.dumps(keep)


def _frame_columns(frame: Frame) -> tuple[dict, dict]:
    n = frame.n_atoms
    for name in ("numbers", "tags", "fixed"):
        if len(getattr(frame, name)) != n:
            raise ValueError(f"frame sid={frame.sid} fid={frame.fid}: {name} has "
                             f"{len(getattr(frame, name))} entries for {n} atoms")
    if frame.forces is not None and frame.forces.shape != (n, 3):
        raise ValueError(f"frame sid={frame.sid} fid={frame.fid}: forces shape "
                         f"{frame.forces.shape} for {n} atoms")
    atoms = {"positions": frame.positions, "numbers": frame.numbers,
             "forces": frame.forces if frame.forces is not None else np.full((n, 3), np.nan),
             "tags": frame.tags, "fixed": frame.fixed}
    sid = frame.sid
    per_frame = {
        "energy": np.nan if frame.energy is None else frame.energy,
        "has_energy": frame.energy is not None, "cell": frame.cell, "pbc": frame.pbc,
        "stress": np.zeros((3, 3)) if frame.stress is None else frame.stress,
        "has_stress": frame.stress is not None, "has_forces": frame.forces is not None,
        "sid_kind": 0 if sid is None else (1 if isinstance(sid, (int, np.integer)) else 2),
        "fid": -1 if frame.fid is None else frame.fid, "has_fid": frame.fid is not None,
        "reference_energy": np.nan if frame.reference_energy is None else frame.reference_energy,
        "sid": "" if sid is None else str(sid), "extra_json": _extra_json(frame.extra),
    }
    return atoms, per_frame


def write_hdf5(frames, path, metadata: dict | None = None, *, source: str = "",
               chunk_frames: int = 1024) -> int:
    """Stream frames into a packed HDF5 file, written to a temporary name and then renamed.

    Frames are buffered ``chunk_frames`` at a time and appended to resizable datasets, so memory
    stays bounded by one chunk whatever the number of frames.

    Args:
        frames: iterable of :class:`Frame`.
        path: output ``.h5`` path.
        metadata: JSON-serialisable dict stored in the ``metadata_json`` attribute.
        source: free text stored in the ``source`` attribute (e.g. the input path).
        chunk_frames: frames buffered between flushes.

    Returns:
        The number of frames written.

    Raises:
        ValueError: a frame whose per-atom arrays disagree in length.
    """
    import h5py

    from est_calc import __version__

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    n_frames = n_atoms = 0
    try:
        with h5py.File(tmp, "w") as h5:
            str_dtype = h5py.string_dtype("utf-8")
            dsets = {}
            for name, (tail, dtype) in {**_ATOM_FIELDS, **_FRAME_FIELDS}.items():
                rows = 4096 if name in _ATOM_FIELDS else 512  # chunk rows
                dsets[name] = h5.create_dataset(name, shape=(0, *tail), maxshape=(None, *tail),
                                                dtype=dtype, chunks=(rows, *tail))
            for name in _STR_FIELDS:
                dsets[name] = h5.create_dataset(name, shape=(0,), maxshape=(None,),
                                                dtype=str_dtype, chunks=(512,))
            ptr = h5.create_dataset("frame_ptr", data=np.zeros(1, np.int64), maxshape=(None,),
                                    chunks=(512,))
            buffer: list[tuple[dict, dict]] = []

            def flush():
                nonlocal n_frames, n_atoms
                if not buffer:
                    return
                sizes = np.array([len(a["positions"]) for a, _ in buffer], np.int64)
                for name in _ATOM_FIELDS:
                    block = np.concatenate([a[name] for a, _ in buffer])
                    d = dsets[name]
                    d.resize(n_atoms + len(block), axis=0)
                    d[n_atoms:] = block
                for name in (*_FRAME_FIELDS, *_STR_FIELDS):
                    d = dsets[name]
                    d.resize(n_frames + len(buffer), axis=0)
                    d[n_frames:] = np.array([f[name] for _, f in buffer],
                                            dtype=object if name in _STR_FIELDS else None)
                ptr.resize(n_frames + len(buffer) + 1, axis=0)
                ptr[n_frames + 1:] = n_atoms + np.cumsum(sizes)
                n_frames += len(buffer)
                n_atoms += int(sizes.sum())
                buffer.clear()

            for frame in frames:
                buffer.append(_frame_columns(frame))
                if len(buffer) >= chunk_frames:
                    flush()
            flush()
            h5.attrs.update({
                "format": FORMAT_NAME, "version": FORMAT_VERSION, "source": str(source),
                "n_frames": n_frames, "n_atoms": n_atoms,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "creator": f"est_calc {__version__}",
                "metadata_json": json.dumps(metadata or {}),
            })
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n_frames


class HDF5Dataset(FrameDataset):
    """Random-access reader of a packed HDF5 frame file.

    Per-frame arrays are loaded once; per-atom arrays are sliced from disk for each frame. The
    file handle is re-opened in a forked worker process.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: not an ``est_calc-frames`` file, or a newer format version.
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"HDF5 frame file not found: {self.path}")
        self._h5 = None
        self._pid = None
        h5 = self._file()
        if h5.attrs.get("format") != FORMAT_NAME:
            raise ValueError(f"{self.path} is not an {FORMAT_NAME} HDF5 file "
                             f"(format attribute {h5.attrs.get('format')!r})")
        if int(h5.attrs["version"]) > FORMAT_VERSION:
            raise ValueError(f"{self.path}: format version {h5.attrs['version']} is newer than "
                             f"the supported {FORMAT_VERSION}")
        self.metadata = dict(h5.attrs)
        self.metadata["metadata"] = json.loads(h5.attrs.get("metadata_json", "{}"))
        self._ptr = h5["frame_ptr"][:]
        self._frame = {name: h5[name][:] for name in _FRAME_FIELDS}
        self._frame.update({name: h5[name].asstr()[:] for name in _STR_FIELDS})

    def __getstate__(self):
        # h5py handles cannot be pickled (spawned DataLoader workers): re-open on first use
        state = dict(self.__dict__)
        state.update(_h5=None, _pid=None, _atom_dsets=None)
        return state

    def _file(self):
        import h5py

        if self._h5 is None or self._pid != os.getpid():
            self._h5 = h5py.File(self.path, "r")
            self._pid = os.getpid()
            self._atom_dsets = {name: self._h5[name] for name in _ATOM_FIELDS}
        return self._h5

    def __len__(self) -> int:
        return len(self._ptr) - 1

    def _get(self, index: int) -> Frame:
        self._file()
        start, stop = int(self._ptr[index]), int(self._ptr[index + 1])
        atoms = {name: d[start:stop] for name, d in self._atom_dsets.items()}
        f = {name: values[index] for name, values in self._frame.items()}
        kind = int(f["sid_kind"])
        sid = None if kind == 0 else (int(f["sid"]) if kind == 1 else str(f["sid"]))
        ref = float(f["reference_energy"])
        return Frame(positions=atoms["positions"], numbers=atoms["numbers"], cell=f["cell"],
                     pbc=f["pbc"], energy=float(f["energy"]) if f["has_energy"] else None,
                     forces=atoms["forces"] if f["has_forces"] else None,
                     stress=f["stress"] if f["has_stress"] else None, tags=atoms["tags"],
                     fixed=atoms["fixed"], sid=sid, fid=int(f["fid"]) if f["has_fid"] else None,
                     reference_energy=None if np.isnan(ref) else ref,
                     extra=json.loads(f["extra_json"]))

    def elements_outside(self, allowed, *, block_frames: int = 65536) -> dict[int, tuple]:
        """``{frame index: sorted atomic numbers not in allowed}`` for every frame holding one,
        computed on the packed ``numbers`` array block by block."""
        self._file()
        allowed = np.asarray(sorted({int(z) for z in allowed}), dtype=np.int64)
        found: dict[int, set] = {}
        for first in range(0, len(self), block_frames):
            last = min(first + block_frames, len(self))
            a0, a1 = int(self._ptr[first]), int(self._ptr[last])
            owner = np.repeat(np.arange(first, last), np.diff(self._ptr[first:last + 1]))
            z = self._atom_dsets["numbers"][a0:a1]
            bad = ~np.isin(z, allowed)
            pairs = np.unique(np.stack([owner[bad], z[bad]]), axis=1)  # (frame, Z), distinct
            for frame, number in zip(pairs[0].tolist(), pairs[1].tolist()):
                found.setdefault(frame, set()).add(number)
        return {k: tuple(sorted(v)) for k, v in sorted(found.items())}

    def frame_problems_bulk(self, *, allowed_species=None, require_energy: bool = True,
                            require_forces: bool = True, block_frames: int = 65536):
        """Problem kinds of every frame, computed on whole arrays (same kinds and rules as
        :func:`est_calc.training.datasets.validate.frame_problems`), block by block.

        Returns:
            A list with one list of problem kinds per frame.
        """
        from est_calc.neighbors import degenerate_cells

        from .validate import MAX_Z

        f = self._frame
        frame_bad = {
            "nan_cell": ~_all_finite(f["cell"], (1, 2)),
            "degenerate_cell": _all_finite(f["cell"], (1, 2)) & degenerate_cells(f["cell"],
                                                                                  f["pbc"]),
            "missing_energy": ~f["has_energy"] & require_energy,
            "nan_energy": f["has_energy"] & ~np.isfinite(f["energy"]),
            "missing_forces": ~f["has_forces"] & require_forces,
            "nan_stress": f["has_stress"] & ~_all_finite(f["stress"], (1, 2)),
            "length_mismatch": np.diff(self._ptr) == 0,
        }
        atom_bad = {k: np.zeros(len(self), bool) for k in
                    ("unknown_element", "species_not_allowed", "nan_positions", "nan_forces")}
        self._file()
        allowed = None if allowed_species is None else np.asarray(list(allowed_species))
        for first in range(0, len(self), block_frames):
            last = min(first + block_frames, len(self))
            a0, a1 = int(self._ptr[first]), int(self._ptr[last])
            owner = np.repeat(np.arange(first, last), np.diff(self._ptr[first:last + 1]))
            z = self._atom_dsets["numbers"][a0:a1]
            flags = {"unknown_element": (z < 1) | (z > MAX_Z),
                     "nan_positions": ~_all_finite(self._atom_dsets["positions"][a0:a1], 1),
                     "nan_forces": ~_all_finite(self._atom_dsets["forces"][a0:a1], 1)
                     & f["has_forces"][owner]}
            if allowed is not None:
                flags["species_not_allowed"] = ~np.isin(z, allowed)
            for kind, flag in flags.items():
                atom_bad[kind][np.unique(owner[flag])] = True
        atom_bad["species_not_allowed"] &= ~atom_bad["unknown_element"]
        order = ("length_mismatch", "unknown_element", "species_not_allowed", "nan_positions",
                 "nan_cell", "degenerate_cell", "missing_energy", "nan_energy", "missing_forces",
                 "nan_forces", "nan_stress")
        bad = {**frame_bad, **atom_bad}
        return [[k for k in order if bad[k][i]] for i in range(len(self))]
