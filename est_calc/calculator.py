"""ESTCalculator: a thin ASE adaptor over AtomsBatch, build_graph and energy_forces_stress.

The calculator converts ``ase.Atoms`` into an :class:`~est_calc.batch.AtomsBatch`, builds the graph
where the model runs, calls :func:`~est_calc.forces.energy_forces_stress` and fills ``results`` in
ASE units (eV, eV/Å, eV/Å^3, Voigt order xx yy zz yz xz xy). It holds no training code and no
model-type branches.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from ase.calculators.calculator import (
    Calculator,
    PropertyNotImplementedError,
    all_changes,
)
from ase.data import chemical_symbols

from est_calc.batch import AtomsBatch
from est_calc.forces import energy_forces_stress
from est_calc.neighbors import build_graph
from est_calc.potential import Potential, load_potential

__all__ = ["ESTCalculator", "resolve_device", "resolve_dtype"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" -> CUDA when available, else CPU; anything else is passed to torch.device."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """"float32" / "float64" (or the torch dtypes themselves)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def _voigt(stress: np.ndarray) -> np.ndarray:
    """(3, 3) -> (6,) in ASE's Voigt order xx yy zz yz xz xy."""
    return np.array(
        [stress[0, 0], stress[1, 1], stress[2, 2], stress[1, 2], stress[0, 2], stress[0, 1]]
    )


class ESTCalculator(Calculator):
    """ASE calculator for EST potentials.

    Args:
        model: a registry name ("default" is the shipped default potential), a path to a
            potential file, or a :class:`~est_calc.potential.Potential`.
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
        dtype: "float32" (default) or "float64".
        neighbor_backend: backend of :func:`est_calc.neighbors.neighbor_list` ("auto", "torch",
            "vesin", "matscipy", "torch_cluster").
        compile: not offered yet; ``True`` raises rather than silently dropping stress.

    Example:
        >>> from ase.build import fcc111
        >>> atoms = fcc111("Cu", (3, 3, 4), vacuum=10.0)
        >>> atoms.calc = ESTCalculator()           # doctest: +SKIP
        >>> atoms.get_potential_energy()           # doctest: +SKIP
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(
        self,
        model: str | Potential = "default",
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "float32",
        neighbor_backend: str = "auto",
        compile: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if compile:
            raise NotImplementedError(
                "compile=True is not offered yet: the eager model is the reference, and a "
                "compiled path must keep stress (see the Performance issue)."
            )
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        if isinstance(model, Potential):
            potential = model.to(device=self.device, dtype=self.dtype)
        else:
            potential = load_potential(model, device=self.device, dtype=self.dtype)
        potential.eval()
        for p in potential.parameters():
            p.requires_grad_(False)
        self.potential = potential
        self.neighbor_backend = neighbor_backend
        self.n_model_calls = 0  # how often the network ran (caching is observable)

    @property
    def cutoff_A(self) -> float:
        return float(self.potential.cutoff_A)

    # ------------------------------------------------------------------ checks
    def _check_atoms(self, atoms) -> None:
        if len(atoms) == 0:
            raise ValueError("ESTCalculator got an empty Atoms object (no atoms to evaluate)")
        pos = atoms.get_positions()
        if not np.all(np.isfinite(pos)):
            bad = np.where(~np.isfinite(pos).all(axis=1))[0]
            raise ValueError(f"positions contain NaN or infinite values (atoms {bad[:10].tolist()})")
        cell = atoms.get_cell().array
        if not np.all(np.isfinite(cell)):
            raise ValueError("the cell contains NaN or infinite values")
        pbc = atoms.get_pbc()
        if pbc.any():
            # Each periodic lattice vector must be non-zero, and a fully periodic cell must
            # have a non-zero volume.
            lengths = np.linalg.norm(cell, axis=1)
            if np.any(lengths[pbc] < 1e-8):
                raise ValueError(
                    f"zero-length lattice vector along a periodic axis (pbc={pbc.tolist()}, "
                    f"cell lengths={lengths.round(6).tolist()})"
                )
            if pbc.all() and abs(np.linalg.det(cell)) < 1e-8:
                raise ValueError("zero-volume cell for a periodic system")
        self.potential.check_species(atoms.get_atomic_numbers())

    # ------------------------------------------------------------------ core
    def _predict(self, atoms_list: Sequence, compute_stress: bool):
        batch = AtomsBatch.from_atoms(list(atoms_list), device=self.device, dtype=self.dtype)
        graph = build_graph(batch, self.cutoff_A, backend=self.neighbor_backend)
        self.n_model_calls += 1
        pred = energy_forces_stress(
            self.potential, batch, graph, compute_stress=compute_stress, create_graph=False
        )
        return batch, pred

    @staticmethod
    def _results_for(pred, batch: AtomsBatch, k: int, with_stress: bool) -> dict:
        mask = (batch.system_idx == k).cpu().numpy()
        energy = float(pred.energy[k].detach().cpu().double())
        res = {
            "energy": energy,
            "free_energy": energy,
            "energies": pred.energies.detach().cpu().double().numpy()[mask],
            "forces": pred.forces.detach().cpu().double().numpy()[mask],
        }
        if with_stress:
            res["stress"] = _voigt(pred.stress[k].detach().cpu().double().numpy())
        for key, value in res.items():
            if not np.all(np.isfinite(value)):
                raise FloatingPointError(
                    f"the model produced a non-finite {key}; refusing to return it"
                )
        return res

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        """Standard ASE entry point; see :class:`ase.calculators.calculator.Calculator`."""
        super().calculate(atoms, properties, system_changes)
        self._check_atoms(self.atoms)
        want_stress = "stress" in properties
        if want_stress and not self.atoms.pbc.any():
            raise PropertyNotImplementedError(
                "stress is only defined for periodic systems (atoms.pbc is all False)"
            )
        batch, pred = self._predict([self.atoms], compute_stress=want_stress)
        self.results = self._results_for(pred, batch, 0, want_stress)

    def calculate_batch(
        self, atoms_list: Sequence, properties: Iterable[str] = ("energy", "forces")
    ) -> list[dict]:
        """Evaluate many structures in one forward pass.

        Args:
            atoms_list: structures (any mix of sizes, cells and periodicity).
            properties: names from :attr:`implemented_properties`; "stress" is computed for
                every structure and returned for the periodic ones.

        Returns:
            One dict of results per structure, identical (to float round-off) to what
            one-at-a-time ``calculate`` calls give.
        """
        properties = set(properties)
        unknown = properties - set(self.implemented_properties)
        if unknown:
            raise ValueError(
                f"unknown properties {sorted(unknown)}; choose from {self.implemented_properties}"
            )
        if len(atoms_list) == 0:
            return []
        for atoms in atoms_list:
            self._check_atoms(atoms)
        want_stress = "stress" in properties
        # Stress needs a cell volume: periodic structures go through one pass with stress, the
        # others through one pass without it.
        if want_stress:
            periodic = [bool(a.pbc.any()) for a in atoms_list]
            groups = [
                (True, [k for k, p in enumerate(periodic) if p]),
                (False, [k for k, p in enumerate(periodic) if not p]),
            ]
        else:
            groups = [(False, list(range(len(atoms_list))))]
        out: list[dict | None] = [None] * len(atoms_list)
        for stress_group, idx in groups:
            if not idx:
                continue
            batch, pred = self._predict([atoms_list[k] for k in idx], compute_stress=stress_group)
            for local, k in enumerate(idx):
                out[k] = self._results_for(pred, batch, local, stress_group)
        return out

    def supported_elements(self) -> list[str]:
        return [chemical_symbols[z] for z in self.potential.species]
