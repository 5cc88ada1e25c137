"""Exported packages kept between runs: ``ESTCalculator(model, compile="package")``.

A package (``est export``) runs the potential as one compiled graph. For a small molecule that is
the faster calculator (the eager model dispatches thousands of small operations per step; the
measured speeds are in benchmarks/RESULTS.md), but compiling takes about a minute. This module
compiles once and keeps the file::

    calc = ESTCalculator("est-3bpa", compile="package")   # first time: exports, ~1 min
    calc = ESTCalculator("est-3bpa", compile="package")   # later: loads the cached file

The cache key names everything the compiled file depends on: the potential file's SHA-256, the
dtype and device, the torch version (a package runs only under the torch that compiled it) and
a hash of est_calc's own sources (what is traced, and how it is compiled), so a stale package is
never reused. The folder is ``$EST_CALC_CACHE/packages`` or ``$XDG_CACHE_HOME/est_calc/packages``
(default ``~/.cache/est_calc/packages``). A file is written completely or not at all
(:func:`est_calc.deploy.export_potential`), so concurrent first runs at worst both compile.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from functools import lru_cache
from pathlib import Path

__all__ = ["cache_dir", "cached_package", "package_key", "source_digest"]


def cache_dir() -> Path:
    """Where cached packages live (module docstring)."""
    root = os.environ.get("EST_CALC_CACHE")
    if root:
        return Path(root).expanduser() / "packages"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "est_calc" / "packages"


@lru_cache(maxsize=1)
def source_digest() -> str:
    """Hash (12 hex digits) of est_calc's Python sources, paths and contents."""
    import est_calc

    h = hashlib.sha256()
    root = Path(est_calc.__file__).parent
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def package_key(potential_file: Path, dtype: str, device: str, openmp: bool = False) -> str:
    """File name of the package of ``potential_file`` in ``dtype`` on ``device`` (a device
    type: "cpu" or "cuda"), with serial or OpenMP kernels."""
    import torch

    from est_calc.uncertainty import file_sha256

    torch_tag = re.sub(r"[^A-Za-z0-9.]+", "_", torch.__version__)
    kernels = "openmp" if openmp else "serial"
    return (f"{potential_file.stem}-{file_sha256(potential_file)[:16]}-{dtype}-{device}-"
            f"{kernels}-torch{torch_tag}-est{source_digest()}.pt2")


def cached_package(potential, dtype: str = "float32", device: str = "cpu",
                   cache: str | os.PathLike | None = None, quiet: bool = False,
                   openmp: bool = False) -> Path:
    """The package of ``potential`` for ``dtype`` and ``device``, exported into the cache first
    if it is not there (about a minute on a CPU; a line on stderr says so).

    Args:
        potential: a registry name ("est-3bpa", "default") or a ``.pt`` path. A Potential
            object has no file to key the cache by: export it with ``export_potential``.
        dtype: "float32" or "float64".
        device: "cpu" or "cuda" (or a torch device whose type is one of them).
        cache: the folder (default :func:`cache_dir`).
        quiet: no line on stderr when exporting.
        openmp: OpenMP kernels instead of serial ones (``export_potential``'s ``openmp``).

    Raises:
        TypeError: ``potential`` is not a name or a path.
        FileNotFoundError, ValueError, ExportError: as :func:`est_calc.deploy.export_potential`.
    """
    import torch

    from est_calc.deploy.export import export_potential
    from est_calc.deploy.package import read_metadata
    from est_calc.potential import _resolve

    if not isinstance(potential, (str, os.PathLike)):
        raise TypeError(f"compile='package' needs a registry name or a .pt file to key the "
                        f"package cache by, got a {type(potential).__name__}; export it with "
                        f"est_calc.deploy.export_potential(potential, 'model.pt2') and pass "
                        f"model='model.pt2'")
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    device = torch.device(device).type
    source = _resolve(potential)
    folder = Path(cache).expanduser() if cache is not None else cache_dir()
    path = folder / package_key(source, dtype, device, openmp)
    if path.is_file():
        try:
            read_metadata(path)
            return path
        except ValueError as err:  # a damaged or foreign file under our name: make it again
            if not quiet:
                print(f"est_calc: cached package unusable ({err}); exporting again",
                      file=sys.stderr)
    folder.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"est_calc: compiling {potential} ({dtype}, {device}) into the package cache "
              f"{path} (once; about a minute on a CPU)", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    export_potential(str(source), path, dtype=dtype, device=device, overwrite=True,
                     source=str(potential), openmp=openmp)
    if not quiet:
        print(f"est_calc: compiled in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path
