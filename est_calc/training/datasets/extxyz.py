"""OC20 S2EF extxyz shards (``N.extxyz[.xz]``) with their ``N.txt[.xz]`` sidecars.

Sidecar line *i* describes frame *i*: ``random<sid>,frame<fid>,<reference_energy>``. Frame offsets
are indexed once by scanning lines, so random access parses only the requested frame; ``.xz``
shards are decompressed into memory, a few at a time (``XZ_CACHE_SHARDS``). Forces are the raw stored values (fixed atoms keep
theirs); ``move_mask`` F (fixed) becomes ``Frame.fixed``.
"""

from __future__ import annotations

import io
import lzma
import os
from collections import OrderedDict
from pathlib import Path

from ._frame import Frame, FrameDataset, frame_from_atoms

__all__ = ["ExtxyzDataset", "read_sidecar", "find_sidecar", "write_extxyz_with_sidecar"]

_SUFFIXES = (".extxyz.xz", ".xyz.xz", ".extxyz", ".xyz")

#: decompressed ``.xz`` shards kept in memory per process (a 5000-frame OC20 shard is ~40 MB):
#: reading a folder in order decompresses each shard twice (index, then frames); random access
#: across many shards is slow, so convert large splits to HDF5 before training.
XZ_CACHE_SHARDS = 2
_XZ_CACHE: OrderedDict[tuple, bytes] = OrderedDict()


