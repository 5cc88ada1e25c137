"""Neighbour lists on CPU and GPU, pair-for-pair identical to ``ase.neighborlist.neighbor_list``.

``neighbor_list(positions, cell, pbc, cutoff_A)`` returns ``(edge_index, shifts)`` with
``r_ij = positions[j] - positions[i] + shifts @ cell[system of i]`` for every pair with
``|r_ij| < cutoff_A`` (strict, as ASE), both directions, and the atom itself only through a
non-zero periodic image. Shifts along non-periodic axes are zero. ``build_graph(...,
paired=True)`` returns them in reversed-pair order (:mod:`.pairing`), which the SO(2) message
blocks use to rotate half of the edges.

Backends (picked with the ``backend`` argument only):

- ``"torch"``: pure-PyTorch cell list (:mod:`._torch_cells`), O(N), CPU and CUDA, many systems
  in one vectorised call. Always available.
- ``"vesin"``: vesin-torch 0.6.2, CPU and CUDA, one call per system (torch < 2.15).
- ``"matscipy"``: matscipy, CPU only, one call per system.
- ``"torch_cluster"``: ``radius_graph`` for non-periodic systems (``pip install est_calc[cluster]``).
- ``"auto"``: ``"torch"`` for many systems at once (one vectorised call instead of one call
  per system); for a single system ``"vesin"`` when it imports, on CUDA always and on the CPU
  up to :data:`VESIN_CPU_MAX_ATOMS` atoms (where it is the faster one), else ``"torch"``
  (the timings behind this choice: benchmarks/RESULTS.md, "Neighbour lists").

Every backend refuses, before it runs, a periodic cell so thin or so dense for the cutoff that the
number of periodic images or of pairs would explode (:func:`cell_problem`: more than
:data:`MAX_PERIODIC_IMAGES` images of an atom or :data:`MAX_NEIGHBORS_PER_ATOM` expected
neighbours per atom, bounds no physical structure reaches); the ValueError names the system, its
smallest perpendicular height and the cutoff.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._adapters import (
    matscipy_neighbor_list,
    torch_cluster_neighbor_list,
    vesin_available,
    vesin_neighbor_list,
)
from ._common import (
    MAX_NEIGHBORS_PER_ATOM,
    MAX_PERIODIC_IMAGES,
    cell_problem,
    degenerate_cells,
    prepare,
)
from ._torch_cells import torch_neighbor_list

__all__ = ["Graph", "build_graph", "neighbor_list", "BACKENDS", "PAIR_MIN_EDGES", "VESIN_CPU_MAX_ATOMS",
           "resolve_backend", "cell_problem", "degenerate_cells", "MAX_PERIODIC_IMAGES",
           "MAX_NEIGHBORS_PER_ATOM"]

BACKENDS = ("auto", "torch", "vesin", "matscipy", "torch_cluster")

_IMPLS = {
    "torch": torch_neighbor_list,
    "vesin": vesin_neighbor_list,
    "matscipy": matscipy_neighbor_list,
    "torch_cluster": torch_cluster_neighbor_list,
}


@dataclass(frozen=True)
class Graph:
    """Edges of a batch of structures.

    Attributes:
        edge_index: (2, E) int64; row 0 is the centre i, row 1 the neighbour j.
        shifts: (E, 3) int64 lattice shifts; r_ij = pos[j] - pos[i] + shifts @ cell[system of i].
        paired: the second half of the edges is the reverse of the first, edge for edge
            (:func:`est_calc.neighbors.pairing.pair_edges`); models may then evaluate per-pair
            quantities once. The model checks the order before relying on it.
    """

    edge_index: Tensor
    shifts: Tensor
    paired: bool = False

    def __post_init__(self):
        if self.edge_index.ndim != 2 or self.edge_index.shape[0] != 2:
            raise ValueError(f"edge_index must be (2, E), got {tuple(self.edge_index.shape)}")
        if self.shifts.shape != (self.edge_index.shape[1], 3):
            raise ValueError(
                f"shifts must be ({self.edge_index.shape[1]}, 3), got {tuple(self.shifts.shape)}"
            )

    @property
    def n_edges(self) -> int:
        return int(self.edge_index.shape[1])

    def to(self, device) -> "Graph":
        """The same graph on ``device``."""
        return Graph(self.edge_index.to(device), self.shifts.to(device), self.paired)


#: Fewest edges for which ``build_graph(..., paired=True)`` sorts a list into reversed pairs: below
#: it the sort costs about what the paired SO(2) blocks save (benchmarks/RESULTS.md).
PAIR_MIN_EDGES = 2048

#: Largest single system for which ``"auto"`` picks vesin on the CPU (see the module docstring).
VESIN_CPU_MAX_ATOMS = 4000


def resolve_backend(backend: str, device: torch.device | str = "cpu", n_systems: int = 1,
                    n_atoms: int | None = None) -> str:
    """The concrete backend ``backend`` stands for on ``device`` for ``n_systems`` structures
    of ``n_atoms`` atoms in all (None: unknown, treated as large).

    Raises:
        ValueError: an unknown backend name.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown neighbour-list backend {backend!r}; choose one of {BACKENDS}")
    if backend != "auto":
        return backend
    if n_systems != 1 or not vesin_available():
        return "torch"
    if torch.device(device).type == "cuda":
        return "vesin"
    return "vesin" if n_atoms is not None and n_atoms <= VESIN_CPU_MAX_ATOMS else "torch"


