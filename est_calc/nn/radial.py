"""Radial pieces of the model: basis expansions of |r_ij|, the smooth cutoff envelope, radial MLPs.

Every radial term and every edge message in est_calc is multiplied by :class:`PolynomialEnvelope`,
which goes to zero at the cutoff together with its first and second derivatives; this is what makes
the potential energy surface (and so the forces) continuous as atoms cross the cutoff sphere.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["BesselBasis", "GaussianBasis", "PolynomialEnvelope", "RadialMLP", "make_radial_basis"]


def _check_basis_args(n_basis: int, cutoff_A: float) -> None:
    if int(n_basis) != n_basis or n_basis < 1:
        raise ValueError(f"n_basis must be a positive integer, got {n_basis!r}")
    if not (cutoff_A > 0 and math.isfinite(cutoff_A)):
        raise ValueError(f"cutoff_A must be a positive finite number of Å, got {cutoff_A!r}")


class BesselBasis(nn.Module):
    """Spherical Bessel (sine) basis  b_n(r) = sqrt(2/rc) sin(n pi r / rc) / r,  n = 1..n_basis.

    The frequencies n*pi/rc are trainable (DimeNet; stored as n). The 1/r factor diverges as r -> 0; edge
    lengths are clamped from below at 1e-6 Å so a (non-physical) zero-length edge gives a finite,
    large value instead of NaN.

    Args:
        n_basis: number of basis functions.
        cutoff_A: cutoff radius r_c in Å.
    """

    def __init__(self, n_basis: int, cutoff_A: float):
        super().__init__()
        _check_basis_args(n_basis, cutoff_A)
        self.n_basis = int(n_basis)
        self.cutoff_A = float(cutoff_A)
        # Trainable frequencies in units of pi / r_c: initial values 1, 2, 3, ... are exact in any
        # float dtype, so casting the module does not perturb them.
        self.frequencies = nn.Parameter(torch.arange(1, self.n_basis + 1).to(torch.get_default_dtype()))
        self.omega = math.pi / self.cutoff_A
        self.prefactor = math.sqrt(2.0 / self.cutoff_A)

    def forward(self, r: Tensor) -> Tensor:
        """Expand edge lengths.

        Args:
            r: (E,) edge lengths in Å.

        Returns:
            (E, n_basis) basis values (units Å^-3/2).
        """
        r = r.clamp_min(1e-6).unsqueeze(-1)
        return self.prefactor * torch.sin(self.frequencies * (self.omega * r)) / r

    def extra_repr(self) -> str:
        return f"n_basis={self.n_basis}, cutoff_A={self.cutoff_A}"


class GaussianBasis(nn.Module):
    """Gaussian smearing  g_n(r) = exp(-(r - mu_n)^2 / (2 w^2)),  mu_n evenly spaced on [0, r_c].

    The width w is ``width_factor`` times the spacing between centres (EquiformerV2 uses 2.0).

    Args:
        n_basis: number of Gaussians (>= 2 so that a spacing is defined; 1 uses w = r_c).
        cutoff_A: cutoff radius r_c in Å.
        width_factor: w / spacing.
    """

    def __init__(self, n_basis: int, cutoff_A: float, width_factor: float = 2.0):
        super().__init__()
        _check_basis_args(n_basis, cutoff_A)
        if not width_factor > 0:
            raise ValueError(f"width_factor must be positive, got {width_factor!r}")
        self.n_basis = int(n_basis)
        self.cutoff_A = float(cutoff_A)
        centres = torch.linspace(0.0, self.cutoff_A, self.n_basis, dtype=torch.float64)
        spacing = self.cutoff_A / (self.n_basis - 1) if self.n_basis > 1 else self.cutoff_A
        width = width_factor * spacing
        self.register_buffer("centres", centres.to(torch.get_default_dtype()))
        self.coeff = -0.5 / width**2

    def forward(self, r: Tensor) -> Tensor:
        """Expand edge lengths.

        Args:
            r: (E,) edge lengths in Å.

        Returns:
            (E, n_basis) basis values in [0, 1].
        """
        d = r.unsqueeze(-1) - self.centres.to(r.dtype)
        return torch.exp(self.coeff * d * d)

    def extra_repr(self) -> str:
        return f"n_basis={self.n_basis}, cutoff_A={self.cutoff_A}"


class PolynomialEnvelope(nn.Module):
    """DimeNet polynomial cutoff envelope, C^2 at the cutoff.

    u(d) = 1 - (p+1)(p+2)/2 d^p + p(p+2) d^(p+1) - p(p+1)/2 d^(p+2),   d = r / r_c,

    and u = 0 exactly for r >= r_c. u(0) = 1, and u, u', u'' all vanish at d = 1. The polynomial
    is evaluated on d clamped to [0, 1], so for r >= r_c both the value and the autograd
    derivative are exactly zero (no NaN, no leakage).

    Args:
        cutoff_A: cutoff radius r_c in Å.
        p: polynomial order (>= 1; 5 by default).
    """

    def __init__(self, cutoff_A: float, p: int = 5):
        super().__init__()
        if not (cutoff_A > 0 and math.isfinite(cutoff_A)):
            raise ValueError(f"cutoff_A must be a positive finite number of Å, got {cutoff_A!r}")
        if int(p) != p or p < 1:
            raise ValueError(f"envelope order p must be a positive integer, got {p!r}")
        self.cutoff_A = float(cutoff_A)
        self.p = int(p)
        self.a = -(self.p + 1) * (self.p + 2) / 2.0
        self.b = float(self.p * (self.p + 2))
        self.c = -self.p * (self.p + 1) / 2.0

    def forward(self, r: Tensor) -> Tensor:
        """Envelope values.

        Args:
            r: (E,) edge lengths in Å.

        Returns:
            (E,) envelope u(r) in [0, 1] (dimensionless).
        """
        d = (r / self.cutoff_A).clamp(0.0, 1.0)
        dp = d**self.p
        u = 1.0 + dp * (self.a + d * (self.b + self.c * d))
        # The polynomial has u(1) = 0 up to rounding; force an exact zero past the cutoff.
        return torch.where(r < self.cutoff_A, u, torch.zeros_like(u))

    def extra_repr(self) -> str:
        return f"cutoff_A={self.cutoff_A}, p={self.p}"


class RadialMLP(nn.Module):
    """[Linear -> LayerNorm -> SiLU] x n_hidden_layers -> Linear (EquiformerV2 RadialFunction).

    Args:
        in_features: input width (e.g. n_rbf + 2 * species-embedding width).
        hidden: hidden width.
        out_features: output width.
        n_hidden_layers: number of Linear-LayerNorm-SiLU stages (>= 0).
    """

    def __init__(self, in_features: int, hidden: int, out_features: int, n_hidden_layers: int = 2):
        super().__init__()
        for name, v in (("in_features", in_features), ("hidden", hidden),
                        ("out_features", out_features)):
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if int(n_hidden_layers) != n_hidden_layers or n_hidden_layers < 0:
            raise ValueError(f"n_hidden_layers must be >= 0, got {n_hidden_layers!r}")
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(n_hidden_layers):
            layers += [nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)
        self.in_features = int(in_features)
        self.out_features = int(out_features)

    @property
    def last(self) -> nn.Linear:
        """The final Linear layer."""
        return self.net[-1]

    def hidden(self, x: Tensor) -> Tensor:
        """Every stage but the final Linear: (..., in_features) -> (..., hidden)."""
        for stage in range(len(self.net) - 1):
            x = self.net[stage](x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (..., in_features). Returns (..., out_features)."""
        return self.net(x)


def make_radial_basis(kind: str, n_basis: int, cutoff_A: float) -> nn.Module:
    """Build a radial basis by name: ``"bessel"`` or ``"gaussian"``."""
    if kind == "bessel":
        return BesselBasis(n_basis, cutoff_A)
    if kind == "gaussian":
        return GaussianBasis(n_basis, cutoff_A)
    raise ValueError(f"unknown radial basis {kind!r}; expected 'bessel' or 'gaussian'")
