"""One structure's energy, forces and stress at padded sizes, replayed as a CUDA graph.

A calculator call for one structure (a step of MD or of a relaxation) launches thousands of small
kernels. :class:`CapturedStep` records the whole step, the forward pass and the autograd pass for
forces (and stress), once in a CUDA graph (``torch.cuda.CUDAGraph``) and replays it on later
calls, after copying the new positions, cell and edges into the graph's static input buffers.
A graph fixes every shape, so atoms and edges are padded to capacities N_cap >= N + 2 and
E_cap >= E for N real atoms and E real edges:

=========================  ========================================================================
slot                       content
=========================  ========================================================================
atoms 0 .. N-1             the structure
atoms N .. N_cap-3         idle dummies (no edges)
atoms a = N_cap-2, b       the two edge dummies, |r_b - r_a| = 2 r_c + 1 Å apart
edges, unpaired list       the E real edges, then E_cap - E pad edges a <- b (shift 0)
edges, paired list         [real first half, pad a <- b, real second half, pad b <- a]: edge
                           E_cap/2 + p reverses edge p again (``Graph.paired``)
=========================  ========================================================================

Dummies take the species of atom 0, so they add no species node. The padded step gives the
energy, forces and stress of the unpadded one (up to the order of floating-point sums):

* every pad edge joins two dummies, so no real atom's features, degree embedding or attention
  softmax (each runs over the edges of one centre atom) sees it; every other operation of the
  network acts on each atom's or each edge's row alone;
* a pad edge is longer than the cutoff, so its envelope is 0 and the dummies' own numbers stay
  finite (they are computed, then discarded);
* the dummies' per-atom energies are replaced by 0 before the sum (``torch.where``), so the
  energy and every derivative of it, forces on real atoms and the stress, ignore them.

:func:`padded_energies` assembles the per-atom energies as :meth:`est_calc.model.ESTModel.forward`
does, without its host synchronisations, which a capture cannot contain: the isolated-atom
reference nodes are the structure's species (found on the host when the atomic numbers change,
instead of ``torch.unique``); the rest is :meth:`est_calc.model.ESTModel.atom_energies`, as in
the eager model. tests/unit/test_graphs.py compares the two.

Capacities and recapture. The need is N + 2 atoms and E edges; a capacity is fitted to the need
(atoms) or to ``headroom`` x the need rounded up to a multiple of :data:`EDGE_UNIT` (edges). The
first call fits both; a need above its capacity grows the capacity to at least ``growth`` x its
size (or the fit, when larger); a need below capacity / ``growth``^2 refits it. A new capacity,
a different number of species, a paired list that becomes unpaired (or back) and a change of
whether stress is computed build new buffers and capture again; other changes of the atomic
numbers rewrite the buffers in place.

Inside the graph: edge vectors from the static positions, cell, edges and shifts (strained for
stress), the network, the energy assembly, the autograd pass and the stress's division by the
volume (:func:`est_calc.forces.energy_forces_stress`, as the eager path). Outside: the neighbour
list (Verlet skin: ``ESTCalculator(skin=...)``), the pairing check, the zero-volume check of the
cell, the copies into the buffers and of the outputs out of them.

Without capture (``capture=False``, the default off CUDA) the same padded step runs eagerly: how
the CPU tests check the padding, and a reference for the captured replays.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from est_calc.accel.model import _frozen
from est_calc.batch import AtomsBatch
from est_calc.forces import Prediction, _check_volumes, energy_forces_stress
from est_calc.geometry import edge_vectors
from est_calc.model import ESTModel, ModelOutput
from est_calc.neighbors import Graph
from est_calc.neighbors.pairing import is_paired
from est_calc.nn.embedding import N_ELEMENTS

__all__ = ["EDGE_UNIT", "CapturedStep", "padded_energies"]


def _is_out_of_memory(err: RuntimeError) -> bool:
    return isinstance(err, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))

#: Edge capacities are multiples of this many edges.
EDGE_UNIT = 64


def padded_energies(model: ESTModel, batch: AtomsBatch, graph: Graph, species: Tensor,
                    slot: Tensor, real: Tensor) -> ModelOutput:
    """:meth:`ESTModel.forward` of one padded structure, without host synchronisations.

    Args:
        model: the (plain or accelerated) model, in eval mode.
        batch: one structure (n_systems = 1) of N_cap atoms, real ones and dummies.
        graph: its padded edges (module docstring).
        species: (n_species,) sorted atomic numbers of the real atoms (the isolated-atom nodes).
        slot: (N_cap,) index into ``species`` of each atom's atomic number.
        real: (N_cap,) bool, True for the real atoms.

    Returns:
        ModelOutput(energy (1,), energies (N_cap,)), the dummies' energies exactly 0.
    """
    frozen = (_frozen(model._parameter_list) if getattr(model, "inference", False)
              else contextlib.nullcontext())
    with frozen:
        z, edge_index = batch.atomic_numbers, graph.edge_index
        n = z.shape[0]
        vec = edge_vectors(batch.positions, batch.cell, edge_index, graph.shifts,
                           batch.system_idx)
        network = model.network
        if model._compiled_network is not None and not model._checkpoint_layers:
            network = model._compiled_network
        e_all = model.head(network(torch.cat([z, species]), graph, vec)).squeeze(-1)
        e = e_all[:n] - e_all[n:].index_select(0, slot)
        energies = model.atom_energies(z, e, edge_index, vec.norm(dim=-1))
        energies = torch.where(real, energies, torch.zeros_like(energies))
        energy = energies.new_zeros(1).index_add(0, batch.system_idx, energies)
    return ModelOutput(energy=energy, energies=energies)


class _Layout(NamedTuple):
    """What fixes the shapes (and the code path) of a captured step."""

    n_atoms: int      # N_cap
    n_edges: int      # E_cap (even)
    paired: bool
    n_species: int
    stress: bool


class CapturedStep:
    """Energy, forces (and stress) of one structure as a replayed CUDA graph (module docstring).

    ``step(batch, graph, compute_stress=...)`` returns what
    ``energy_forces_stress(model, batch, graph, compute_stress=...)`` returns, equal to float
    round-off.

    Args:
        model: a ``Potential`` or an ``ESTModel`` (plain or accelerated), in eval mode.
        capture: record and replay CUDA graphs; None (default): on a CUDA model, False runs the
            padded step eagerly (any device).
        headroom: capacity over the need when a capacity is (re)fitted (edges; atoms get none
            at first, their count rarely changes); >= 1.
        growth: factor by which an exceeded capacity grows at least; > 1.
        warmup: eager passes on a side stream before each capture (they fill the blocks'
            caches of derived weights and, with ``torch.compile``, compile); >= 1.

    Attributes:
        n_captures: how many padded layouts were built (each a capture when ``captures``).
        captures: whether CUDA graphs are recorded. A recording that fails (other than for
            memory) warns, sets ``failure`` to its reason and ``captures`` to False: the padded
            step then runs eagerly, with the same results.
        failure: None, or why the recording failed.
        capacity: (N_cap, E_cap) of the current layout, or None before the first call.

    Raises (calls):
        ValueError: more than one structure, or stress for a cell of zero volume.
        RuntimeError: the model is in training mode.
    """

    def __init__(self, model, *, capture: bool | None = None, headroom: float = 1.1,
                 growth: float = 1.25, warmup: int = 3):
        model = getattr(model, "model", model)
        if not isinstance(model, ESTModel):
            raise TypeError(f"CapturedStep needs a Potential or an ESTModel, got "
                            f"{type(model).__name__}")
        self.model = model
        self.device = model.element_reference.device
        self.dtype = model.element_reference.dtype
        if capture is None:
            capture = self.device.type == "cuda"
        if capture and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a model on a CUDA device; this one is on "
                             f"{self.device} (capture=False runs the padded step eagerly)")
        if not (headroom >= 1 and math.isfinite(headroom)):
            raise ValueError(f"headroom must be a finite number >= 1, got {headroom!r}")
        if not (growth > 1 and math.isfinite(growth)):
            raise ValueError(f"growth must be a finite number > 1, got {growth!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be a positive integer, got {warmup!r}")
        self.captures = bool(capture)
        self.failure: str | None = None
        self.headroom, self.growth, self.warmup = float(headroom), float(growth), warmup
        self.n_captures = 0
        self._layout: _Layout | None = None
        self._graph = None          # the torch.cuda.CUDAGraph
        self._out: Prediction | None = None
        self._numbers: np.ndarray | None = None  # atomic numbers now in the buffers
        self._species_np: np.ndarray | None = None  # and their sorted species

    @property
    def capacity(self) -> tuple[int, int] | None:
        """(N_cap, E_cap) of the current layout, or None."""
        return None if self._layout is None else (self._layout.n_atoms, self._layout.n_edges)

    def reset(self) -> None:
        """Drop the captured graph and its buffers (the next call builds and captures anew)."""
        self._layout = self._graph = self._out = self._numbers = self._species_np = None

    # ------------------------------------------------------------------ capacities
    def _capacity(self, old: int | None, need: int, headroom: float, unit: int) -> int:
        if old is not None and need <= old and need * self.growth**2 >= old:
            return old
        target = need * headroom
        if old is not None and need > old:
            target = max(target, old * self.growth)
        return max(unit, -(-math.ceil(target) // unit) * unit)

    def _fit(self, n_atoms: int, n_edges: int, paired: bool, n_species: int,
             stress: bool) -> _Layout:
        old = self._layout
        n_cap = self._capacity(old and old.n_atoms, n_atoms + 2, 1.0, 1)
        e_cap = self._capacity(old and old.n_edges, n_edges, self.headroom, EDGE_UNIT)
        return _Layout(n_cap, e_cap, paired, n_species, stress)

    # ------------------------------------------------------------------ buffers
    def _build(self, layout: _Layout) -> None:
        """Fresh static buffers for ``layout`` (the old graph, if any, is dropped)."""
        self._graph = self._out = self._numbers = None
        dev, n_cap, e_cap = self.device, layout.n_atoms, layout.n_edges
        long = {"dtype": torch.long, "device": dev}
        self._pos = torch.zeros(n_cap, 3, dtype=self.dtype, device=dev)
        self._cell = torch.zeros(1, 3, 3, dtype=self.dtype, device=dev)
        self._pbc = torch.zeros(1, 3, dtype=torch.bool, device=dev)
        self._system = torch.zeros(n_cap, **long)
        self._z = torch.zeros(n_cap, **long)
        self._species = torch.zeros(layout.n_species, **long)
        self._slot = torch.zeros(n_cap, **long)
        self._real = torch.zeros(n_cap, dtype=torch.bool, device=dev)
        self._edge_index = torch.zeros(2, e_cap, **long)
        self._shifts = torch.zeros(e_cap, 3, **long)
        a, b = n_cap - 2, n_cap - 1
        width = e_cap // 2 if layout.paired else e_cap
        # Pad edges i <- j: centre a, neighbour b (and b <- a in a paired list's second half).
        self._pad = torch.tensor([[a], [b]], **long).expand(2, width).contiguous()
        self._pad_reversed = self._pad.flip(0).contiguous()
        self._pad_shifts = torch.zeros(width, 3, **long)
        self._pos[b, 0] = 2.0 * self.model.config.cutoff_A + 1.0
        self._layout = layout
        self.n_captures += 1

    def _set_atoms(self, numbers: np.ndarray, species: np.ndarray) -> None:
        """Atomic numbers, species slots and the real-atom mask into the buffers (in place)."""
        n, n_cap = len(numbers), self._layout.n_atoms
        z = np.full(n_cap, numbers[0], dtype=np.int64)
        z[:n] = numbers
        real = np.arange(n_cap) < n
        for buf, value in ((self._z, z), (self._species, species),
                           (self._slot, np.searchsorted(species, z)), (self._real, real)):
            buf.copy_(torch.from_numpy(np.ascontiguousarray(value)).to(buf.dtype))
        self._numbers, self._species_np = numbers.copy(), species

    def _set_inputs(self, batch: AtomsBatch, graph: Graph) -> None:
        """Positions, cell and the padded edges into the buffers (in place)."""
        n, dev = batch.n_atoms, self.device
        with torch.no_grad():
            self._pos[:n].copy_(batch.positions.detach())
            self._cell.copy_(batch.cell.detach())
            self._pbc.copy_(batch.pbc)
            edge_index, shifts = graph.edge_index.to(dev), graph.shifts.to(dev)
            n_edges, e_cap = edge_index.shape[1], self._layout.n_edges
            if self._layout.paired:
                half, k = n_edges // 2, e_cap // 2 - n_edges // 2
                torch.cat([edge_index[:, :half], self._pad[:, :k], edge_index[:, half:],
                           self._pad_reversed[:, :k]], dim=1, out=self._edge_index)
                torch.cat([shifts[:half], self._pad_shifts[:k], shifts[half:],
                           self._pad_shifts[:k]], dim=0, out=self._shifts)
            else:
                k = e_cap - n_edges
                torch.cat([edge_index, self._pad[:, :k]], dim=1, out=self._edge_index)
                torch.cat([shifts, self._pad_shifts[:k]], dim=0, out=self._shifts)

    # ------------------------------------------------------------------ the step
    def _run(self) -> Prediction:
        """The padded step on the buffers (what the graph records)."""
        batch = AtomsBatch(positions=self._pos, atomic_numbers=self._z, cell=self._cell,
                           pbc=self._pbc, system_idx=self._system)
        graph = Graph(self._edge_index, self._shifts, self._layout.paired)
        species, slot, real = self._species, self._slot, self._real

        def energies(work: AtomsBatch, g: Graph) -> ModelOutput:
            return padded_energies(self.model, work, g, species, slot, real)

        return energy_forces_stress(energies, batch, graph, compute_stress=self._layout.stress)

    def _capture(self) -> bool:
        """Warm up on a side stream, then record :meth:`_run`; False (with a warning, and the
        padded step run eagerly from then on) when the recording fails."""
        dev = self.device
        with torch.cuda.device(dev):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self._run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    out = self._run()
            except RuntimeError as err:
                if _is_out_of_memory(err):
                    raise
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                self.failure = f"{type(err).__name__}: {first}"
                self.captures = False
                del graph
                warnings.warn(f"CUDA graph capture failed ({self.failure}); this CapturedStep "
                              "runs the padded step eagerly from now on", RuntimeWarning,
                              stacklevel=3)
                return False
        self._graph, self._out = graph, out
        return True

    def __call__(self, batch: AtomsBatch, graph: Graph, *, compute_stress: bool = False,
                 numbers=None, cell=None) -> Prediction:
        """Energy, per-atom energies, forces and (``compute_stress``) stress of ``batch``.

        Args:
            batch: one structure, on the model's device.
            graph: its edges (the model's cutoff; ``Graph.paired`` is checked before use).
            compute_stress: also the stress (the cell must have non-zero volume).
            numbers: the atomic numbers as a host array, when the caller has them (saves a
                device-to-host copy); they must equal ``batch.atomic_numbers``.
            cell: likewise the (3, 3) cell as a host array (the zero-volume check of a stress
                call then runs on the host); it must equal ``batch.cell``.

        Returns:
            Prediction(energy (1,), energies (N,), forces (N, 3), stress (1, 3, 3) or None),
            tensors of their own (not views of the graph's buffers).
        """
        if batch.n_systems != 1:
            raise ValueError(f"CapturedStep evaluates one structure per call, got "
                             f"{batch.n_systems}")
        if batch.n_atoms == 0:
            raise ValueError("CapturedStep got a structure without atoms")
        if self.model.training:
            raise RuntimeError("CapturedStep needs the model in eval mode")
        if numbers is None:
            numbers = batch.atomic_numbers.cpu().numpy()
        numbers = np.asarray(numbers, dtype=np.int64)
        if numbers.shape != (batch.n_atoms,):
            raise ValueError(f"numbers must be ({batch.n_atoms},), got {numbers.shape}")
        paired = bool(graph.paired) and is_paired(graph.edge_index, graph.shifts)
        same_atoms = self._numbers is not None and np.array_equal(numbers, self._numbers)
        if not same_atoms and (numbers.min() < 1 or numbers.max() >= N_ELEMENTS):
            bad = np.unique(numbers[(numbers < 1) | (numbers >= N_ELEMENTS)]).tolist()
            raise ValueError(f"atomic numbers must be in 1..{N_ELEMENTS - 1}, got {bad}")
        species = self._species_np if same_atoms else np.unique(numbers)
        layout = self._fit(batch.n_atoms, graph.n_edges, paired, len(species),
                           bool(compute_stress))
        if layout != self._layout:
            self._build(layout)
        if not same_atoms or self._numbers is None:  # new atomic numbers or new buffers
            self._set_atoms(numbers, species)
        if compute_stress:
            _check_volumes(batch.cell if cell is None else
                           torch.as_tensor(np.asarray(cell, dtype=np.float64)).reshape(1, 3, 3))
        self._set_inputs(batch, graph)
        if self.captures and (self._graph is not None or self._capture()):
            self._graph.replay()
            out = self._out
        else:
            out = self._run()
        n = batch.n_atoms
        return Prediction(energy=out.energy.clone(), energies=out.energies[:n].clone(),
                          forces=out.forces[:n].clone(),
                          stress=None if out.stress is None else out.stress.clone())
