"""AtomsBatch: the one batch object that flows through the whole pipeline.

ase.Atoms -> AtomsBatch -> Graph -> ESTModel -> energy -> autograd -> Prediction.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["AtomsBatch"]


@dataclass(frozen=True, kw_only=True)
class AtomsBatch:
    """Many structures packed into flat tensors.

    Attributes:
        positions: (n_atoms, 3) Cartesian positions in Å.
        atomic_numbers: (n_atoms,) int64.
        cell: (n_systems, 3, 3) in Å, rows are lattice vectors (ASE convention). A non-periodic
            system may carry a zero cell.
        pbc: (n_systems, 3) bool.
        system_idx: (n_atoms,) int64, index of the structure each atom belongs to (sorted).
    """

    positions: Tensor
    atomic_numbers: Tensor
    cell: Tensor
    pbc: Tensor
    system_idx: Tensor

    def __post_init__(self):
        n = self.positions.shape[0]
        if self.positions.ndim != 2 or self.positions.shape[1] != 3:
            raise ValueError(f"positions must be (n_atoms, 3), got {tuple(self.positions.shape)}")
        if self.atomic_numbers.shape != (n,):
            raise ValueError(
                f"atomic_numbers must be ({n},), got {tuple(self.atomic_numbers.shape)}"
            )
        if self.system_idx.shape != (n,):
            raise ValueError(f"system_idx must be ({n},), got {tuple(self.system_idx.shape)}")
        if self.cell.ndim != 3 or self.cell.shape[1:] != (3, 3):
            raise ValueError(f"cell must be (n_systems, 3, 3), got {tuple(self.cell.shape)}")
        if self.pbc.shape != (self.cell.shape[0], 3):
            raise ValueError(
                f"pbc must be ({self.cell.shape[0]}, 3), got {tuple(self.pbc.shape)}"
            )

    @property
    def n_atoms(self) -> int:
        return int(self.positions.shape[0])

    @property
    def n_systems(self) -> int:
        return int(self.cell.shape[0])

    @property
    def device(self) -> torch.device:
        return self.positions.device

    @property
    def dtype(self) -> torch.dtype:
        return self.positions.dtype

    def atoms_per_system(self) -> Tensor:
        """(n_systems,) int64 number of atoms in each structure."""
        return torch.bincount(self.system_idx, minlength=self.n_systems)

    def to(self, device=None, dtype=None) -> "AtomsBatch":
        """Move to ``device`` and cast floating fields (positions, cell) to ``dtype``."""
        kw = {}
        for f in fields(self):
            t = getattr(self, f.name)
            if t.is_floating_point():
                kw[f.name] = t.to(device=device, dtype=dtype)
            else:
                kw[f.name] = t.to(device=device)
        return AtomsBatch(**kw)

    def replace(self, **changes) -> "AtomsBatch":
        return replace(self, **changes)

    @classmethod
    def from_atoms(cls, atoms, *, device=None, dtype=torch.float64) -> "AtomsBatch":
        """Build a batch from one ``ase.Atoms`` or a sequence of them.

        Raises:
            ValueError: an empty list, an empty Atoms, or NaN / infinite positions or cell.
        """
        atoms_list: Sequence = [atoms] if not isinstance(atoms, (list, tuple)) else atoms
        if len(atoms_list) == 0:
            raise ValueError("AtomsBatch.from_atoms got an empty list of structures")
        pos, num, cells, pbcs = [], [], [], []
        for k, a in enumerate(atoms_list):
            if len(a) == 0:
                raise ValueError(f"structure {k} has no atoms")
            p = np.asarray(a.get_positions(), dtype=np.float64)
            c = np.asarray(a.get_cell().array, dtype=np.float64)
            if not np.all(np.isfinite(p)):
                raise ValueError(f"structure {k} has NaN or infinite positions")
            if not np.all(np.isfinite(c)):
                raise ValueError(f"structure {k} has a NaN or infinite cell")
            pos.append(p)
            num.append(a.get_atomic_numbers())
            cells.append(c)
            pbcs.append(a.get_pbc())
        return cls.from_arrays(pos, num, cells, pbcs, device=device, dtype=dtype)

    @classmethod
    def from_arrays(cls, positions, numbers, cells, pbcs, *, device=None,
                    dtype=torch.float64) -> "AtomsBatch":
        """Pack per-structure numpy arrays (positions (n_k, 3), numbers (n_k,), cell (3, 3),
        pbc (3,)) into one batch, structure k getting system index k."""
        sidx = [np.full(len(z), k, dtype=np.int64) for k, z in enumerate(numbers)]
        batch = cls(
            positions=torch.from_numpy(np.concatenate([np.asarray(p, np.float64) for p in positions])),
            atomic_numbers=torch.from_numpy(np.concatenate([np.asarray(z, np.int64) for z in numbers])),
            cell=torch.from_numpy(np.stack([np.asarray(c, np.float64).reshape(3, 3) for c in cells])),
            pbc=torch.from_numpy(np.stack([np.asarray(b, bool).reshape(3) for b in pbcs])),
            system_idx=torch.from_numpy(np.concatenate(sidx)),
        )
        return batch.to(device=device, dtype=dtype)
