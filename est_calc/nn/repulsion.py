"""Screened nuclear repulsion (Ziegler-Biersack-Littmark, ZBL) as a fixed pair term.

A learned potential sees no training data at very short range and may extrapolate to any sign
there; two atoms pushed together must nevertheless repel. Added to the learned energy, for each
pair (i, j) at distance r:

    E_ij(r)  = k_e Z_i Z_j / r * phi(r / a_ij) * u(r / r_ij)
    phi(x)   = 0.18175 e^(-3.19980 x) + 0.50986 e^(-0.94229 x) + 0.28022 e^(-0.40290 x)
               + 0.02817 e^(-0.20162 x)                      (ZBL universal screening function)
    a_ij     = 0.46850 Å / (Z_i^0.23 + Z_j^0.23)             (0.8854 a_0 / (Z_i^0.23 + Z_j^0.23))
    r_ij     = f (R_i + R_j),  R = ASE's covalent radii, f = ``radius_factor`` (0.65)
    u(d)     = 1 - 28 d^6 + 48 d^7 - 21 d^8 for d < 1, else 0 (C^2 polynomial envelope, p = 6)

with k_e = e^2 / (4 pi eps_0) = 14.399645 eV Å. Constants: J. F. Ziegler, J. P. Biersack and
U. Littmark, "The Stopping and Range of Ions in Solids" (1985), as in LAMMPS' pair_style zbl.
The per-type outer radius f (R_i + R_j) with f = 0.65 follows NEP's ``use_typewise_cutoff_zbl``:
it ends the term well inside every bond (C-H 0.70 Å against 1.09 Å, C-O 0.92 Å against 1.13 Å,
Cu-Cu 1.72 Å against 2.55 Å), so equilibrium structures feel none of it and the learned part keeps
the whole chemistry, while E_ij -> k_e Z_i Z_j / r as r -> 0 dominates any bounded learned term.

Each directed edge (i, j) gives E_ij / 2 to atom i, so a pair listed both ways is counted once and
per-atom energies sum to the total. Forces and stress follow by autograd with everything else.
"""

from __future__ import annotations

import torch
from ase.data import covalent_radii
from torch import Tensor, nn

__all__ = ["COULOMB_EV_A", "ZBLRepulsion"]

#: e^2 / (4 pi eps_0) in eV Å (CODATA 2018).
COULOMB_EV_A = 14.399645478425668
_PHI_C = (0.18175, 0.50986, 0.28022, 0.02817)
_PHI_D = (3.19980, 0.94229, 0.40290, 0.20162)
_A_ZBL = 0.46850  # Å


class ZBLRepulsion(nn.Module):
    """Per-atom ZBL energies from edge lengths (see the module docstring for the formula).

    Args:
        radius_factor: f, the outer radius of a pair is f (R_i + R_j) with ASE's covalent radii.
    """

    def __init__(self, radius_factor: float = 0.65) -> None:
        super().__init__()
        if not 0.0 < radius_factor <= 2.0:
            raise ValueError(f"ZBL radius_factor must be in (0, 2], got {radius_factor!r}")
        self.radius_factor = float(radius_factor)
        self.register_buffer("covalent_radii", torch.as_tensor(covalent_radii, dtype=torch.float64),
                             persistent=False)

    def outer_radius(self, z_i: Tensor, z_j: Tensor) -> Tensor:
        """r_ij = f (R_i + R_j) in Å for atomic numbers z_i, z_j (same shape)."""
        radii = self.covalent_radii
        return self.radius_factor * (radii[z_i] + radii[z_j])

    def forward(self, z: Tensor, edge_index: Tensor, r: Tensor) -> Tensor:
        """Per-atom repulsion energies.

        Args:
            z: (N,) atomic numbers.
            edge_index: (2, E) directed edges (centre i, neighbour j), each pair listed both ways.
            r: (E,) edge lengths in Å (inside autograd for forces).

        Returns:
            (N,) energies in eV, in the dtype of r.
        """
        energies = r.new_zeros(z.shape[0])
        if r.shape[0] == 0:
            return energies
        z_i, z_j = z[edge_index[0]], z[edge_index[1]]
        r_out = self.outer_radius(z_i, z_j).to(r.dtype)
        # Evaluated on every edge and masked (no data-dependent shapes, no host synchronisation);
        # past the outer radius the value and its gradient are exactly zero. r is floored so that
        # coincident atoms (which the calculator refuses) could not produce inf * 0 = NaN here.
        rs = r.clamp_min(1e-4)
        zi, zj = z_i.to(r.dtype), z_j.to(r.dtype)
        x = rs * (zi**0.23 + zj**0.23) / _A_ZBL
        phi = sum(c * torch.exp(-d * x) for c, d in zip(_PHI_C, _PHI_D))
        d = (rs / r_out).clamp(max=1.0)
        envelope = 1.0 + d**6 * (-28.0 + d * (48.0 - 21.0 * d))
        pair = COULOMB_EV_A * zi * zj / rs * phi * envelope
        pair = torch.where(r < r_out, pair, torch.zeros_like(pair))
        return energies.index_add(0, edge_index[0], 0.5 * pair)

    def extra_repr(self) -> str:
        return f"radius_factor={self.radius_factor}"
