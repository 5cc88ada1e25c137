"""EdgeFeatures: everything the blocks read about the edges of a batch, computed once per call.

For every directed edge i <- j (i = centre, j = neighbour) with vector r_ij in Å
(``geometry.edge_vectors``, inside autograd so that forces and stress follow by differentiation):

==========================  =================  =================================================
field                       shape              meaning
==========================  =================  =================================================
``center``, ``neighbor``    (E,) int64         i and j; messages j -> i are summed onto i
``lengths``                 (E,) Å             |r_ij|
``sh``                      (E, K)             Y(r_hat_ij), e3nn order, component normalisation
``rbf``                     (E, n_rbf)         radial basis of |r_ij|
``envelope``                (E,)               u(|r_ij|), C^2 to exactly 0 at the cutoff
``radial_in``               (E, n_rbf + 2 Cz)  [rbf || emb(Z_i) || emb(Z_j)], every radial MLP's
                                               input (emb: the scalar species embedding)
``rotation``                (E, K_M, K)        Wigner-D rows into each edge's frame
                                               (``wigner.EdgeRotation``), or None when no block
                                               rotates (the "est" message)
``pair_rotation``           (E/2, K_M, K)      set by the accelerated model for a paired edge
                                               list (``Graph.paired``, checked: edge E/2 + p
                                               reverses edge p): the first half's rotations, of
                                               which ``rotation`` is [D; s D]; plain blocks do
                                               not read it
==========================  =================  =================================================
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

__all__ = ["EdgeFeatures", "encode_edges"]


class EdgeFeatures(NamedTuple):
    """Per-edge inputs shared by every block of one call (see the module docstring)."""

    center: Tensor
    neighbor: Tensor
    lengths: Tensor
    sh: Tensor
    rbf: Tensor
    envelope: Tensor
    radial_in: Tensor
    rotation: Optional[Tensor] = None
    pair_rotation: Optional[Tensor] = None

    @property
    def n_edges(self) -> int:
        return self.center.shape[0]


def encode_edges(edge_index: Tensor, vectors: Tensor, species_emb: Tensor, *, rbf: nn.Module,
                 envelope: nn.Module, harmonics: nn.Module,
                 rotation: nn.Module | None = None) -> EdgeFeatures:
    """The EdgeFeatures of edges ``edge_index`` (2, E) with vectors (E, 3) Å.

    Args:
        edge_index: (2, E) int64, rows (i = centre, j = neighbour).
        vectors: (E, 3) edge vectors r_ij in Å.
        species_emb: (N, Cz) scalar species embedding of the atoms.
        rbf: radial basis module, (E,) -> (E, n_rbf).
        envelope: cutoff envelope module, (E,) -> (E,).
        harmonics: spherical harmonics module, (E, 3) -> (E, K) (normalises the vectors).
        rotation: ``wigner.EdgeRotation`` for models with SO(2) blocks, else None.
    """
    i, j = edge_index[0], edge_index[1]
    r = vectors.norm(dim=-1)
    basis = rbf(r)
    return EdgeFeatures(
        center=i, neighbor=j, lengths=r, sh=harmonics(vectors), rbf=basis, envelope=envelope(r),
        radial_in=torch.cat([basis, species_emb[i], species_emb[j]], dim=-1),
        rotation=None if rotation is None else rotation(vectors))
