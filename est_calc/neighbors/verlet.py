"""A Verlet (skin) neighbour list: build once with ``cutoff + skin``, filter every step.

Between rebuilds the list holds every pair within ``cutoff + skin`` of the positions it was built
for. While no atom has moved by more than ``skin / 2`` since then, no pair outside that list can
have come within the cutoff (two atoms approach each other by at most the sum of their
displacements), so filtering the stored pairs by their *current* distance ``< cutoff`` gives
exactly the pair set (and shifts) of a fresh build; only the order of the edges differs, which
changes sums by float round-off. The rebuild criterion:

- the largest Cartesian displacement since the build exceeds ``skin / 2`` (a wrapped atom jumps
  by a lattice vector and therefore triggers a rebuild, which is correct);
- the cell, the pbc flags, the atomic numbers or the system layout changed at all (a changing
  cell, as in NPT, rebuilds every step: exact, but without the saving).

``skin = 0`` rebuilds on every call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from est_calc.geometry import edge_vectors

__all__ = ["VerletNeighborList"]


class VerletNeighborList:
    """Graphs for a sequence of nearby configurations (MD, relaxation) with few rebuilds.

    Args:
        cutoff_A: the model cutoff (pairs with distance < cutoff_A are returned).
        skin_A: extra radius of the stored list; >= 0.
        backend: neighbour-list backend used for the rebuilds (see ``neighbor_list``).
        paired: keep the edges in reversed-pair order (``Graph.paired``).

    Attributes:
        n_builds: number of full neighbour-list builds so far.
        n_calls: number of graphs returned so far.
    """

    def __init__(self, cutoff_A: float, skin_A: float = 1.0, *, backend: str = "auto",
                 paired: bool = False):
        cutoff_A, skin_A = float(cutoff_A), float(skin_A)
        if not (cutoff_A > 0 and cutoff_A < float("inf")):
            raise ValueError(f"VerletNeighborList: cutoff_A must be positive and finite, got {cutoff_A}")
        if not (skin_A >= 0 and skin_A < float("inf")):
            raise ValueError(f"VerletNeighborList: skin_A must be >= 0 and finite, got {skin_A}")
        self.cutoff_A, self.skin_A, self.backend = cutoff_A, skin_A, backend
        self.paired = bool(paired)
        self.n_builds = 0
        self.n_calls = 0
        self._ref = None  # (positions, cell, pbc, numbers, system_idx) of the last build
        self._graph = None  # the stored graph, with cutoff_A + skin_A

    def reset(self) -> None:
        """Forget the stored list (the next call rebuilds)."""
        self._ref = None
        self._graph = None

    def _needs_rebuild(self, batch) -> bool:
        if self._ref is None or self.skin_A == 0.0:
            return True
        pos, cell, pbc, numbers, sidx = self._ref
        if (batch.positions.shape != pos.shape or batch.cell.shape != cell.shape
                or batch.positions.device != pos.device):
            return True
        if not (torch.equal(batch.pbc, pbc) and torch.equal(batch.atomic_numbers, numbers)
                and torch.equal(batch.system_idx, sidx) and torch.equal(batch.cell, cell)):
            return True
        disp = (batch.positions.detach() - pos).norm(dim=-1)
        return bool(disp.numel() > 0 and float(disp.max()) > 0.5 * self.skin_A)

    def __call__(self, batch):
        """The :class:`~est_calc.neighbors.Graph` of ``batch`` for ``cutoff_A`` (exact)."""
        from est_calc.neighbors import Graph, build_graph

        self.n_calls += 1
        if self._needs_rebuild(batch):
            self._graph = build_graph(batch, self.cutoff_A + self.skin_A, backend=self.backend,
                                      paired=self.paired)
            self._ref = (batch.positions.detach().clone(), batch.cell.detach().clone(),
                         batch.pbc.clone(), batch.atomic_numbers.clone(), batch.system_idx.clone())
            self.n_builds += 1
            if self.skin_A == 0.0:
                return self._graph
        g = self._graph
        with torch.no_grad():
            vec = edge_vectors(batch.positions.detach(), batch.cell.detach(), g.edge_index,
                               g.shifts, batch.system_idx)
            keep = (vec * vec).sum(dim=-1) < self.cutoff_A**2
        # Both directions of a pair have the same distance to the bit: a paired list stays paired.
        return Graph(g.edge_index[:, keep], g.shifts[keep], g.paired)

    def __repr__(self) -> str:
        return (f"VerletNeighborList(cutoff_A={self.cutoff_A}, skin_A={self.skin_A}, "
                f"backend={self.backend!r}, n_builds={self.n_builds}, n_calls={self.n_calls})")

