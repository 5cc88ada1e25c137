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

For an energy that depends on the positions only through the edge vectors r_e = r_j - r_i + s_e
(every EST energy does), the same derivatives follow from g_e = dE/dr_e alone
(:func:`edge_forces_virial`, what a deployed package computes inside, ``est_calc.deploy``):

    F_k = sum_{e: i_e = k} g_e - sum_{e: j_e = k} g_e
    W   = -sym(sum_e r_e (x) g_e) = -dE/de = -V sigma       (virial, eV)
    W_k = (1/2) sum_{e: i_e = k or j_e = k} -sym(r_e (x) g_e)   (per-atom virial, sum_k W_k = W)

since r_e' = r_e (I + e) under the strain. No cell enters: periodic images, ghost atoms with real
positions and zero shifts, and ASE's unit shifts times the cell all give the same r_e.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from est_calc.batch import AtomsBatch
from est_calc.geometry import apply_strain, cell_volume, symmetrize

__all__ = ["EdgeDerivatives", "Prediction", "edge_forces_virial", "energy_forces_stress"]


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


class EdgeDerivatives(NamedTuple):
    """Forces and virials of an energy of the edge vectors (:func:`edge_forces_virial`).

    Attributes:
        forces: (n_atoms, 3) eV/Å.
        atom_virial: (n_atoms, 3, 3) eV, symmetric; half of every edge's term to each end.
    """

    forces: Tensor
    atom_virial: Tensor


def edge_forces_virial(energy: Tensor, vectors: Tensor, edge_index: Tensor, n_atoms: int, *,
                       create_graph: bool = False) -> EdgeDerivatives:
    """F_k and W_k (module docstring) of a scalar ``energy`` that depends on the positions only
    through the edge vectors ``vectors`` (E, 3) Å of ``edge_index`` (2, E) (rows i, j with
    r_e = r_j - r_i + s_e).

    ``vectors`` must require grad and be what ``energy`` was computed from. The total virial is
    ``atom_virial.sum(0)`` (per structure: summed over its atoms), and the stress of a cell of
    volume V is -W / V, the ASE sign.
    """
    if energy.requires_grad and vectors.shape[0] > 0:
        (g,) = torch.autograd.grad(energy, [vectors], create_graph=create_graph,
                                   allow_unused=True)
        if g is None:
            g = torch.zeros_like(vectors)
    else:
        g = torch.zeros_like(vectors)
    i, j = edge_index[0], edge_index[1]
    forces = vectors.new_zeros(n_atoms, 3).index_add(0, i, g).index_add(0, j, -g)
    w = -0.5 * symmetrize(vectors.unsqueeze(-1) * g.unsqueeze(-2))  # (E, 3, 3), half per end
    atom_virial = vectors.new_zeros(n_atoms, 3, 3).index_add(0, i, w).index_add(0, j, w)
    return EdgeDerivatives(forces, atom_virial)


def _check_volumes(cell: Tensor) -> Tensor:
    """(n_systems,) |det cell|; raises ValueError when a cell has (numerically) zero volume
    (:func:`est_calc.neighbors.degenerate_cells` of all three lattice vectors).

    While a CUDA graph is being captured (:mod:`est_calc.accel.graphs`, whose caller checks the
    cell before every replay) or a graph traced (the compiled training step,
    training/compiled.py, whose caller checks every batch's cells) the volume is the triple
    product |a . (b x c)| and nothing is checked: neither can read a value back to the host.
    """
    capturing = cell.is_cuda and torch.cuda.is_current_stream_capturing()
    if torch.compiler.is_compiling() or capturing:
        a, b, c = cell.detach().unbind(-2)
        return (a * torch.linalg.cross(b, c, dim=-1)).sum(-1).abs()
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

    A model with ``differentiates_itself = True`` (a deployed package,
    :class:`est_calc.deploy.DeployedPotential`) returns its own forces and virials from
    ``model.derivatives(batch, graph)`` (energy (n_systems,), energies (n_atoms,), forces
    (n_atoms, 3), virial (n_systems, 3, 3) eV); the stress is -virial / V, and the derivatives
    of ``extra_energy`` are added by autograd. Such a model has no second derivatives
    (``create_graph=True`` raises ValueError).
    """
    if getattr(model, "differentiates_itself", False):
        return _self_differentiated(model, batch, graph, compute_forces=compute_forces,
                                    compute_stress=compute_stress, create_graph=create_graph,
                                    extra_energy=extra_energy)
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


def _self_differentiated(model, batch: AtomsBatch, graph, *, compute_forces: bool,
                         compute_stress: bool, create_graph: bool, extra_energy) -> Prediction:
    """:func:`energy_forces_stress` of a model that returns its own derivatives."""
    if create_graph:
        raise ValueError(
            f"{type(model).__name__} returns first derivatives only; create_graph=True (training "
            "on forces or stress) needs the Potential it was exported from")
    volume = _check_volumes(batch.cell) if compute_stress else None
    out = model.derivatives(batch, graph)
    energy, energies, forces = out.energy, out.energies, out.forces
    stress = -out.virial / volume.to(out.virial.dtype)[:, None, None] if compute_stress else None
    if extra_energy is not None:
        extra = energy_forces_stress(lambda work, _graph: extra_energy(work), batch, graph,
                                     compute_forces=compute_forces,
                                     compute_stress=compute_stress)
        energy = energy + extra.energy.to(energy.dtype)
        energies = energies + extra.energies.to(energies.dtype)
        if compute_forces:
            forces = forces + extra.forces.to(forces.dtype)
        if compute_stress:
            stress = stress + extra.stress.to(stress.dtype)
    return Prediction(energy=energy.detach(), energies=energies.detach(),
                      forces=forces.detach() if compute_forces else None,
                      stress=stress.detach() if stress is not None else None)
