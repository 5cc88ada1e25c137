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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "is_tuned", "malloc_env", "tune_malloc"]

log = logging.getLogger(__name__)

#: Blocks below this many bytes come from the heap (glibc's own dynamic ceiling is 32 MiB).
MMAP_THRESHOLD = 64 << 20
#: Free memory at the top of the heap is returned to the kernel only above this many bytes.
TRIM_THRESHOLD = 256 << 20

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                  "GLIBC_TUNABLES")
_applied: bool | None = None


def malloc_env() -> dict[str, str]:
    """The environment variables that give a new process the same setting (glibc reads them at
    start-up); the benchmarks hand them to the peer's process so both sides run alike."""
    return {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
            "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


def is_tuned() -> bool:
    """Whether :func:`tune_malloc` changed the thresholds in this process."""
    return bool(_applied)


def _reason_to_skip() -> str | None:
    if os.environ.get("EST_CALC_TUNE_MALLOC", "1").strip().lower() in ("0", "false", "no", "off"):
        return "EST_CALC_TUNE_MALLOC is off"
    user = [name for name in _USER_SETTINGS if name in os.environ]
    if user:
        return f"the environment sets {', '.join(user)}"
    if any(lib in os.environ.get("LD_PRELOAD", "") for lib in ("jemalloc", "tcmalloc", "mimalloc")):
        return "another allocator is preloaded"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "the C library is not glibc"
    return None


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); True if they are set.

    Returns False, changing nothing, when the user chose otherwise or glibc is not the
    allocator (see the module docstring); later calls return the first call's answer.
    """
    global _applied
    if _applied is not None:
        return _applied
    reason = _reason_to_skip()
    if reason is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                  and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
            reason = None if ok else "mallopt refused the values"
        except (OSError, AttributeError) as err:
            reason = f"mallopt is unavailable ({err})"
    _applied = reason is None
    if _applied:
        log.info("est_calc: glibc mmap threshold %d MiB, trim threshold %d MiB (EST_CALC_TUNE_MALLOC=0 "
                 "turns this off)", MMAP_THRESHOLD >> 20, TRIM_THRESHOLD >> 20)
    else:
        log.debug("est_calc: malloc thresholds left as they are: %s", reason)
    return _applied
