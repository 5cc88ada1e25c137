"""ASE databases as frame datasets: sqlite (``.db``), json (``.json``) and ASE-LMDB (``.aselmdb``).

``row.data`` is carried over: ``sid``, ``fid`` and ``reference_energy`` become Frame fields, any
other entry goes to ``Frame.extra``. ASE-LMDB files are opened the way fairchem's AseDBDataset
does, ``ase.db.connect(path, readonly=True, use_lock_file=False)`` (ase-db-backends).
"""

from __future__ import annotations

import os
from pathlib import Path

from ._frame import Frame, FrameDataset, frame_from_atoms, plain_value

__all__ = ["AseDBDataset", "write_ase_db"]

_ID_KEYS = ("sid", "fid", "reference_energy")


def _is_aselmdb(path: Path) -> bool:
    return path.name.endswith(".aselmdb")


# LMDB allows one environment per file and process, so every reader of the same database file
# (train and validation sets, a pickled copy) shares one connection.
_CONNECTIONS: dict[tuple, object] = {}


def _probe_lmdb(path: Path) -> None:
    """Refuse a file that is not an LMDB environment before ASE-LMDB opens it (a failed
    ASE-LMDB connection fails once more, noisily, when it is garbage-collected)."""
    import lmdb

    try:
        lmdb.open(str(path), subdir=False, readonly=True, lock=False, readahead=False,
                  meminit=False).close()
    except lmdb.Error as err:
        raise ValueError(f"{path} is not a readable ASE-LMDB file: {err}") from None


def _connect_readonly(path: Path):
    import ase.db

    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_ino, stat.st_mtime_ns, os.getpid())
    if key not in _CONNECTIONS:
        if _is_aselmdb(path):
            _probe_lmdb(path)
            db = ase.db.connect(str(path), readonly=True, use_lock_file=False)
        else:
            db = ase.db.connect(str(path), use_lock_file=False)
        _CONNECTIONS[key] = db
    return _CONNECTIONS[key]


class AseDBDataset(FrameDataset):
    """Random-access frames from one ASE database.

    Args:
        path: ``.db`` (sqlite), ``.json`` or ``.aselmdb`` file.
        selection: optional ASE selection string (e.g. ``"natoms<100"``), applied once when
            the row ids are indexed.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the database holds no rows.
    """

    def __init__(self, path, *, selection=None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ASE database not found: {self.path}")
        self.selection = selection
        self._db = None
        self._pid = None
        db = self._database()
        if _is_aselmdb(self.path) and selection is None:
            self._ids = list(db.ids)
        else:
            self._ids = [row.id for row in db.select(selection, include_data=False)]
        if not self._ids:
            raise ValueError(f"ASE database {self.path} holds no rows"
                             + (f" matching {selection!r}" if selection else ""))

    def __getstate__(self):
        # database connections are not picklable (spawned DataLoader workers): re-open lazily
        return {**self.__dict__, "_db": None, "_pid": None}

    def _database(self):
        if self._db is None or self._pid != os.getpid():
            self._db = _connect_readonly(self.path)
            self._pid = os.getpid()
        return self._db

    def __len__(self) -> int:
        return len(self._ids)

    def _get(self, index: int) -> Frame:
        db = self._database()
        row = db._get_row(self._ids[index]) if _is_aselmdb(self.path) else \
            db.get(id=self._ids[index])
        atoms = row.toatoms()
        data = dict(row.get("data", {}) or {})
        ids = {k: data.pop(k, None) for k in _ID_KEYS}
        kvp = dict(row.get("key_value_pairs", {}) or {})
        for key in _ID_KEYS:
            if ids[key] is None and key in kvp:
                ids[key] = kvp.pop(key)
        extra = {**kvp, **data}
        return frame_from_atoms(atoms, sid=ids["sid"], fid=ids["fid"],
                                reference_energy=ids["reference_energy"], extra=extra)


def write_ase_db(frames, path, *, overwrite: bool = True) -> int:
    """Write frames to an ASE database (type from the suffix: ``.db``, ``.json``, ``.aselmdb``).

    Energy, raw forces and stress go into the row's calculator fields; FixAtoms and tags into the
    structure; ``sid``, ``fid``, ``reference_energy`` and ``Frame.extra`` into ``row.data``.
    The database is built under a temporary name and renamed into place.

    Args:
        frames: iterable of :class:`Frame`.
        path: output database path.
        overwrite: replace an existing file (otherwise raise FileExistsError).

    Returns:
        The number of frames written.
    """
    import ase.db

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    suffix = ".aselmdb" if _is_aselmdb(path) else path.suffix
    tmp = path.with_name(path.name + ".tmp" + suffix)
    for stale in (tmp, Path(str(tmp) + "-lock")):
        if stale.exists():
            stale.unlink()
    count = 0
    try:
        db = ase.db.connect(str(tmp), use_lock_file=False, append=True)
        with db:
            for frame in frames:
                data = {k: plain_value(getattr(frame, k)) for k in _ID_KEYS
                        if getattr(frame, k) is not None}
                data.update({k: plain_value(v) for k, v in frame.extra.items()})
                db.write(frame.to_atoms(), data=data)
                count += 1
        os.replace(tmp, path)
    finally:
        for stale in (tmp, Path(str(tmp) + "-lock")):
            if stale.exists():
                stale.unlink()
    return count
