"""Equivariant layers and the expert gate with cached derived weights.

Same functions and parameters as the plain layers of :mod:`est_calc.nn.so3` and
:mod:`est_calc.nn.experts`:

* :class:`FastDWLinear`: the per-component weight W_{l(k)} gathered once while frozen, and the l = 0
  bias added through a split (the backward of two slices zero-fills two full tensors);
* :class:`FastEquivariantLayerNorm`: the degree balance 1 / ((2l + 1) n C) and the gathered scale
  cached, the mean square as one matrix-vector product;
* :class:`FastMixtureOfHybridExperts`: the gate's first layer and scalar_out read the same LN(x^0),
  so they run as one matrix product with stacked (cached) weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from est_calc.accel.weights import derived
from est_calc.nn.experts import MixtureOfHybridExperts
from est_calc.nn.so3 import DWLinear, EquivariantLayerNorm, _check_features

__all__ = ["FastDWLinear", "FastEquivariantLayerNorm", "FastMixtureOfHybridExperts"]


class FastDWLinear(DWLinear):
    """:class:`DWLinear` with its gathered weight cached (module docstring)."""

    def _accelerate(self, options) -> None:
        """No option of ``accelerate`` concerns this block."""

    def forward(self, x: Tensor) -> Tensor:
        """As :meth:`DWLinear.forward`."""
        _check_features(x, (self.l_max + 1) ** 2, self.in_channels, "DWLinear")
        weight = derived(self, "weight", [self.weight, self._degree],
                         lambda: self.weight.index_select(0, self._degree))
        y = torch.einsum("nki,kio->nko", x, weight)
        if self.bias is not None and self.l_max > 0:
            # split rather than slices: the backward of two slices zero-fills two full tensors.
            y0, y_rest = y.split([1, y.shape[1] - 1], dim=1)
            y = torch.cat([y0 + self.bias, y_rest], dim=1)
        elif self.bias is not None:
            y = y + self.bias
        return y


class FastEquivariantLayerNorm(EquivariantLayerNorm):
    """:class:`EquivariantLayerNorm` with cached degree weights (module docstring)."""

    def _accelerate(self, options) -> None:
        """No option of ``accelerate`` concerns this block."""

    def forward(self, x: Tensor) -> Tensor:
        """As :meth:`EquivariantLayerNorm.forward`."""
        _check_features(x, (self.l_max + 1) ** 2, self.channels, "EquivariantLayerNorm")
        if self.l_max == 0:
            return self.scalar_norm(x)
        x0, vec = x.split([1, x.shape[1] - 1], dim=1)
        scalars = self.scalar_norm(x0)
        # 1 / ((2l + 1) n C) per component with n = L + 1 (joint) or L, built in the input dtype
        # (exact in float64).
        n_degrees = self.l_max + 1 if self.joint else self.l_max
        balance = derived(self, f"balance_{x.dtype}_{n_degrees}", [self._degree], lambda: 1.0 / (
            (2.0 * self._degree.to(x.dtype) + 3.0) * (n_degrees * self.channels)))
        mean_sq = torch.mv((vec * vec).sum(dim=-1), balance)
        if self.joint:
            var0 = x0.squeeze(1).var(dim=-1, unbiased=False)
            mean_sq = mean_sq + var0 / n_degrees
        inv = torch.rsqrt(mean_sq + self.eps)[:, None, None]
        weight = derived(self, "weight", [self.weight, self._degree],
                         lambda: self.weight.index_select(0, self._degree))
        return torch.cat([scalars, vec * inv * weight], dim=1)


class FastMixtureOfHybridExperts(MixtureOfHybridExperts):
    """:class:`MixtureOfHybridExperts` with the gate and scalar_out in one product."""

    def _accelerate(self, options) -> None:
        """No option of ``accelerate`` concerns this block."""

    def gates(self, x0: Tensor) -> tuple[Tensor, Tensor | None]:
        """As :meth:`MixtureOfHybridExperts.gates`."""
        x0 = self.gate_norm(x0)
        c = self.channels
        if self.spherical is not None:
            # The gate's first layer and scalar_out read the same x0: one matrix product.
            w, b = derived(self, "gate_scalar",
                           [self.gate[0].weight, self.gate[0].bias, self.scalar_out.weight,
                            self.scalar_out.bias],
                           lambda: (torch.cat([self.gate[0].weight, self.scalar_out.weight], dim=0),
                                    torch.cat([self.gate[0].bias, self.scalar_out.bias], dim=0)))
            both = torch.nn.functional.linear(x0, w, b)
            gate_hidden, scalar_pre = both[:, :c], both[:, c:]
        else:
            gate_hidden, scalar_pre = self.gate[0](x0), None
        g = torch.softmax(self.gate[2](self.gate[1](gate_hidden)), dim=-1)  # (N, E_st + E_sp)
        return g, None if scalar_pre is None else torch.nn.functional.silu(scalar_pre)
