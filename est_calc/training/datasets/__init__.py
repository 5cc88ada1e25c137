"""Readers and writers of OC20-style training data, all yielding :class:`Frame` records.

``open_dataset(path)`` picks the reader from the path:

==========================================  ================================================
path                                        reader
==========================================  ================================================
``*.extxyz``, ``*.xyz`` (``.xz`` too)       :class:`ExtxyzDataset` (+ ``.txt`` sidecar)
``*.db``, ``*.json``, ``*.aselmdb``         :class:`AseDBDataset`
``*.lmdb`` (legacy pickled PyG Data)        :class:`LegacyLMDBDataset`
``*.h5``, ``*.hdf5``                        :class:`HDF5Dataset`
folder                                      its shards of one kind, in sorted order
==========================================  ================================================

Every reader returns a random-access sequence (``len``, ``[i]``, iteration). ``convert`` turns any
of them into HDF5 (or ``.aselmdb``/``.db``/``.json``/``.extxyz``); ``validate_frames`` counts bad
frames before training. Heavy libraries (ase, h5py, lmdb, torch) are imported only when used.
"""

from __future__ import annotations

import os
from pathlib import Path

from ._frame import ConcatFrames, Frame, FrameDataset, FrameSubset, frame_from_atoms, frame_source
from .asedb import AseDBDataset, write_ase_db
from .extxyz import ExtxyzDataset, read_sidecar, write_extxyz_with_sidecar
from .hdf5 import HDF5Dataset, write_hdf5
from .legacy_lmdb import LegacyLMDBDataset, RestrictedUnpickler, UnsafePickleError, safe_loads
from .validate import (ValidationReport, check_species, elements_outside, frame_problems,
                       species_error, validate_frames)

__all__ = [
    "Frame", "FrameDataset", "ConcatFrames", "FrameSubset", "frame_from_atoms", "frame_source",
    "open_dataset", "convert", "check_species", "elements_outside", "species_error",
    "detect_format", "ExtxyzDataset", "AseDBDataset", "LegacyLMDBDataset", "HDF5Dataset",
    "write_extxyz_with_sidecar", "write_ase_db", "write_hdf5", "read_sidecar",
    "RestrictedUnpickler", "UnsafePickleError", "safe_loads", "validate_frames",
    "frame_problems", "ValidationReport",
]

_BY_SUFFIX = [
    (".extxyz.xz", "extxyz"), (".xyz.xz", "extxyz"), (".extxyz", "extxyz"), (".xyz", "extxyz"),
    (".aselmdb", "asedb"), (".db", "asedb"), (".json", "asedb"), (".lmdb", "legacy_lmdb"),
    (".h5", "hdf5"), (".hdf5", "hdf5"),
]
_READERS = {"extxyz": ExtxyzDataset, "asedb": AseDBDataset, "legacy_lmdb": LegacyLMDBDataset,
            "hdf5": HDF5Dataset}


def detect_format(path) -> str:
    """Name the reader for a file from its suffix: extxyz, asedb, legacy_lmdb or hdf5.

    Raises:
        ValueError: an unknown suffix.
    """
    name = Path(path).name.lower()
    for suffix, kind in _BY_SUFFIX:
        if name.endswith(suffix):
            return kind
    raise ValueError(f"cannot tell the data format of {path}: expected one of "
                     + ", ".join(s for s, _ in _BY_SUFFIX))


