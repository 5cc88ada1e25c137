"""Intra-op threads of a model call, chosen so that a busy machine slows a call gracefully.

A call of a small system is a few thousand small operations, each an OpenMP parallel region
whose threads meet at a barrier. When another process holds one of the cores, the thread that
runs there is descheduled for a scheduler slice and every other thread of the region waits for
it, spinning (libgomp's default) on a core the other process could have used, so a small
call beside another process can take many times its idle time (issue 23; the measurements are
in benchmarks/RESULTS.md, "Threads on a busy machine"). Two remedies, both applied here:

* **One thread below the size where threads pay off.** Below :data:`PARALLEL_MIN_EDGES` edges a
  call runs on one thread: the regions are too small to share, so it loses little idle and
  waits on no other thread beside another process. Larger calls use the CPUs this process may
  run on (``os.sched_getaffinity``), capped by torch's own default.
* **A passive wait policy.** ``import est_calc`` sets ``OMP_WAIT_POLICY=PASSIVE`` when the
  variable is unset and torch is not imported yet (OpenMP reads it once, when torch loads), so
  waiting threads sleep instead of spinning.

The user's choice always wins: ``ESTCalculator(threads=N)`` runs every call on N threads;
``OMP_NUM_THREADS`` (or ``MKL_NUM_THREADS``) in the environment leaves torch's count alone; and
a call never uses more threads than ``torch.get_num_threads()`` at that moment, so a
``torch.set_num_threads(k)`` of the user's caps it at k. ``OMP_WAIT_POLICY`` set by the user is
never changed. The count is set for the duration of one call and restored afterwards.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

__all__ = ["PARALLEL_MIN_EDGES", "available_cpus", "choose_threads", "intra_op_threads",
           "set_passive_wait_policy", "user_chose_threads"]

#: Calls with fewer edges than this run on one thread (a measured crossover; benchmarks/RESULTS.md).
PARALLEL_MIN_EDGES = 20_000

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def set_passive_wait_policy() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` if the user did not set it and torch is not loaded yet
    (afterwards OpenMP has read its settings). Returns whether it was set."""
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def user_chose_threads() -> bool:
    """True when ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` is set (torch's count is then the
    user's and is left alone)."""
    return any(os.environ.get(name) for name in _THREAD_VARIABLES)


def choose_threads(n_edges: int, requested: int | None = None) -> int | None:
    """Intra-op threads for a call with ``n_edges`` edges; None: leave torch's setting.

    Args:
        n_edges: edges of the graph (the work of a call grows with them).
        requested: the caller's explicit count (``ESTCalculator(threads=...)``), which wins.
    """
    import torch

    if requested is not None:
        return int(requested)
    if user_chose_threads():
        return None
    if n_edges < PARALLEL_MIN_EDGES:
        return 1
    return max(1, min(available_cpus(), torch.get_num_threads()))


@contextmanager
def intra_op_threads(n: int | None):
    """Run the body with ``torch.set_num_threads(n)`` and restore the previous count after;
    ``n=None`` changes nothing."""
    import torch

    previous = torch.get_num_threads()
    if n is None or n == previous:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
