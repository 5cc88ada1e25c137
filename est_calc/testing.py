"""Reusable physics checks for any energy model with the ``model(batch, graph)`` signature.

Run them on your own potential (in float64 for the finite-difference checks)::

    pot = load_potential("my.pt", dtype=torch.float64)
    check_forces_fd(pot, atoms)             # raises AssertionError if F != -dE/dr
    check_stress_fd(pot, atoms)             # periodic cells only
    check_rotation(pot, atoms, tol=1e-5)    # grid models are equivariant only up to the grid
    check_batched_equals_single(pot, [a, b, c])

Each check returns the error it measured (a float; relative errors are scaled by the largest
reference value) and raises ``AssertionError`` when it exceeds ``tol`` (pass ``tol=None`` to only
measure). ``atoms`` may be an ``ase.Atoms``, a list of them, or an ``AtomsBatch``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from est_calc.batch import AtomsBatch
from est_calc.forces import Prediction, energy_forces_stress

__all__ = [
    "reference_graph",
    "predict",
    "rotation_errors",
    "check_forces_fd",
    "check_stress_fd",
    "check_rotation",
    "check_batched_equals_single",
    "check_no_cross_talk",
]

GraphFn = Callable[[AtomsBatch], object]


def reference_graph(batch: AtomsBatch, cutoff_A: float):
    """Neighbour graph built with ``ase.neighborlist.neighbor_list("ijS")`` (slow, independent).

    Returns an ``est_calc.neighbors.Graph`` with edges grouped by structure, offsets into the
    flat atom index.
    """
    from ase import Atoms
    from ase.neighborlist import neighbor_list

    from est_calc.neighbors import Graph

    pos = batch.positions.detach().cpu().double().numpy()
    cell = batch.cell.detach().cpu().double().numpy()
    pbc = batch.pbc.cpu().numpy()
    sidx = batch.system_idx.cpu().numpy()
    ei, sh = [], []
    for s in range(batch.n_systems):
        idx = np.nonzero(sidx == s)[0]
        atoms = Atoms(positions=pos[idx], cell=cell[s], pbc=pbc[s])
        i, j, shift = neighbor_list("ijS", atoms, float(cutoff_A), self_interaction=False)
        ei.append(np.stack([idx[i], idx[j]]))
        sh.append(shift)
    edge_index = torch.from_numpy(np.concatenate(ei, axis=1).astype(np.int64))
    shifts = torch.from_numpy(np.concatenate(sh, axis=0).astype(np.int64))
    return Graph(edge_index=edge_index.to(batch.device), shifts=shifts.to(batch.device))


def _cutoff(model) -> float:
    for obj in (model, getattr(model, "config", None), getattr(model, "model", None)):
        if obj is not None and hasattr(obj, "cutoff_A"):
            return float(obj.cutoff_A)
    raise ValueError("cannot find cutoff_A on the model; pass graph_fn explicitly")


def _default_graph_fn(model) -> GraphFn:
    cutoff = _cutoff(model)
    try:
        from est_calc.neighbors import build_graph
    except ImportError:  # the fast builder is optional for these checks
        return lambda b: reference_graph(b, cutoff)
    return lambda b: build_graph(b, cutoff)


def _model_dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float64


def _as_batch(model, atoms) -> AtomsBatch:
    if isinstance(atoms, AtomsBatch):
        return atoms
    dev = next(model.parameters()).device
    return AtomsBatch.from_atoms(atoms, device=dev, dtype=_model_dtype(model))


def predict(model, batch: AtomsBatch, graph_fn: Optional[GraphFn] = None, **kw) -> Prediction:
    """``energy_forces_stress`` with a freshly built graph; ``kw`` as for that function."""
    graph_fn = graph_fn or _default_graph_fn(model)
    return energy_forces_stress(model, batch, graph_fn(batch), **kw)


def _energy(model, batch, graph_fn) -> Tensor:
    return predict(model, batch, graph_fn, compute_forces=False).energy


def _variant_energies(model, batch, variants, graph_fn, chunk: int = 32) -> Tensor:
    """Energies (n_variants, n_systems) of copies of ``batch`` with other (positions, cell).

    The copies are evaluated together, ``chunk`` at a time, as one batch of independent
    structures (cheaper than one call each for the small structures of these checks).
    """
    out = []
    n, b = batch.n_atoms, batch.n_systems
    for start in range(0, len(variants), chunk):
        part = variants[start:start + chunk]
        k = len(part)
        stacked = AtomsBatch(
            positions=torch.cat([p for p, _ in part]),
            atomic_numbers=batch.atomic_numbers.repeat(k),
            cell=torch.cat([c for _, c in part]),
            pbc=batch.pbc.repeat(k, 1),
            system_idx=(
                batch.system_idx[None, :] + b * torch.arange(k, device=batch.device)[:, None]
            ).reshape(k * n),
        )
        out.append(_energy(model, stacked, graph_fn).reshape(k, b))
    return torch.cat(out)


def _report(name: str, err: float, tol: Optional[float]) -> float:
    if tol is not None and not err <= tol:
        raise AssertionError(f"{name}: error {err:.3e} exceeds tolerance {tol:.1e}")
    return err


def check_forces_fd(
    model, atoms, *, h_A: float = 1e-5, atom_indices: Optional[Sequence[int]] = None,
    graph_fn: Optional[GraphFn] = None, tol: Optional[float] = 1e-6,
) -> float:
    """Forces against central differences of the energy, max|F - F_fd| / max|F|.

    The graph is rebuilt for every displaced structure, so a model whose energy jumps when an
    edge enters or leaves the cutoff fails too. Run in float64.

    Args:
        h_A: displacement in Å.
        atom_indices: atoms to displace (default: all; each costs 6 energy evaluations).
    """
    batch = _as_batch(model, atoms)
    graph_fn = graph_fn or _default_graph_fn(model)
    forces = predict(model, batch, graph_fn).forces
    idx = list(range(batch.n_atoms) if atom_indices is None else atom_indices)
    variants = []
    for a in idx:
        for c in range(3):
            for sign in (1.0, -1.0):
                pos = batch.positions.clone()
                pos[a, c] += sign * h_A
                variants.append((pos, batch.cell))
    energy = _variant_energies(model, batch, variants, graph_fn).sum(dim=1).reshape(-1, 3, 2)
    fd = -(energy[..., 0] - energy[..., 1]) / (2 * h_A)  # (len(idx), 3)
    err = float((fd - forces[idx]).abs().max())
    scale = max(float(forces[idx].abs().max()), 1e-12)
    return _report("forces vs finite differences", err / scale, tol)


def check_stress_fd(
    model, atoms, *, h: float = 1e-5, graph_fn: Optional[GraphFn] = None,
    tol: Optional[float] = 1e-6,
) -> float:
    """Stress against central differences in a symmetric strain, max|s - s_fd| / max|s|.

    For each pair (a, b) the strain e_ab = e_ba = h/2 (a != b) or e_aa = h deforms positions
    and cell together; sigma_ab = (1/V) dE/dh. Every structure needs a non-zero volume.
    """
    from est_calc.geometry import apply_strain, cell_volume

    batch = _as_batch(model, atoms)
    graph_fn = graph_fn or _default_graph_fn(model)
    stress = predict(model, batch, graph_fn, compute_forces=False, compute_stress=True).stress
    volume = cell_volume(batch.cell)
    pairs = [(a, b) for a in range(3) for b in range(a, 3)]
    variants = []
    for a, b in pairs:
        for sign in (1.0, -1.0):
            eps = torch.zeros(batch.n_systems, 3, 3, dtype=batch.dtype, device=batch.device)
            eps[:, a, b] += sign * h / (1 if a == b else 2)
            if a != b:
                eps[:, b, a] += sign * h / 2
            variants.append(apply_strain(batch.positions, batch.cell, eps, batch.system_idx))
    energy = _variant_energies(model, batch, variants, graph_fn).reshape(len(pairs), 2, -1)
    fd = (energy[:, 0] - energy[:, 1]) / (2 * h) / volume  # (6, n_systems)
    err = max(float((fd[k] - stress[:, a, b]).abs().max()) for k, (a, b) in enumerate(pairs))
    scale = max(float(stress.abs().max()), 1e-12)
    return _report("stress vs strain finite differences", err / scale, tol)


def rotation_errors(
    model, atoms, *, n_rotations: int = 3, seed: int = 0, graph_fn: Optional[GraphFn] = None,
    stress: bool = False,
) -> dict:
    """Largest relative errors under random rotations R, as a dict with keys "energy",
    "forces" (and "stress"): max|E(Rx) - E(x)| / max|E|, max|F(Rx) - F(x) R^T| / max|F| and
    max|C' s(Rx) - C s(x) R^T| / max|C s|, where C is the cell (rows a_k) and C' = C R^T the
    rotated one: the vectors a_k s rotate with the structure exactly when s(Rx) = R s(x) R^T.

    The absolute errors are e3nn's ``equivariance_error`` over ``n_rotations`` rotations from
    ``o3.rand_matrix`` (no parity, no translation), with the global CPU random generator seeded
    by ``seed`` for the call and restored afterwards. Positions, cell rows, forces and the a_k s
    are all rotated as Cartesian vectors (row vectors: r -> r R^T) with the rotation matrix
    itself, not a Wigner matrix recomputed from its angles (e3nn's ``D_from_matrix`` is good to
    about 1e-6 only near its angles' poles), so exactly equivariant models measure ~1e-14.
    The graph is rebuilt for every rotated copy.
    """
    from e3nn.util.test import equivariance_error

    batch = _as_batch(model, atoms)
    graph_fn = graph_fn or _default_graph_fn(model)
    names = ["energy", "forces"] + (["stress"] if stress else [])
    vector = "cartesian_points"  # r -> r R^T (+ a translation, never applied here)

    def outputs(positions: Tensor, cell: Tensor) -> list[Tensor]:
        out = predict(model, batch.replace(positions=positions, cell=cell), graph_fn,
                      compute_stress=stress)
        return [out.energy[:, None], out.forces] + ([cell @ out.stress] if stress else [])

    with torch.random.fork_rng(devices=[]):  # o3.rand_matrix draws from the CPU generator
        torch.default_generator.manual_seed(seed)
        errors = equivariance_error(
            outputs, [batch.positions, batch.cell], irreps_in=[vector, vector],
            irreps_out=["0e"] + [vector] * (len(names) - 1), ntrials=n_rotations,
            do_parity=False, do_translation=False,
        )[(0, False)]
    reference = outputs(batch.positions, batch.cell)
    return {name: float(err) / max(float(ref.abs().max()), 1e-12)
            for name, err, ref in zip(names, errors, reference)}


def check_rotation(
    model, atoms, *, n_rotations: int = 3, seed: int = 0, graph_fn: Optional[GraphFn] = None,
    tol: Optional[float] = 1e-6, stress: bool = False,
) -> float:
    """Energy invariance and force (and stress) equivariance under random rotations.

    Returns the largest of the relative errors of :func:`rotation_errors`. Models that work on a
    spherical grid are equivariant only up to the grid resolution: measure first (``tol=None``).
    """
    errs = rotation_errors(model, atoms, n_rotations=n_rotations, seed=seed, graph_fn=graph_fn,
                           stress=stress)
    return _report(f"rotation equivariance {errs}", max(errs.values()), tol)


def check_batched_equals_single(
    model, atoms_list: Sequence, *, graph_fn: Optional[GraphFn] = None, stress: bool = False,
    tol: Optional[float] = 1e-10,
) -> float:
    """One batch of all structures against each structure alone: max abs difference of
    energy (eV), forces (eV/Å) and, if ``stress``, stress (eV/Å^3)."""
    graph_fn = graph_fn or _default_graph_fn(model)
    whole = predict(model, _as_batch(model, list(atoms_list)), graph_fn, compute_stress=stress)
    err, start = 0.0, 0
    for k, atoms in enumerate(atoms_list):
        one = predict(model, _as_batch(model, atoms), graph_fn, compute_stress=stress)
        n = one.forces.shape[0]
        err = max(err, float((one.energy[0] - whole.energy[k]).abs()))
        err = max(err, float((one.forces - whole.forces[start:start + n]).abs().max()))
        if stress:
            err = max(err, float((one.stress[0] - whole.stress[k]).abs().max()))
        start += n
    return _report("batched vs single", err, tol)


def check_no_cross_talk(
    model, atoms_list: Sequence, *, graph_fn: Optional[GraphFn] = None, tol: float = 0.0,
) -> float:
    """max |dE_A / dr_B| over pairs of different structures in one batch (must be exactly 0)."""
    batch = _as_batch(model, list(atoms_list))
    graph_fn = graph_fn or _default_graph_fn(model)
    graph = graph_fn(batch)
    pos = batch.positions.detach().requires_grad_(True)
    energy = model(batch.replace(positions=pos), graph).energy
    err = 0.0
    for k in range(batch.n_systems):
        (g,) = torch.autograd.grad(energy[k], pos, retain_graph=True)
        other = batch.system_idx != k
        err = max(err, float(g[other].abs().max()) if bool(other.any()) else 0.0)
    return _report("gradient leak between structures", err, tol)