def neighbor_list(positions, cell, pbc, cutoff_A, *, system_idx=None, backend="auto"):
    """All pairs closer than ``cutoff_A``, with their periodic lattice shifts.

    Args:
        positions: (n_atoms, 3) float tensor, Å (float32 or float64; the search runs in float64).
        cell: (3, 3) or (n_systems, 3, 3) lattice vectors as rows, Å. A non-periodic axis may
            have a zero vector.
        pbc: (3,) or (n_systems, 3) booleans.
        cutoff_A: cutoff radius in Å; pairs with distance strictly below it are returned.
        system_idx: (n_atoms,) int system index of each atom; required with several systems.
        backend: ``"auto"``, ``"torch"``, ``"vesin"``, ``"matscipy"`` or ``"torch_cluster"``.

    Returns:
        edge_index (2, E) int64 with rows (i, j) and shifts (E, 3) int64, on the device of
        ``positions``; ``r_ij = positions[j] - positions[i] + shifts @ cell[system of i]``.
        The pair order is backend dependent.

    Raises:
        ValueError: bad shapes, NaN / infinite positions or cell, a negative cutoff, a zero
            volume in the periodic directions, a cell too thin or too dense for the cutoff
            (:func:`cell_problem`), or an unknown backend.
        ImportError: an optional backend that is not installed (the message says what to
            install).
    """
    n_systems = cell.shape[0] if getattr(cell, "ndim", 2) == 3 else 1
    name = resolve_backend(backend, getattr(positions, "device", "cpu"), n_systems,
                           n_atoms=int(positions.shape[0]))
    prep = prepare(positions, cell, pbc, cutoff_A, system_idx)
    return _IMPLS[name](prep)


def build_graph(batch, cutoff_A: float, *, backend: str = "auto", paired: bool = False,
                pair_min_edges: int | None = None) -> Graph:
    """Neighbour graph of an :class:`est_calc.batch.AtomsBatch`.

    Args:
        batch: the batch (positions (n, 3), cell (b, 3, 3), pbc (b, 3), system_idx (n,)).
        cutoff_A: cutoff radius in Å.
        backend: see :func:`neighbor_list`.
        paired: order the edges in reversed pairs (``Graph.paired``) when possible: always
            when the backend's list already is (the torch cell list mirrors a half list),
            otherwise by a sort when there are at least ``pair_min_edges`` edges (None:
            :data:`PAIR_MIN_EDGES`, below which the sort costs about what the pairing saves the
            SO(2) blocks; 0 pairs every symmetric list, as a graph traced for paired lists
            needs).

    Returns:
        The :class:`Graph` on the batch's device.
    """
    edge_index, shifts = neighbor_list(
        batch.positions, batch.cell, batch.pbc, cutoff_A,
        system_idx=batch.system_idx, backend=backend,
    )
    if paired:
        from est_calc.neighbors.pairing import is_paired, pair_edges

        if is_paired(edge_index, shifts):  # the torch cell list builds half and mirrors it
            return Graph(edge_index, shifts, paired=True)
        if edge_index.shape[1] >= (PAIR_MIN_EDGES if pair_min_edges is None else pair_min_edges):
            ordered = pair_edges(edge_index, shifts, batch.n_atoms)
            if ordered is not None:
                return Graph(*ordered, paired=True)
    return Graph(edge_index, shifts)