def _open_text(path: Path, mode: str, compressed: bool | None = None):
    if compressed is None:
        compressed = path.name.endswith(".xz")
    if compressed:
        return lzma.open(path, mode + "t", encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def _stem(path: Path) -> str:
    for suffix in _SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def find_sidecar(path: str | os.PathLike) -> Path | None:
    """Return the ``.txt`` / ``.txt.xz`` sidecar beside an extxyz shard, or None if absent."""
    path = Path(path)
    for name in (_stem(path) + ".txt", _stem(path) + ".txt.xz"):
        if (path.parent / name).is_file():
            return path.parent / name
    return None


def _parse_id(text: str, prefix: str):
    text = text.strip()
    if text.startswith(prefix):
        text = text[len(prefix):]
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        return text


def read_sidecar(path: str | os.PathLike) -> list[tuple]:
    """Read an S2EF sidecar into ``[(sid, fid, reference_energy), ...]``.

    Raises:
        ValueError: a line that does not have three comma-separated fields (names the line).
    """
    path = Path(path)
    rows = []
    with _open_text(path, "r") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            parts = line.strip().split(",")
            if len(parts) != 3:
                raise ValueError(f"{path}:{lineno}: expected 'random<sid>,frame<fid>,<ref>', "
                                 f"got {line.strip()!r}")
            ref = parts[2].strip()
            rows.append((_parse_id(parts[0], "random"), _parse_id(parts[1], "frame"),
                         None if ref in ("", "nan", "None") else float(ref)))
    return rows


class ExtxyzDataset(FrameDataset):
    """Random-access reader of one extxyz (or extxyz.xz) file, with an optional S2EF sidecar.

    Args:
        path: the ``.extxyz``/``.xyz`` file, optionally ``.xz``-compressed.
        sidecar: path of the sidecar, ``None`` to look for ``<stem>.txt[.xz]`` beside the file,
            or ``False`` to ignore it.
        subtract_reference: subtract each frame's sidecar ``reference_energy`` from its energy.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: empty file, malformed frame header, or sidecar/frame count mismatch.
    """

    def __init__(self, path, *, sidecar=None, subtract_reference: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"extxyz file not found: {self.path}")
        self.subtract_reference = subtract_reference
        self._compressed = self.path.name.endswith(".xz")
        if self._compressed:
            self._offsets = self._scan(io.BytesIO(self._decompressed()))
        else:
            with open(self.path, "rb") as handle:
                self._offsets = self._scan(handle)
        if not self._offsets:
            raise ValueError(f"no frames in extxyz file {self.path}")
        side = find_sidecar(self.path) if sidecar is None else (sidecar or None)
        self.sidecar_path = None if side is None else Path(side)
        self._ids = None
        if self.sidecar_path is not None:
            self._ids = read_sidecar(self.sidecar_path)
            if len(self._ids) != len(self):
                raise ValueError(f"sidecar {self.sidecar_path} has {len(self._ids)} lines but "
                                 f"{self.path} has {len(self)} frames; line i must describe "
                                 "frame i")
        if subtract_reference and self._ids is None:
            raise ValueError(f"subtract_reference=True needs a sidecar for {self.path}")

    def _decompressed(self) -> bytes:
        """The decompressed shard, from a small cache shared by all readers in the process."""
        stat = self.path.stat()
        key = (str(self.path.resolve()), stat.st_mtime_ns, stat.st_size)
        if key in _XZ_CACHE:
            _XZ_CACHE.move_to_end(key)
        else:
            with lzma.open(self.path, "rb") as handle:
                _XZ_CACHE[key] = handle.read()
            while len(_XZ_CACHE) > XZ_CACHE_SHARDS:
                _XZ_CACHE.popitem(last=False)
        return _XZ_CACHE[key]

    def _scan(self, handle) -> list[tuple[int, int]]:
        """Return ``[(byte offset, byte length)]`` of every frame."""
        offsets = []
        pos = handle.tell()
        while True:
            line = handle.readline()
            if not line:
                break
            if not line.strip():
                pos = handle.tell()
                continue
            try:
                n_atoms = int(line.split()[0])
            except ValueError:
                raise ValueError(f"{self.path}: bad atom-count line {line[:60]!r} at byte {pos}")
            for _ in range(n_atoms + 1):
                if not handle.readline():
                    raise ValueError(f"{self.path}: truncated frame starting at byte {pos}")
            end = handle.tell()
            offsets.append((pos, end - pos))
            pos = end
        return offsets

    def __len__(self) -> int:
        return len(self._offsets)

    def _text(self, index: int) -> str:
        start, length = self._offsets[index]
        if self._compressed:
            return self._decompressed()[start:start + length].decode("utf-8")
        with open(self.path, "rb") as handle:
            handle.seek(start)
            return handle.read(length).decode("utf-8")

    def _get(self, index: int) -> Frame:
        from ase.io.extxyz import read_xyz

        atoms = next(read_xyz(io.StringIO(self._text(index)), 0))
        sid = fid = ref = None
        if self._ids is not None:
            sid, fid, ref = self._ids[index]
        frame = frame_from_atoms(atoms, sid=sid, fid=fid, reference_energy=ref)
        if self.subtract_reference:
            if frame.energy is None or frame.reference_energy is None:
                raise ValueError(f"{self.path} frame {index}: cannot subtract the reference "
                                 "energy, energy or reference_energy is missing")
            from dataclasses import replace

            frame = replace(frame, energy=frame.energy - frame.reference_energy,
                            extra={**frame.extra, "total_energy": frame.energy})
        return frame


def _fmt_id(value) -> str:
    return "" if value is None else str(value)


def write_extxyz_with_sidecar(frames, path, *, sidecar: bool = True) -> int:
    """Write frames as an S2EF extxyz shard plus its ``.txt`` sidecar (``.xz`` if path ends so).

    Raw forces (fixed atoms included), tags, ``move_mask`` (from ``fixed``), stress, sid and fid
    go into the extxyz; ``random<sid>,frame<fid>,<reference_energy>`` lines into the sidecar
    (empty fields where unknown). Both files are written to temporaries and then renamed.

    Args:
        frames: iterable of :class:`Frame`.
        path: output ``.extxyz`` or ``.extxyz.xz``.
        sidecar: also write ``<stem>.txt`` (``.txt.xz`` for a compressed shard).

    Returns:
        The number of frames written.
    """
    from ase.io.extxyz import write_xyz

    path = Path(path)
    compressed = path.name.endswith(".xz")
    side = path.parent / (_stem(path) + (".txt.xz" if compressed else ".txt"))
    tmp_xyz = path.with_name(path.name + ".tmp")
    tmp_side = side.with_name(side.name + ".tmp")
    count = 0
    try:
        with _open_text(tmp_xyz, "w", compressed) as out_xyz, \
                _open_text(tmp_side if sidecar else Path(os.devnull), "w",
                           compressed and sidecar) as out_side:
            for frame in frames:
                atoms = frame.to_atoms()
                atoms.info.pop("reference_energy", None)
                write_xyz(out_xyz, [atoms])
                ref = frame.reference_energy
                out_side.write(f"random{_fmt_id(frame.sid)},frame{_fmt_id(frame.fid)},"
                               f"{'' if ref is None else repr(float(ref))}\n")
                count += 1
        os.replace(tmp_xyz, path)
        if sidecar:
            os.replace(tmp_side, side)
    finally:
        for tmp in (tmp_xyz, tmp_side):
            if tmp.exists():
                tmp.unlink()
    return count
