"""Atomic file writes: a temporary file in the target folder, fsync, then ``os.replace``.

A crash, a full disk or an exception while writing never leaves a partial file under the target
name, and an existing file stays intact until the new one is complete. An exception (also
KeyboardInterrupt) removes the temporary file; only a process killed outright leaves one, named
``.<name>.<random>.tmp`` beside the target (see :func:`temp_files_of`).

The file gets the mode any newly created file gets, ``0o666 & ~umask`` (``tempfile.mkstemp``
alone would leave it at 0o600, readable by its owner only).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_torch_save", "atomic_write_text", "temp_files_of", "new_file_mode"]


def _umask() -> int:
    """The process umask, read without changing it where the system shows it."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)  # no other way to read it: set and restore at once
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The permission bits ``open(path, "w")`` would give a new file: ``0o666 & ~umask``."""
    return 0o666 & ~_umask()


def temp_files_of(path: str | os.PathLike) -> list[Path]:
    """The temporary files :func:`atomic_torch_save` may have left beside ``path`` (a writer
    killed outright, e.g. by SIGKILL, cannot remove its own)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.glob(f".{path.name}.*.tmp") if p.is_file())


def atomic_torch_save(payload: Any, path: str | os.PathLike) -> Path:
    """``torch.save(payload)`` to ``path`` atomically; returns the path.

    The file gets mode ``0o666 & ~umask``; on any exception the temporary file is removed and
    an existing file under ``path`` is left as it was.
    """
    return _atomic_write(path, lambda fh: torch.save(payload, fh))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """``text`` (UTF-8) to ``path`` atomically, as :func:`atomic_torch_save`; returns the path."""
    data = text.encode("utf-8")
    return _atomic_write(path, lambda fh: fh.write(data))


def _atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(binary file)`` on a temporary file beside ``path``, fsync, set the mode and
    rename it to ``path``; on any exception remove the temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
            if hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), new_file_mode())
        if not hasattr(os, "fchmod"):
            os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
