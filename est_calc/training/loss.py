"""Training loss: energy per atom + forces (+ stress), L1 / L2 / Huber.

Every term is a *sum* over its items divided by an explicit count, so that data-parallel ranks can
divide by the global count and sum gradients, which reproduces the single-process loss exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LossTerms", "elementwise", "loss_counts", "loss_terms"]


def elementwise(diff: Tensor, kind: str, delta: float) -> Tensor:
    """Per-element penalty of a difference: l2 = d^2, l1 = |d|, huber with ``delta``."""
    if kind == "l2":
        return diff**2
    if kind == "l1":
        return diff.abs()
    if kind == "huber":
        a = diff.abs()
        return torch.where(a < delta, 0.5 * diff**2 / delta, a - 0.5 * delta)
    raise ValueError(f"unknown loss kind {kind!r}; choose l1, l2 or huber")


@dataclass
class LossTerms:
    """Sums and counts of each loss term for one batch (counts are plain floats)."""

    energy_sum: Tensor
    energy_count: float
    force_sum: Tensor
    force_count: float
    stress_sum: Tensor
    stress_count: float

    def total(self, w_e: float, w_f: float, w_s: float, counts: tuple[float, float, float]) -> Tensor:
        """Weighted loss, each sum divided by the given (possibly global) counts."""
        ce, cf, cs = (max(c, 1.0) for c in counts)
        return w_e * self.energy_sum / ce + w_f * self.force_sum / cf + w_s * self.stress_sum / cs


def loss_counts(n_systems: int, force_mask: Tensor | None, has_stress: Tensor | None
                ) -> tuple[float, float, float]:
    """The items each term's sum runs over: (structures, 3 x atoms in ``force_mask``, 9 x
    structures in ``has_stress``); a mask of None means the term is not in the loss (count 0)."""
    return (float(n_systems),
            3.0 * float(force_mask.sum()) if force_mask is not None else 0.0,
            9.0 * float(has_stress.sum()) if has_stress is not None else 0.0)


def loss_terms(
    pred,
    energy: Tensor,
    forces: Tensor | None,
    stress: Tensor | None,
    has_stress: Tensor | None,
    n_atoms: Tensor,
    force_mask: Tensor,
    kind: str = "l2",
    delta: float = 0.01,
) -> LossTerms:
    """Loss sums of one batch.

    Args:
        pred: :class:`est_calc.forces.Prediction`.
        energy: (n_systems,) target energies (eV).
        forces: (n_atoms, 3) target forces or None.
        stress: (n_systems, 3, 3) target stress or None; ``has_stress`` (n_systems,) bool marks
            the structures that carry one.
        n_atoms: (n_systems,) atoms per structure (energy loss is per atom).
        force_mask: (n_atoms,) bool, atoms whose forces enter the loss.
    """
    de = (pred.energy - energy) / n_atoms.to(energy.dtype)
    e_sum = elementwise(de, kind, delta).sum()
    zero = e_sum.new_zeros(())
    f_sum = s_sum = zero
    with_forces = forces is not None and pred.forces is not None
    if with_forces:
        f_sum = elementwise((pred.forces - forces)[force_mask], kind, delta).sum()
    with_stress = (stress is not None and pred.stress is not None and has_stress is not None
                   and bool(has_stress.any()))
    if with_stress:
        s_sum = elementwise((pred.stress - stress)[has_stress], kind, delta).sum()
    counts = loss_counts(energy.shape[0], force_mask if with_forces else None,
                         has_stress if with_stress else None)
    return LossTerms(e_sum, counts[0], f_sum, counts[1], s_sum, counts[2])
