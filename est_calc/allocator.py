"""Keep glibc from handing freed memory back to the kernel between calls (CPU runs).

PyTorch's CPU tensors come straight from malloc. glibc serves blocks above its mmap threshold
with fresh mmap calls and returns free memory at the top of the heap to the kernel once it
exceeds the trim threshold; either way the next call's temporaries land on pages the kernel
must fault in and zero again (page faults and system time per call: benchmarks/RESULTS.md).

:func:`tune_malloc` raises both thresholds with ``mallopt``, as the PyTorch CPU tuning guide's
advice to preload jemalloc or tcmalloc does by other means. The cost: up to ``trim_threshold``
of freed memory stays with the process instead of returning to the system. It is a
process-wide setting, so it is applied at most once, never over the user's own choice (the
``MALLOC_*`` environment variables or a preloaded allocator), and only where glibc is the
allocator; ``EST_CALC_TUNE_MALLOC=0`` (or ``ESTCalculator(tune_malloc=False)``) turns it off.

Blocks above 32 MiB (glibc's ceiling for the mmap threshold) are still mapped afresh at every
call: at 10,000 atoms and more a step's large temporaries are such blocks, and a third of the
step went into faulting them in (benchmarks/RESULTS.md). ``retain=True`` goes further: no block
is ever mapped on its own (``M_MMAP_MAX`` = 0) and the heap is never trimmed, so after the first
step every later one reuses the same memory (the process keeps its largest step's memory until
it exits, as a caching allocator does). That suits a process that only simulates: ``est md``,
``est relax`` and ``est adsorb`` use it, and so does the LAMMPS plugin; a library call in a
user's process keeps the milder default. ``EST_CALC_TUNE_MALLOC=retain`` asks for it anywhere,
``=moderate`` for the default anywhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "is_tuned", "malloc_env", "mode", "tune_malloc"]

log = logging.getLogger(__name__)

#: Blocks below this many bytes come from the heap (glibc's own dynamic ceiling is 32 MiB).
MMAP_THRESHOLD = 64 << 20
#: Free memory at the top of the heap is returned to the kernel only above this many bytes.
TRIM_THRESHOLD = 256 << 20

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                  "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES")
#: What this process got: None (not asked yet), False, "moderate" or "retain".
_applied: bool | str | None = None


def malloc_env(retain: bool = False) -> dict[str, str]:
    """The environment variables that give a new process the same setting (glibc reads them at
    start-up); the benchmarks hand them to the peer's process so both sides run alike."""
    if retain:  # never trim: the largest value glibc reads
        return {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**63 - 1)}
    return {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
            "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


def is_tuned() -> bool:
    """Whether :func:`tune_malloc` changed the thresholds in this process."""
    return bool(_applied)


def mode() -> str | None:
    """"moderate" or "retain" (module docstring) when :func:`tune_malloc` changed the settings
    of this process, else None."""
    return _applied or None


def _choice() -> str:
    return os.environ.get("EST_CALC_TUNE_MALLOC", "").strip().lower()


def _reason_to_skip() -> str | None:
    if _choice() in ("0", "false", "no", "off"):
        return "EST_CALC_TUNE_MALLOC is off"
    user = [name for name in _USER_SETTINGS if name in os.environ]
    if user:
        return f"the environment sets {', '.join(user)}"
    if any(lib in os.environ.get("LD_PRELOAD", "") for lib in ("jemalloc", "tcmalloc", "mimalloc")):
        return "another allocator is preloaded"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "the C library is not glibc"
    return None


def tune_malloc(retain: bool = False) -> bool:
    """Raise glibc's mmap and trim thresholds for this process, or with ``retain`` keep every
    freed block for reuse (module docstring); True if the settings are made.

    ``EST_CALC_TUNE_MALLOC=retain`` / ``=moderate`` override ``retain``. Returns False, changing
    nothing, when the user chose otherwise or glibc is not the allocator. Applied once per
    process; a later call may still turn the moderate setting into ``retain``.
    """
    global _applied
    choice = _choice()
    want = "retain" if choice == "retain" or (retain and choice != "moderate") else "moderate"
    if _applied is not None and not (_applied == "moderate" and want == "retain"):
        return bool(_applied)
    reason = _reason_to_skip()
    if reason is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            if want == "retain":  # -1: never trim (mallopt(3))
                ok = (libc.mallopt(_M_MMAP_MAX, 0) == 1
                      and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1)
            else:
                ok = (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                      and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
            reason = None if ok else "mallopt refused the values"
        except (OSError, AttributeError) as err:
            reason = f"mallopt is unavailable ({err})"
    if reason is None:
        _applied = want
        log.info("est_calc: glibc malloc %s (EST_CALC_TUNE_MALLOC=0 turns this off)",
                 "keeps freed memory for reuse" if want == "retain" else
                 f"mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold "
                 f"{TRIM_THRESHOLD >> 20} MiB")
    elif _applied is None:
        _applied = False
        log.debug("est_calc: malloc thresholds left as they are: %s", reason)
    return bool(_applied)
