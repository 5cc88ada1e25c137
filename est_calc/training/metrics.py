"""OC20 S2EF metrics, computed as fairchem's evaluator computes them.

Definitions (see ../shared/OC20_FORMATS.md section 2):

* energy MAE: mean over systems of |E_pred - E_target| (eV).
* force MAE: mean of |F_pred - F_target| over the free atoms (``fixed == 0``) and all three
  components (eV/Å); ``forces_x/y/z_mae`` per component. Force RMSE: the root of the mean of
  the squares over the same components (the molecular literature's headline figure).
* energy RMSE (eV per structure) and per-atom energy MAE/RMSE (eV/atom).
* force cosine: cosine similarity between the predicted and target 3-vectors of each free atom
  (eps 1e-8), averaged over free atoms.
* force magnitude error: mean over free atoms of | |F_pred| - |F_target| |.
* EwT: fraction of systems with |dE| < 0.02 eV.
* EFwT: fraction of systems with |dE| < 0.02 eV and max |dF| < 0.03 eV/Å, the max taken over
  every component of every free atom of the system (strict inequalities).

All are averages over elements (``total / count``), accumulated across batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["S2EFMetrics", "ENERGY_THRESHOLD_eV", "FORCE_THRESHOLD_eV_per_A", "format_metrics"]

ENERGY_THRESHOLD_eV = 0.02
FORCE_THRESHOLD_eV_per_A = 0.03


@dataclass
class S2EFMetrics:
    """Accumulates OC20 S2EF metrics over batches.

    Example:
        >>> m = S2EFMetrics()
        >>> m.update(e_pred, e_true, f_pred, f_true, system_idx, fixed)   # doctest: +SKIP
        >>> m.compute()["forces_mae"]                                     # doctest: +SKIP
    """

    free_atoms_only: bool = True
    _sums: dict = field(default_factory=dict)
    _counts: dict = field(default_factory=dict)

    def _add(self, key: str, total: float, count: int) -> None:
        self._sums[key] = self._sums.get(key, 0.0) + float(total)
        self._counts[key] = self._counts.get(key, 0) + int(count)

    @torch.no_grad()
    def update(
        self,
        energy_pred: Tensor,
        energy_true: Tensor,
        forces_pred: Tensor | None = None,
        forces_true: Tensor | None = None,
        system_idx: Tensor | None = None,
        fixed: Tensor | None = None,
        n_atoms: Tensor | None = None,
    ) -> None:
        """Add one batch.

        Args:
            energy_pred, energy_true: (n_systems,) eV.
            forces_pred, forces_true: (n_atoms, 3) eV/Å, or None for energy-only data.
            system_idx: (n_atoms,) structure of each atom.
            fixed: (n_atoms,) 1 for fixed atoms; ignored when ``free_atoms_only`` is False.
            n_atoms: (n_systems,) atoms per structure, for the per-atom energy MAE.
        """
        de = (energy_pred.double() - energy_true.double()).abs()
        n_sys = de.shape[0]
        self._add("energy_mae", de.sum(), n_sys)
        self._add("energy_mse", (de**2).sum(), n_sys)
        if n_atoms is not None:
            self._add("energy_per_atom_mae", (de / n_atoms.double()).sum(), n_sys)
            self._add("energy_per_atom_mse", ((de / n_atoms.double()) ** 2).sum(), n_sys)
        ewt = de < ENERGY_THRESHOLD_eV
        self._add("energy_within_threshold", ewt.sum(), n_sys)
        if forces_pred is None or forces_true is None:
            return
        if system_idx is None:
            raise ValueError("system_idx is required to compute force metrics")
        free = torch.ones(forces_true.shape[0], dtype=torch.bool, device=forces_true.device)
        if self.free_atoms_only and fixed is not None:
            free = fixed == 0
        fp = forces_pred.double()[free]
        ft = forces_true.double()[free]
        sidx = system_idx[free]
        df = (fp - ft).abs()
        n_free = fp.shape[0]
        self._add("forces_mae", df.sum(), 3 * n_free)
        self._add("forces_mse", (df**2).sum(), 3 * n_free)
        for c, name in enumerate("xyz"):
            self._add(f"forces_{name}_mae", df[:, c].sum(), n_free)
        cos = torch.nn.functional.cosine_similarity(fp, ft, dim=1, eps=1e-8).float()
        self._add("forces_cosine_similarity", cos.sum(), n_free)
        mag = (fp.norm(dim=1) - ft.norm(dim=1)).abs()
        self._add("forces_magnitude_error", mag.sum(), n_free)
        # Per-system max component error over free atoms; systems without free atoms count
        # with a max of 0 (fairchem would skip them; none occur in OC20).
        max_df = torch.zeros(n_sys, dtype=df.dtype, device=df.device)
        if n_free:
            max_df = max_df.scatter_reduce(0, sidx, df.max(dim=1).values, "amax")
        efwt = ewt & (max_df < FORCE_THRESHOLD_eV_per_A)
        self._add("energy_forces_within_threshold", efwt.sum(), n_sys)

    def compute(self) -> dict[str, float]:
        """Metric name -> value (averages over everything seen so far); every ``*_mse`` also
        gives its root, ``*_rmse``."""
        out = {k: self._sums[k] / max(self._counts[k], 1) for k in self._sums}
        for k in [k for k in out if k.endswith("_mse")]:
            out[k[:-4] + "_rmse"] = out[k] ** 0.5
        return out

    def reset(self) -> None:
        self._sums.clear()
        self._counts.clear()

    def merge_from(self, other: "S2EFMetrics") -> None:
        """Add another accumulator's totals (e.g. gathered from other ranks)."""
        for k, v in other._sums.items():
            self._add(k, v, other._counts[k])

    def state(self) -> dict[str, list[float]]:
        """Plain sums and counts, e.g. for an all-reduce across ranks."""
        return {k: [self._sums[k], float(self._counts[k])] for k in sorted(self._sums)}


_LABELS = {
    "energy_mae": ("energy MAE", "eV", 1.0),
    "energy_per_atom_mae": ("energy MAE per atom", "meV/atom", 1000.0),
    "energy_rmse": ("energy RMSE", "meV", 1000.0),
    "energy_per_atom_rmse": ("energy RMSE per atom", "meV/atom", 1000.0),
    "forces_mae": ("force MAE", "eV/Å", 1.0),
    "forces_rmse": ("force RMSE", "meV/Å", 1000.0),
    "forces_cosine_similarity": ("force cosine", "", 1.0),
    "forces_magnitude_error": ("force magnitude error", "eV/Å", 1.0),
    "energy_within_threshold": ("EwT", "%", 100.0),
    "energy_forces_within_threshold": ("EFwT", "%", 100.0),
}


def format_metrics(metrics: dict[str, float], title: str | None = None) -> str:
    """A markdown table of the headline metrics."""
    lines = []
    if title:
        lines.append(f"{title}\n")
    lines += ["| metric | value | unit |", "|---|---|---|"]
    for key, (label, unit, scale) in _LABELS.items():
        if key in metrics:
            lines.append(f"| {label} | {metrics[key] * scale:.4f} | {unit} |")
    return "\n".join(lines)
