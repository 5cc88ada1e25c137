"""A training step's loss and parameter gradients as one compiled graph (``train.compile``).

Training on forces differentiates twice: forces are F = -dE/dr, kept differentiable
(``create_graph``), and the loss on them is differentiated again with respect to the parameters.
Run eagerly, that is thousands of small operator calls per step (a batch of five 27-atom
molecules: ~14,000), each with its dispatch cost, and the elementwise work between the matrix
products makes its own passes over memory.

:class:`CompiledStep` traces the whole computation once, with symbolic atom, edge and structure
counts: (parameters, batch, labels) -> (loss, dL/dparameters). Both derivatives are taken *while
tracing*, so the graph holds the forward pass, the force backward and the second backward as
plain operations and needs no autograd when it runs; torch.compile (Inductor) then fuses it.
Tracing a function that returns forces and differentiating the traced graph afterwards would be
wrong: the tracer records each tensor an autograd node saved as a ``detach`` of it, which cuts
the second derivative through it (the forces would be right, their parameter gradients not).

Contract, checked where it can be:

- The graph is traced for one combination of (stress in the loss, loss kind, Huber delta,
  dtype, device); another combination traces its own.
- Sizes stay symbolic: every atom, edge, structure and species count of the inputs must be a
  symbol in the trace (a size the tracer turned into a constant would make the graph wrong for
  other batches; :class:`CompiledStep` refuses such a trace). Tracers fix sizes of 0 and 1, so
  a batch with one structure, one species, one atom or no edge gets a graph of its own (traced
  and compiled when first met). Batches must be paired edge lists
  (:class:`~est_calc.neighbors.Graph` with ``paired=True``), as the trainer builds them.
- The first ``verify_steps`` calls of each graph also run the eager step on the same batch and
  raise ``RuntimeError`` if the loss or the gradients differ beyond round-off, so a graph that is
  wrong for batches other than the one it was traced on stops the run at once.
- Masks enter the loss as 0/1 factors instead of boolean indexing (same sums: every penalty is 0
  at a zero difference), and the counts that divide the sums are inputs (the trainer's global
  counts).

Compiling costs minutes the first time (about four on one core for the "molecule" preset;
Inductor's on-disk cache makes later runs of the same architecture take seconds); the trace
itself takes ~25 s. What a step gains is in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from est_calc.batch import AtomsBatch
from est_calc.forces import _check_volumes, energy_forces_stress
from est_calc.model import given_species
from est_calc.neighbors import Graph
from est_calc.training.loss import elementwise

__all__ = ["CompiledStep", "StepLoss"]

logger = logging.getLogger(__name__)

#: torch.compile backend of a :class:`CompiledStep` made without one (the trainer's).
DEFAULT_BACKEND = "inductor"


class StepLoss:
    """The loss of one batch as the trainer defines it (est_calc.training.loss), written with 0/1
    masks so that it traces with symbolic sizes."""

    def __init__(self, kind: str, delta: float, with_stress: bool):
        self.kind, self.delta, self.with_stress = kind, float(delta), bool(with_stress)

    def __call__(self, pred, energy: Tensor, forces: Tensor, stress: Tensor, has_stress: Tensor,
                 n_atoms: Tensor, force_mask: Tensor, weights: Tensor, counts: Tensor) -> Tensor:
        """sum_t w_t (sum of penalties of term t) / count_t; weights and counts are (3,) tensors
        (energy, forces, stress), counts already at least 1."""
        de = (pred.energy - energy) / n_atoms.to(energy.dtype)
        loss = weights[0] * elementwise(de, self.kind, self.delta).sum() / counts[0]
        df = pred.forces - forces
        f_sum = (elementwise(df, self.kind, self.delta) * force_mask[:, None]).sum()
        loss = loss + weights[1] * f_sum / counts[1]
        if self.with_stress:
            ds = pred.stress - stress
            s_sum = (elementwise(ds, self.kind, self.delta) * has_stress[:, None, None]).sum()
            loss = loss + weights[2] * s_sum / counts[2]
        return loss


class CompiledStep:
    """(loss, gradients) of a training step from one compiled graph per loss kind (module
    docstring).

    Args:
        model: the module the step differentiates (the trainer's accelerated view), called as
            ``model(batch, graph)``; its parameters are those whose gradients are returned, in
            ``model.parameters()`` order.
        backend: torch.compile backend (None: :data:`DEFAULT_BACKEND`; "eager" runs the traced
            graph as it is, which tests use to check the trace without compiling).
        verify_steps: calls per graph checked against the eager step (module docstring).
        rtol: largest |g_compiled - g_eager| / |g_eager| (norms over all parameters) accepted.
    """

    def __init__(self, model: nn.Module, *, backend: str | None = None, verify_steps: int = 2,
                 rtol: float | None = None):
        self.model = model
        self.backend = backend or DEFAULT_BACKEND
        self.verify_steps = int(verify_steps)
        self.rtol = rtol
        self._names = [n for n, _ in model.named_parameters()]
        self._graphs: dict[tuple, Callable] = {}
        self._checked: dict[tuple, int] = {}
        self.compile_s = 0.0  # seconds spent tracing and compiling (first calls of each graph)

    # ------------------------------------------------------------------ the traced function
    def _function(self, loss: StepLoss):
        names, model = self._names, self.model

        def step(params, positions, numbers, cell, pbc, system_idx, edge_index,
                 shifts, species, inverse, energy, forces, stress, has_stress, n_atoms,
                 force_mask, weights, counts):
            # Parameters only: the buffers (fixed tables, one spherical grid shared by several
            # blocks) enter the trace as constants. Handing a buffer that several names share
            # to functional_call left the traced stand-in in the module after the trace.
            state = dict(zip(names, params))

            def call(b, g):
                return torch.func.functional_call(model, state, (b, g))

            batch = AtomsBatch(positions=positions, atomic_numbers=numbers, cell=cell, pbc=pbc,
                               system_idx=system_idx)
            graph = Graph(edge_index=edge_index, shifts=shifts, paired=True)
            with given_species(species, inverse):
                pred = energy_forces_stress(call, batch, graph, compute_stress=loss.with_stress,
                                            create_graph=True)
            value = loss(pred, energy, forces, stress, has_stress, n_atoms, force_mask, weights,
                         counts)
            grads = torch.autograd.grad(value, params, allow_unused=True)
            return [value] + [torch.zeros_like(p) if g is None else g
                              for p, g in zip(params, grads)]

        return step

    def _inputs(self, batch, graph, energy, forces, stress, has_stress, n_atoms, force_mask,
                weights, counts) -> tuple:
        species, inverse = torch.unique(batch.atomic_numbers, return_inverse=True)
        dtype = batch.positions.dtype
        return (batch.positions, batch.atomic_numbers, batch.cell, batch.pbc, batch.system_idx,
                graph.edge_index, graph.shifts, species, inverse, energy, forces, stress,
                has_stress.to(dtype), n_atoms, force_mask.to(dtype), weights, counts)

    def _trace(self, loss: StepLoss, inputs: tuple) -> Callable:
        from torch._subclasses.fake_tensor import FakeTensor
        from torch.fx.experimental.proxy_tensor import make_fx

        from est_calc.deploy.export import _compiling, _no_duck_shapes

        params = [p.detach().requires_grad_(True) for p in self.model.parameters()]
        with _no_duck_shapes(), _compiling():
            gm = make_fx(self._function(loss), tracing_mode="symbolic",
                         _allow_non_fake_inputs=True)(params, *inputs)
        if any(isinstance(t, FakeTensor) for t in [*self.model.parameters(),
                                                    *self.model.buffers()]):
            raise RuntimeError("tracing the training step left a traced stand-in in the model")
        _require_symbolic_sizes(gm, n_params=len(params))
        if self.backend == "eager":
            return gm
        return torch.compile(gm, backend=self.backend, dynamic=True)

    # ------------------------------------------------------------------ the step
    def __call__(self, batch: AtomsBatch, graph: Graph, *, energy: Tensor, forces: Tensor,
                 stress: Tensor | None, has_stress: Tensor, n_atoms: Tensor, force_mask: Tensor,
                 weights: tuple[float, float, float], counts: tuple[float, float, float],
                 kind: str, delta: float, with_stress: bool) -> tuple[Tensor, list[Tensor]]:
        """The batch's loss (scalar tensor) and its gradient for every parameter (a zero tensor
        for those the loss does not reach).

        Args:
            batch, graph: the (rotated) batch and its paired edge list.
            energy, forces, stress, has_stress, n_atoms, force_mask: labels and masks as
                :func:`est_calc.training.loss.loss_terms` takes them (stress may be None when
                ``with_stress`` is False).
            weights: (w_energy, w_forces, w_stress).
            counts: the counts that divide each term's sum (values below 1 count as 1).
            kind, delta: loss kind and Huber delta.
            with_stress: whether the stress term is in the loss.
        """
        if not graph.paired:
            raise ValueError("CompiledStep needs a paired edge list (Graph.paired)")
        dtype, device = batch.positions.dtype, batch.positions.device
        if with_stress:
            _check_volumes(batch.cell)  # the eager step's ValueError; the trace cannot check
        if stress is None:
            stress = torch.zeros(batch.cell.shape, dtype=dtype, device=device)
        w = torch.tensor(weights, dtype=dtype, device=device)
        c = torch.tensor([max(float(v), 1.0) for v in counts], dtype=dtype, device=device)
        loss = StepLoss(kind, delta, with_stress)
        inputs = self._inputs(batch, graph, energy, forces, stress, has_stress, n_atoms,
                              force_mask, w, c)
        # A tracer fixes sizes 0 and 1 (one structure, one species, ...), so such batches get
        # graphs of their own.
        key = (kind, float(delta), bool(with_stress), dtype, device.type,
               tuple(t.shape[dim] <= 1 for t, dim in zip(inputs, _SIZE_DIMS)))
        params = [p.detach() for p in self.model.parameters()]
        fn = self._graphs.get(key)
        t0 = time.perf_counter()
        if fn is None:
            logger.info("tracing the training step (%s loss%s)", kind,
                        ", with stress" if with_stress else "")
            fn = self._graphs[key] = self._trace(loss, inputs)
        with torch.no_grad():
            out = fn(params, *inputs)
        if self._checked.get(key, 0) < self.verify_steps:
            self.compile_s += time.perf_counter() - t0
            self._checked[key] = self._checked.get(key, 0) + 1
            self._verify(loss, inputs, out)
        return out[0], list(out[1:])

    def _verify(self, loss: StepLoss, inputs: tuple, out: list[Tensor]) -> None:
        """Raise RuntimeError unless ``out`` equals the eager step on the same inputs."""
        ref = self._function(loss)(list(self.model.parameters()), *inputs)
        dtype = out[0].dtype
        rtol = self.rtol if self.rtol is not None else (1e-9 if dtype == torch.float64 else 2e-4)
        g = torch.cat([t.reshape(-1) for t in out[1:]])
        g_ref = torch.cat([t.detach().reshape(-1) for t in ref[1:]])
        dg = float((g - g_ref).norm() / g_ref.norm().clamp_min(torch.finfo(dtype).tiny))
        dl = abs(float(out[0]) - float(ref[0].detach())) / max(abs(float(ref[0].detach())), 1e-30)
        if not (dg <= rtol and dl <= rtol):
            raise RuntimeError(
                f"the compiled training step differs from the eager one on a batch of "
                f"{inputs[0].shape[0]} atoms and {inputs[5].shape[1]} edges (relative "
                f"differences: loss {dl:.2e}, gradients {dg:.2e}, allowed {rtol:.0e}); "
                f"train without it (train.compile: false)")


#: Per batch input of the traced step (positions, atomic numbers, cell, pbc, system index, edge
#: index, shifts, species, inverse): the dimension that holds its atom, edge, structure or
#: species count.
_SIZE_NAMES = ("positions", "atomic numbers", "cell", "pbc", "system index", "edge index",
               "shifts", "species", "species index")
_SIZE_DIMS = (0, 0, 0, 0, 0, 1, 0, 0, 0)


def _require_symbolic_sizes(gm, *, n_params: int) -> None:
    """Raise RuntimeError if the trace turned a batch size above 1 into a constant (module
    docstring; sizes 0 and 1 are keyed separately by the caller)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, name, dim in zip(placeholders[n_params:], _SIZE_NAMES, _SIZE_DIMS):
        value = node.meta.get("val")
        if value is None:
            continue
        size = value.shape[dim]
        if not isinstance(size, torch.SymInt) and size > 1:
            raise RuntimeError(f"the traced training step fixed the size of its {name} input "
                               f"({size}); train without train.compile")
