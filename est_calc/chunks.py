"""Energy, forces and stress of one large structure, evaluated in groups of atoms.

The peak memory of a call grows with the atoms and edges the model sees at once. With
``ESTCalculator(max_atoms=N)`` a structure of more than N atoms is split into groups G of at
most N atoms (consecutive along the longest extent of the positions) and each group is evaluated
on the part of the graph its energies depend on. For a model of L message-passing layers the
energy of atom i depends on the atoms within L + 1 hops of i (edges shorter than the cutoff; the
edge-degree embedding is one hop, each layer one more) and on the edges of the atoms within L
hops, and on nothing else. So with

    S_0 = G,   S_{h+1} = S_h + the neighbours of S_h,

the sub-structure of the atoms S_{L+1} and the edges centred on S_L gives every atom of G exactly
its energy e_i, and

    E = sum_G E_G,    E_G = sum_{i in G} e_i,
    F = -dE/dr = sum_G -dE_G/dr,    sigma = (1/V) dE/d strain = sum_G (1/V) dE_G/d strain,

where each E_G is differentiated on its own sub-structure (the same cell, so the same strain
derivative). The results equal one evaluation's to round-off (tests/unit/test_chunks.py); the
cost is that of every group's halo, S_{L+1} minus G (about 2 (L + 1) r_c of extra thickness per
group), so N should be as large as memory allows. The same contract is what LAMMPS's
``pair_style est chunk_atoms N`` uses (est_lammps/README.md).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from est_calc.batch import AtomsBatch
from est_calc.forces import Prediction, energy_forces_stress

__all__ = ["GroupEnergy", "chunked_energy_forces_stress", "groups", "neighbourhood"]


def groups(positions: Tensor, max_atoms: int) -> list[Tensor]:
    """ceil(n / max_atoms) groups of atom indices (about equal sizes), consecutive along the
    Cartesian axis of the positions' largest extent."""
    n = positions.shape[0]
    k = max(1, -(-n // max_atoms))
    if k == 1:
        return [torch.arange(n, device=positions.device)]
    extent = positions.detach().amax(dim=0) - positions.detach().amin(dim=0)
    order = torch.argsort(positions.detach()[:, int(extent.argmax())], stable=True)
    bounds = [n * g // k for g in range(k + 1)]
    return [order[bounds[g]:bounds[g + 1]] for g in range(k)]


def neighbourhood(edge_index: Tensor, n_atoms: int, group: Tensor, n_layers: int
                  ) -> tuple[Tensor, Tensor]:
    """(nodes, edges): the atoms within ``n_layers`` + 1 hops of ``group`` (indices) as a bool
    mask over the structure's atoms, and as a bool mask over the edges those centred on the
    atoms within ``n_layers`` hops (module docstring) together with their reverses. A reverse
    is centred on an atom n_layers + 1 hops out, whose own features no energy of the group
    uses; it makes the list symmetric, so it can be ordered in reversed pairs
    (:func:`est_calc.neighbors.pairing.pair_edges`), which the model evaluates faster."""
    i, j = edge_index[0], edge_index[1]
    inside = torch.zeros(n_atoms, dtype=torch.bool, device=edge_index.device)
    inside[group] = True
    for _ in range(n_layers):
        inside[j[inside[i]]] = True
    centred = inside[i]
    nodes = inside.clone()
    nodes[j[centred]] = True
    return nodes, centred | inside[j]


class GroupEnergy(torch.nn.Module):
    """A model whose energy is that of the atoms in ``mask`` only: ``energy`` (1,) is the sum of
    the wrapped model's per-atom ``energies`` over the mask; ``energies`` are passed through."""

    def __init__(self, model, mask: Tensor):
        super().__init__()
        self.model = model
        self.mask = mask

    def forward(self, batch: AtomsBatch, graph):
        out = self.model(batch, graph)
        energies = out.energies
        energy = torch.where(self.mask, energies, torch.zeros_like(energies)).sum().reshape(1)
        return _Output(energy, energies)


class _Output(NamedTuple):
    energy: Tensor
    energies: Tensor


def chunked_energy_forces_stress(model, batch: AtomsBatch, graph, *, n_layers: int,
                                 max_atoms: int, compute_stress: bool = False) -> Prediction:
    """:func:`est_calc.forces.energy_forces_stress` of one structure, in groups of at most
    ``max_atoms`` atoms (module docstring).

    Args:
        model: maps (batch, graph) to an object with ``energies`` (n_atoms,) eV (a Potential).
        batch: one structure.
        graph: its full edge list, symmetric (every edge's reverse in it; any order); each
            group's sub-list is put in reversed-pair order.
        n_layers: the model's message-passing layers.
        max_atoms: the largest group.
        compute_stress: also the stress (n_systems = 1, 3, 3) eV/Å^3.

    Raises:
        ValueError: a batch of several structures; ``max_atoms`` < 1.
    """
    from est_calc.neighbors import Graph
    from est_calc.neighbors.pairing import pair_edges

    if batch.n_systems != 1:
        raise ValueError(f"chunked evaluation takes one structure at a time, got "
                         f"{batch.n_systems}")
    if max_atoms < 1:
        raise ValueError(f"max_atoms must be a positive number of atoms, got {max_atoms}")
    n = batch.n_atoms
    energy = batch.positions.new_zeros(1)
    energies = batch.positions.new_zeros(n)
    forces = torch.zeros_like(batch.positions)
    stress = batch.positions.new_zeros(1, 3, 3) if compute_stress else None
    for group in groups(batch.positions, max_atoms):
        nodes, edges = neighbourhood(graph.edge_index, n, group, n_layers)
        index = torch.nonzero(nodes).squeeze(1)  # sub-structure atom -> atom
        local = torch.full((n,), -1, dtype=torch.long, device=index.device)
        local[index] = torch.arange(index.shape[0], device=index.device)
        sub = batch.replace(positions=batch.positions[index],
                            atomic_numbers=batch.atomic_numbers[index],
                            system_idx=batch.system_idx[index])
        sub_edges, sub_shifts = local[graph.edge_index[:, edges]], graph.shifts[edges]
        paired = pair_edges(sub_edges, sub_shifts, index.shape[0])
        sub_graph = (Graph(*paired, paired=True) if paired is not None
                     else Graph(sub_edges, sub_shifts))
        mask = torch.zeros(index.shape[0], dtype=torch.bool, device=index.device)
        mask[local[group]] = True
        pred = energy_forces_stress(GroupEnergy(model, mask), sub, sub_graph,
                                    compute_stress=compute_stress)
        energy += pred.energy
        energies[group] = pred.energies[local[group]]
        forces.index_add_(0, index, pred.forces)
        if compute_stress:
            stress += pred.stress
    return Prediction(energy=energy, energies=energies, forces=forces, stress=stress)