def open_dataset(path, *, format: str | None = None, **options) -> FrameDataset:
    """Open a data file or folder as a random-access sequence of :class:`Frame`.

    A folder is read as its files of one recognised kind in sorted name order; a folder of
    ``*.lmdb`` files is one legacy split (keys numbered per file). ``.txt`` sidecars and
    ``-lock`` files beside the data are not data files themselves.

    Args:
        path: file or folder, or a list of them (read one after the other, each in its own
            format).
        format: force a reader (``extxyz``, ``asedb``, ``legacy_lmdb``, ``hdf5``).
        **options: passed to the reader (e.g. ``subtract_reference=True`` for extxyz,
            ``selection=`` for ASE databases).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: an empty folder/file, a folder mixing formats, an unknown suffix, or a
            file or folder that cannot be read (permissions, not of the format its name says,
            damaged); the message names the path.
    """
    if isinstance(path, (list, tuple)):
        if not path:
            raise ValueError("an empty list of data paths")
        parts = [open_dataset(p, format=format, **options) for p in path]
        return parts[0] if len(parts) == 1 else ConcatFrames(parts)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data path not found: {path}")
    try:
        return _open_path(path, format, options)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as err:  # noqa: BLE001 - readers fail in many ways on a foreign file
        raise ValueError(f"cannot read data {path}: {_describe(err)}") from None


def _describe(err: BaseException) -> str:
    """One line: what went wrong (an OSError's text and file, else the type and message)."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror + (f" ({err.filename})" if err.filename else "")
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _open_path(path: Path, format: str | None, options: dict) -> FrameDataset:
    if path.is_dir():
        files = []
        for item in sorted(path.iterdir()):
            if item.is_file() and not item.name.endswith("-lock"):
                try:
                    files.append((item, format or detect_format(item)))
                except ValueError:
                    continue
        if not files:
            raise ValueError(f"no data files in folder {path}")
        kinds = {kind for _, kind in files}
        if len(kinds) > 1:
            raise ValueError(f"folder {path} mixes data formats {sorted(kinds)}; "
                             "pass one file or a folder of one kind")
        kind = kinds.pop()
        if kind == "legacy_lmdb":
            return LegacyLMDBDataset(path, **options)
        parts = [_READERS[kind](item, **options) for item, _ in files]
        return parts[0] if len(parts) == 1 else ConcatFrames(parts)
    if path.stat().st_size == 0:
        raise ValueError(f"data file is empty: {path}")
    kind = format or detect_format(path)
    if kind not in _READERS:
        raise ValueError(f"unknown format {kind!r}; choose from {sorted(_READERS)}")
    return _READERS[kind](path, **options)


def convert(in_path, out_path, *, metadata: dict | None = None, **options) -> int:
    """Convert any readable data into HDF5 (``.h5``/``.hdf5``), an ASE database or extxyz+txt.

    Frames are streamed one at a time from the reader into the writer.

    Args:
        in_path: input file or folder (anything :func:`open_dataset` reads).
        out_path: output file; its suffix picks the writer.
        metadata: extra metadata for the HDF5 file.
        **options: reader options (see :func:`open_dataset`).

    Returns:
        The number of frames written.

    Raises:
        ValueError: unreadable input (also a frame that cannot be read, e.g. a pickle the
            restricted unpickler refuses: the message names the file, the frame and what was
            refused), or an output suffix that has no writer. Nothing is left under
            ``out_path`` then.
    """
    kind = detect_format(out_path)
    if kind == "legacy_lmdb":
        raise ValueError(f"cannot write {out_path}: legacy LMDB output is not supported; "
                         "use .h5, .aselmdb, .db, .json or .extxyz")
    dataset = open_dataset(in_path, **options)
    frames = _read_all(dataset, in_path)
    if kind == "hdf5":
        meta = {"source_format": type(dataset).__name__, **(metadata or {})}
        return write_hdf5(frames, out_path, metadata=meta, source=os.fspath(in_path))
    if kind == "asedb":
        return write_ase_db(frames, out_path)
    if kind == "extxyz":
        return write_extxyz_with_sidecar(frames, out_path)
    raise ValueError(f"cannot write {out_path}: no writer for format {kind!r}")


def _read_all(dataset, in_path):
    """The frames of ``dataset`` one by one; a frame that cannot be read becomes a ValueError
    naming its file and index."""
    for index in range(len(dataset)):
        try:
            frame = dataset[index]
        except Exception as err:  # noqa: BLE001 - a damaged or refused record, of any kind
            source, local = frame_source(dataset, index)
            raise ValueError(f"cannot convert {in_path}: frame {local} of {source or in_path} "
                             f"cannot be read: {_describe(err)}") from None
        yield frame
