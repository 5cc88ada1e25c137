"""Intra-op threads of a model call, chosen so that a busy machine slows a call ~2x, not ~50x.

A call of a small system is a few thousand small operations, each an OpenMP parallel region
whose threads meet at a barrier. When another process holds one of the cores, the thread that
runs there is descheduled for a scheduler slice and every other thread of the region waits for
it, spinning (libgomp's default: about 300,000 spins, a few milliseconds, before it sleeps) on a
core the other process could have used, so a small call beside another process can take many
times its idle time (issue 23; measurements in benchmarks/RESULTS.md, "Threads on a busy
machine"). Two remedies, both applied here:

* **A short spin.** ``import est_calc`` sets ``GOMP_SPINCOUNT=1000`` (about ten microseconds of
  spinning, then a futex sleep) when neither ``GOMP_SPINCOUNT`` nor ``OMP_WAIT_POLICY`` is set
  and torch is not imported yet (OpenMP reads its settings once, when torch loads). Threads that
  both run meet within that window, so an idle machine keeps most of the gain of a second thread;
  a thread whose partner was descheduled gives its core back almost at once. A fully passive
  policy (no spin) protects as well but makes every region pay a wake-up, which cancels the
  second thread's gain on all but the largest calls.
* **One thread below the size where threads pay off.** Below :data:`PARALLEL_MIN_EDGES` edges a
  call runs on one thread (the regions are too small to share). Larger calls use the CPUs this
  process may run on (``os.sched_getaffinity``), capped by torch's own default.

The user's choice always wins: ``ESTCalculator(threads=N)`` runs every call on N threads;
``OMP_NUM_THREADS`` (or ``MKL_NUM_THREADS``) in the environment leaves torch's count alone; and
a call never uses more threads than ``torch.get_num_threads()`` at that moment, so a
``torch.set_num_threads(k)`` of the user's caps it at k. ``OMP_WAIT_POLICY`` or
``GOMP_SPINCOUNT`` set by the user is never changed (``OMP_WAIT_POLICY=ACTIVE`` spins long: the
fastest on a machine nobody else uses). The count is set for the duration of one call and
restored afterwards.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

__all__ = ["PARALLEL_MIN_EDGES", "available_cpus", "choose_threads", "intra_op_threads",
           "set_short_spin", "user_chose_threads"]

#: Calls with fewer edges than this run on one thread (the measured crossover with the short spin;
#: benchmarks/RESULTS.md).
PARALLEL_MIN_EDGES = 1_500

#: libgomp spins before a waiting thread sleeps, as set by :func:`set_short_spin`.
SHORT_SPIN_COUNT = "1000"

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def set_short_spin() -> bool:
    """Set ``GOMP_SPINCOUNT`` to :data:`SHORT_SPIN_COUNT` if the user set neither it nor
    ``OMP_WAIT_POLICY`` and torch is not loaded yet (afterwards OpenMP has read its settings).
    Returns whether it was set."""
    if ("OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ
            or "torch" in sys.modules):
        return False
    os.environ["GOMP_SPINCOUNT"] = SHORT_SPIN_COUNT
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
