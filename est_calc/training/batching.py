"""From data-set frames to AtomsBatch plus targets, the batches of the training steps, and the
per-element reference fit."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from est_calc.batch import AtomsBatch
from est_calc.geometry import random_rotations

__all__ = ["StepBatches", "Targets", "collate", "fit_element_references", "global_batch",
           "rotate_batch", "step_rotations"]


@dataclass
class Targets:
    """Labels of one batch (tensors on the batch's device).

    Attributes:
        energy: (n_systems,) eV, total or referenced as configured.
        forces: (n_atoms, 3) eV/Å, or None when some frame has no forces.
        stress: (n_systems, 3, 3) eV/Å^3 (zeros where absent); ``has_stress`` marks real ones.
        fixed: (n_atoms,) int64, 1 = fixed atom (OC20 convention).
        n_atoms: (n_systems,) int64.
    """

    energy: Tensor
    forces: Tensor | None
    stress: Tensor
    has_stress: Tensor
    fixed: Tensor
    n_atoms: Tensor

    def to(self, device) -> Targets:
        """The same targets on ``device`` (dtypes unchanged)."""
        return Targets(**{f.name: None if getattr(self, f.name) is None
                          else getattr(self, f.name).to(device) for f in fields(self)})


def frame_energy(frame, energy_mode: str) -> float:
    """The training target of one frame: total energy or energy - reference_energy."""
    if frame.energy is None:
        raise ValueError(f"frame sid={frame.sid} fid={frame.fid} has no energy")
    if energy_mode == "referenced":
        if frame.reference_energy is None:
            raise ValueError(
                f"data.energy='referenced' but frame sid={frame.sid} fid={frame.fid} carries no "
                "reference energy (a .txt sidecar or reference_energy field)"
            )
        return float(frame.energy) - float(frame.reference_energy)
    return float(frame.energy)


def collate(frames: Sequence, energy_mode: str, device, dtype) -> tuple[AtomsBatch, Targets]:
    """Pack frames into one AtomsBatch and its targets."""
    pos, num, cell, pbc, forces, fixed, stress, has_stress = ([] for _ in range(8))
    energies = []
    have_forces = all(f.forces is not None for f in frames)
    for f in frames:
        n = len(f.numbers)
        pos.append(f.positions)
        num.append(f.numbers)
        cell.append(f.cell)
        pbc.append(f.pbc)
        energies.append(frame_energy(f, energy_mode))
        if have_forces:
            forces.append(np.asarray(f.forces, dtype=np.float64))
        fx = np.zeros(n, dtype=np.int64) if f.fixed is None else np.asarray(f.fixed, dtype=np.int64)
        fixed.append(fx)
        if f.stress is not None:
            stress.append(np.asarray(f.stress, dtype=np.float64).reshape(3, 3))
            has_stress.append(True)
        else:
            stress.append(np.zeros((3, 3)))
            has_stress.append(False)
    batch = AtomsBatch.from_arrays(pos, num, cell, pbc, device=device, dtype=dtype)
    targets = Targets(
        energy=torch.tensor(energies, dtype=dtype, device=device),
        forces=(
            torch.from_numpy(np.concatenate(forces)).to(device=device, dtype=dtype)
            if have_forces
            else None
        ),
        stress=torch.from_numpy(np.stack(stress)).to(device=device, dtype=dtype),
        has_stress=torch.tensor(has_stress, device=device),
        fixed=torch.from_numpy(np.concatenate(fixed)).to(device),
        n_atoms=batch.atoms_per_system(),
    )
    return batch, targets


def global_batch(step: int, n_frames: int, batch_size: int, seed: int) -> list[int]:
    """Frame indices of training step ``step``'s global batch (all processes together).

    Epoch e = step // (n_frames // batch_size) walks through the permutation drawn by
    ``np.random.default_rng([seed, e])``, ``batch_size`` frames a step (the remainder of an
    epoch is left out); with fewer frames than one batch, the permutation is cycled. A pure
    function of its arguments, so a resumed or data-parallel run sees the same batches.
    """
    per_epoch = max(n_frames // batch_size, 1)
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n_frames)
    idx = perm[k * batch_size:(k + 1) * batch_size]
    if len(idx) < batch_size:  # fewer frames than one batch: cycle through them
        idx = np.resize(perm, batch_size)
    return idx.tolist()


def step_rotations(step: int, n: int, seed: int) -> Tensor:
    """(n, 3, 3) float64 rotations of training step ``step``'s global batch, a pure function of
    (seed, step)."""
    return random_rotations(n, torch.float64,
                            generator=torch.Generator().manual_seed(seed * 1_000_003 + step))


class StepBatches(torch.utils.data.Dataset):
    """A map-style dataset whose item ``step`` is this process's share of that training step.

    Item ``step`` is ``(step, batch, targets, rotations)``: the frames ``k = rank, rank +
    world, ...`` of :func:`global_batch`'s list, collated on the CPU in ``dtype``
    (:func:`collate`), and their rows of :func:`step_rotations`. Every item is a pure function
    of ``step``, so a ``torch.utils.data.DataLoader`` over it, with any number of workers and
    a sampler counting up from the current step, yields what reading in the training process
    yields, in the same order. Picklable (the readers re-open their files in a worker).

    Args:
        frames: the training frames (a sequence of :class:`Frame`).
        batch_size: frames per step, all processes together.
        seed: ``train.seed``.
        energy_mode: ``data.energy``.
        dtype: floating dtype of the batch and targets.
        rank, world: this process's rank and the number of processes.
    """

    def __init__(self, frames, *, batch_size: int, seed: int, energy_mode: str,
                 dtype: torch.dtype, rank: int = 0, world: int = 1):
        self.frames, self.batch_size, self.seed = frames, batch_size, seed
        self.energy_mode, self.dtype, self.rank, self.world = energy_mode, dtype, rank, world

    def __getitem__(self, step: int) -> tuple[int, AtomsBatch, Targets, Tensor]:
        gidx = global_batch(step, len(self.frames), self.batch_size, self.seed)
        rot = step_rotations(step, len(gidx), self.seed)
        mine = list(range(self.rank, len(gidx), self.world))
        batch, targets = collate([self.frames[gidx[k]] for k in mine], self.energy_mode, "cpu",
                                 self.dtype)
        return step, batch, targets, rot[mine]


def rotate_batch(batch: AtomsBatch, targets: Targets, rot: Tensor) -> tuple[AtomsBatch, Targets]:
    """Rotate every structure k by rot[k] (row vectors: r' = r R).

    Energies are unchanged, forces rotate like positions and stress as R^T s R. Training on
    randomly rotated structures with a fixed sampling lattice is the same as training with a
    randomly rotated lattice (stochastic frame averaging of the grid's discretisation error).
    """
    rot = rot.to(device=batch.device, dtype=batch.dtype)
    r_atom = rot[batch.system_idx]
    pos = torch.einsum("na,nab->nb", batch.positions, r_atom)
    cell = torch.bmm(batch.cell, rot)
    forces = None
    if targets.forces is not None:
        forces = torch.einsum("na,nab->nb", targets.forces, r_atom)
    stress = torch.einsum("kba,kbc,kcd->kad", rot, targets.stress, rot)
    new_targets = Targets(
        energy=targets.energy,
        forces=forces,
        stress=stress,
        has_stress=targets.has_stress,
        fixed=targets.fixed,
        n_atoms=targets.n_atoms,
    )
    return batch.replace(positions=pos, cell=cell), new_targets


def fit_element_references(
    frames: Sequence, energy_mode: str, species: Sequence[int], max_frames: int = 20000
) -> np.ndarray:
    """Per-element energies E_Z minimising sum_frames (E - sum_i E_Z(i))^2 (least squares).

    Returns:
        (119,) array with the fitted values at the indices of ``species`` and zeros elsewhere.
    """
    species = sorted(set(int(z) for z in species))
    col = {z: k for k, z in enumerate(species)}
    n = min(len(frames), max_frames)
    counts = np.zeros((n, len(species)))
    energies = np.zeros(n)
    for r in range(n):
        f = frames[r]
        for z, c in zip(*np.unique(np.asarray(f.numbers), return_counts=True)):
            counts[r, col[int(z)]] = c
        energies[r] = frame_energy(f, energy_mode)
    coef, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    out = np.zeros(119)
    for z, k in col.items():
        out[z] = coef[k]
    return out
