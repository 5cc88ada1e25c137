"""Conservative forces and stress from an energy-only model, by autograd.

This is the only place in est_calc where forces and stress are computed. The model returns the
total energy E per structure; then

    F_i = -dE/dr_i                                           (eV/Å)
    sigma = (1/V) dE/de   at e = 0                           (eV/Å^3, ASE sign)

where the symmetric strain e deforms positions and cell together, r' = r (I + e) and
cell' = cell (I + e) (rows are lattice vectors, see CONVENTIONS.md). Symmetrising a zero strain
before applying it makes dE/de the symmetric stress (Knuth et al., 2015) even when the model's
output depends on the cell only through the edge vectors.

Equation -> code:

| equation                 | code                                              |
|--------------------------|---------------------------------------------------|
| e = sym(e0), e0 = 0      | ``strain = symmetrize(zeros(b, 3, 3))``           |
| r', cell' = (r, cell)(I+e)| ``geometry.apply_strain``                        |
| F = -dE/dr               | ``-grads[0]``                                     |
| sigma = (1/V) dE/de0     | ``grads[1] / cell_volume(cell)``                  |
| E = E_model + E_extra    | ``energy + extra_energy(work).energy``            |
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from est_calc.batch import AtomsBatch
from est_calc.geometry import apply_strain, cell_volume, symmetrize

__all__ = ["Prediction", "energy_forces_stress"]


class Prediction(NamedTuple):
    """What a potential predicts for a batch.

    Attributes:
        energy: (n_systems,) total energy per structure, eV.
        energies: (n_atoms,) per-atom energy contributions, eV (they sum to ``energy``).
        forces: (n_atoms, 3) eV/Å, or None when not requested.
        stress: (n_systems, 3, 3) eV/Å^3 (ASE sign: positive = tensile), or None when not
            requested.
    """

    energy: Tensor
    energies: Tensor
    forces: Optional[Tensor]
    stress: Optional[Tensor]


def _check_volumes(cell: Tensor) -> Tensor:
    """(n_systems,) |det cell|; raises ValueError when a cell has (numerically) zero volume
    (:func:`est_calc.neighbors.degenerate_cells` of all three lattice vectors)."""
    from est_calc.neighbors import degenerate_cells

    bad = degenerate_cells(cell.detach(), np.ones(3, dtype=bool))
    if bad.any():
        raise ValueError(
            f"stress needs a full 3-D cell with non-zero volume; structure(s) "
            f"{np.flatnonzero(bad).tolist()} have a zero or degenerate cell (give slabs and "
            "molecules a cell with vacuum, or do not ask for stress)"
        )
    return cell_volume(cell.detach())


def energy_forces_stress(
    model: torch.nn.Module,
    batch: AtomsBatch,
    graph,
    *,
    compute_forces: bool = True,
    compute_stress: bool = False,
    create_graph: bool = False,
    extra_energy=None,
) -> Prediction:
    """Energy, and optionally forces and stress, of every structure of ``batch``.

    Args:
        model: maps ``(batch, graph)`` to an object with ``energy`` (n_systems,) and ``energies``
            (n_atoms,) in eV (an ``ESTModel``, a ``Potential`` or anything with that signature).
            The model must compute edge vectors from ``batch.positions`` and ``batch.cell``
            (``geometry.edge_vectors``) so that gradients flow through them.
        batch: the structures, already on the model's device and dtype.
        graph: ``Graph(edge_index (2, E), shifts (E, 3))`` of the unstrained batch.
        compute_forces: return F = -dE/dr (n_atoms, 3), eV/Å.
        compute_stress: return sigma = (1/V) dE/de (n_systems, 3, 3), eV/Å^3. Every structure
            must have a cell of non-zero volume (slabs: a full cell with vacuum along z).
        create_graph: keep the graph of the derivatives so that a loss on forces or stress can
            be differentiated again (training). Without it the outputs are detached.
        extra_energy: optional callable mapping the batch to an object with ``energy``
            (n_systems,) and ``energies`` (n_atoms,) in eV (e.g. a bound
            :class:`est_calc.dispersion.DispersionD3`). It receives the same strained,
            differentiable positions and cell as the model, and its energies are added to the
            model's before differentiating, so forces and stress are derivatives of the sum
            E = E_model + E_extra. It must compute its geometry from ``batch.positions`` and
            ``batch.cell`` (its pair list may come from the unstrained batch).

    Returns:
        Prediction(energy, energies, forces or None, stress or None).

    Raises:
        ValueError: stress requested for a structure whose cell has zero volume.

    The caller's ``batch`` is not modified: gradients are taken with respect to fresh leaf
    copies of its positions and of a zero strain.
    """
    need_grad = compute_forces or compute_stress
    volume = _check_volumes(batch.cell) if compute_stress else None

    with contextlib.ExitStack() as stack:
        # Inference callers often run under no_grad / inference_mode; derivatives need autograd.
        if need_grad:
            stack.enter_context(torch.enable_grad())

        positions = batch.positions
        cell = batch.cell
        inputs: list[Tensor] = []
        if compute_forces:
            # A fresh leaf: the caller's tensor keeps requires_grad=False and no .grad appears.
            positions = positions.detach().requires_grad_(True)
            inputs.append(positions)
        strain0 = None
        if compute_stress:
            strain0 = torch.zeros(
                batch.n_systems, 3, 3, dtype=positions.dtype, device=positions.device,
                requires_grad=True,
            )
            inputs.append(strain0)
            positions, cell = apply_strain(
                positions, cell, symmetrize(strain0), batch.system_idx
            )
        work = batch.replace(positions=positions, cell=cell) if need_grad else batch
        out = model(work, graph)
        energy, energies = out.energy, out.energies
        if extra_energy is not None:
            extra = extra_energy(work)
            energy = energy + extra.energy.to(energy.dtype)
            energies = energies + extra.energies.to(energies.dtype)

        forces = stress = None
        if need_grad:
            # create_graph=False frees the graph after this call; sum over systems is fine because
            # E_A does not depend on atoms of B (tested in tests/physics). Without any edge the
            # energy is a constant (sum of references): every derivative is zero.
            if energy.requires_grad:
                grads = torch.autograd.grad(
                    energy.sum(), inputs, create_graph=create_graph, allow_unused=True
                )
            else:
                grads = [None] * len(inputs)
            k = 0
            if compute_forces:
                g = grads[k]
                forces = -g if g is not None else torch.zeros_like(batch.positions)
                k += 1
            if compute_stress:
                g = grads[k]
                if g is None:
                    g = torch.zeros_like(strain0)
                stress = g / volume.to(g.dtype)[:, None, None]

    if not create_graph:
        energy, energies = energy.detach(), energies.detach()
        forces = forces.detach() if forces is not None else None
        stress = stress.detach() if stress is not None else None
    return Prediction(energy=energy, energies=energies, forces=forces, stress=stress)
