"""The model-level speed-ups: paired edge rotations, harmonics read off them, frozen weights.

:class:`FastESTModel` computes what :class:`est_calc.model.ESTModel` computes (same parameters and
buffers, shared with the plain model it was made from):

* a paired edge list (``Graph.paired``, checked here before it is relied on: the second half
  reverses the first, edge for edge) has its Wigner rotations evaluated for the first half only;
  the reversed edges' rows are the same times fixed signs (:func:`pair_signs`), and the blocks
  get the first half's rotations (``EdgeFeatures.pair_rotation``) to use the same symmetry;
* the edge harmonics are read off the rotations' m = 0 rows: R_e r_hat = a and Y(a) has only its
  m = 0 entries Y^l_0(a), so Y^l(r_hat) = D^l(R_e)^T Y^l(a) = Y^l_0(a) D^l_{0,:}(R_e), the first
  L + 1 rows scaled per degree (two cheap operations instead of the harmonics and their backward;
  equal to e3nn's to round-off);
* the species embedding is gathered per edge with a contiguous backward (:func:`gather_rows`);
* with ``inference`` the parameters are frozen (``requires_grad=False``) for each forward pass:
  derivatives with respect to positions and strain only, no record of what parameter gradients
  would need, and the blocks' caches of derived weights hold.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache

import torch
from e3nn import o3
from torch import Tensor

from est_calc.accel.gather import gather_rows
from est_calc.accel.so2_message import pair_signs
from est_calc.accel.weights import constant
from est_calc.model import ESTModel, ModelOutput
from est_calc.neighbors import Graph
from est_calc.neighbors.pairing import is_paired
from est_calc.nn.edges import EdgeFeatures
from est_calc.nn.wigner import edge_axis

__all__ = ["FastESTModel"]


@lru_cache(maxsize=None)
def _sh_on_axis(l_max: int) -> tuple[float, ...]:
    """Y^l_0(a) for l = 0..L on the edge axis a (sqrt(2l + 1), component normalisation), from
    e3nn in float64, as Python floats (every dtype gets them rounded once)."""
    y = o3.spherical_harmonics(list(range(l_max + 1)), edge_axis(), normalize=True,
                               normalization="component")
    return tuple(float(y[l * l + l]) for l in range(l_max + 1))


@contextlib.contextmanager
def _frozen(parameters: tuple[torch.nn.Parameter, ...]):
    """Parameters that require gradients do not for the duration of the block, then do again."""
    changed = [p for p in parameters if p.requires_grad]
    for p in changed:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in changed:
            p.requires_grad_(True)


class FastESTModel(ESTModel):
    """:class:`ESTModel` with the speed-ups of the module docstring.

    Attributes set by :func:`est_calc.accel.accelerate`: ``inference`` (parameters frozen for each
    forward pass).
    """

    inference = False

    def _accelerate(self, options) -> None:
        self.inference = options.inference
        self._compiled_network = None  # a compiled plain network would bypass the swapped blocks
        self._parameter_list = tuple(self.parameters())
        c = self.config
        self._sh_axis = _sh_on_axis(c.l_max)
        self._pair_sign = pair_signs(c.l_max, c.so2_m_max) if self.edge_rotation is not None else ()

    def forward(self, batch, graph) -> ModelOutput:
        """As :meth:`ESTModel.forward`; a graph marked paired is checked before it is used so
        (except while a graph is being traced or compiled, whose caller checks it: the check reads
        values)."""
        if (graph.paired and not torch.compiler.is_compiling()
                and not is_paired(graph.edge_index, graph.shifts)):
            graph = Graph(graph.edge_index, graph.shifts)
        if not self.inference:
            return super().forward(batch, graph)
        with _frozen(self._parameter_list):
            return super().forward(batch, graph)

    def _checkpointed_layer(self, message, update, x: Tensor, edges: EdgeFeatures) -> Tensor:
        """As :meth:`ESTModel._checkpointed_layer`; with ``inference`` the recomputation in the
        backward pass runs with the parameters frozen too, as the forward pass did (the same
        operations, so the same saved tensors)."""
        if not self.inference:
            return super()._checkpointed_layer(message, update, x, edges)
        return torch.utils.checkpoint.checkpoint(self._frozen_layer, message, update, x, edges,
                                                 use_reentrant=False)

    def _frozen_layer(self, message, update, x: Tensor, edges: EdgeFeatures) -> Tensor:
        with _frozen(self._parameter_list):
            return update(message(x, edges))

    def edge_features(self, species_emb: Tensor, graph, vectors: Tensor) -> EdgeFeatures:
        """As :meth:`ESTModel.edge_features` (module docstring)."""
        i, j = graph.edge_index[0], graph.edge_index[1]
        r = vectors.norm(dim=-1)
        rbf = self.rbf(r)
        radial_in = torch.cat([rbf, gather_rows(species_emb, i), gather_rows(species_emb, j)],
                              dim=-1)
        if self.edge_rotation is None:
            return EdgeFeatures(i, j, r, self.edge_sh(vectors), rbf, self.envelope(r), radial_in)
        half = None
        if graph.paired:
            half = self.edge_rotation(vectors[: vectors.shape[0] // 2])
            sign = constant(self._pair_sign, half)
            rotation = torch.cat([half, half * sign[:, None]], dim=0)
        else:
            rotation = self.edge_rotation(vectors)
        n_m0 = self.config.l_max + 1
        sh = (rotation[:, :n_m0, :] * constant(self._sh_axis, rotation)[:, None]).sum(dim=1)
        return EdgeFeatures(i, j, r, sh, rbf, self.envelope(r), radial_in, rotation, half)
