"""The SO(2) message block with paired edges, blocked radial modulation and fused maps.

:class:`FastSO2MessageBlock` and :class:`FastScalarSO2MessageBlock` compute what
:class:`est_calc.nn.message_so2.SO2MessageBlock` and ``ScalarSO2MessageBlock`` compute (same
parameters; the maths is in that module):

* the per-edge pair [h_i || h_j] in one row gather (:func:`gather_pairs`);
* paired edge lists (``EdgeFeatures.pair_rotation`` given: edge P + p is the reverse of edge p,
  and the first half's rotations are at hand): the reversed
  edge's frame is diag(-1, -1, 1) times the forward one (bitwise), so its Wigner rows are the
  forward rows times fixed signs s (:func:`pair_signs`) and its rotated pair is
  s [D h_j || D h_i]: the rotation products are computed for the first half only, and the second
  half follows by signs and a swap of channel halves (:class:`_PairExpand`);
* the radial MLP's last layer with its rows repeated for +m and -m, so that one product of equal
  shapes modulates all K_M rows (cached while frozen);
* the two SO(2) maps and the gate between them work on m-groups of rows
  (:meth:`FastSO2Linear.map_groups`), the gate with one sigmoid over the l = 0 row and the gates;
* the attention softmax skips its per-segment max shift when the frozen weights bound the logits
  (:meth:`FastSO2MessageBlock._logit_bound`);
* with ``inference`` (frozen weights, eager mode) the radial modulation and conv1 run as one
  :class:`ModulatedMap` in cache-sized blocks of edges, which reads a paired list's reversed half
  from the first half's rotated pairs through permuted weights (no expansion at all).
"""

from __future__ import annotations

import copy
from functools import lru_cache

import torch
from torch import Tensor
from torch.nn import functional as F

from est_calc.accel.gather import gather_pairs
from est_calc.accel.modulated_map import ModulatedMap, modulated_weights
from est_calc.accel.weights import constant, derived
from est_calc.nn.edges import EdgeFeatures
from est_calc.nn.message_so2 import (
    SO2MessageBlock,
    normalized_by_segment,
    segment_softmax,
    smooth_leaky_relu,
)
from est_calc.nn.wigner import WignerD, so2_index

__all__ = ["FastScalarSO2MessageBlock", "FastSO2MessageBlock", "SHIFT_FREE_BOUND", "pair_signs"]

#: Largest logit magnitude for which the softmax may skip the per-segment max shift: exp(+-30)
#: stays far inside the float32 (and bfloat16) range.
SHIFT_FREE_BOUND = 30.0


def bounded_segment_softmax(logits: Tensor, weight: Tensor, segment: Tensor, n_segments: int,
                            bound: float | None) -> Tensor:
    """:func:`segment_softmax`; without its max shift (which cancels exactly) when ``bound``, a
    guaranteed bound on |logits|, is at most :data:`SHIFT_FREE_BOUND`: a dozen small operations
    fewer, the same values up to round-off."""
    if bound is None or bound > SHIFT_FREE_BOUND:
        return segment_softmax(logits, weight, segment, n_segments)
    valid = (weight > 0).unsqueeze(-1)
    return normalized_by_segment(torch.exp(logits), weight, valid, segment, n_segments)


@lru_cache(maxsize=None)
def pair_signs(l_max: int, m_max: int) -> tuple[float, ...]:
    """Signs s (K_M,) with D_KM(F R) = s * D_KM(R) for F = diag(-1, -1, 1), from the Wigner rows
    of ``so2_index(l_max, m_max)`` (so the layout and the e3nn convention are those of the
    model); raises if D(F) is not diagonal +-1 on those rows."""
    wigner = WignerD(l_max, rows=so2_index(l_max, m_max))
    rows = wigner.rows.tolist()
    flip = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64))[None]
    d_f = copy.deepcopy(wigner).double()(flip)[0]                      # (K_M, K)
    signs = d_f[torch.arange(len(rows)), rows]
    expected = torch.zeros_like(d_f)
    expected[torch.arange(len(rows)), rows] = signs
    if (d_f - expected).abs().max() > 1e-9 or ((signs.abs() - 1).abs() > 1e-9).any():
        raise RuntimeError("the reversed-edge rotation is not a sign flip of the K_M rows")
    return tuple(float(round(float(v))) for v in signs)


def _pair_expand(pair: Tensor, sign: Tensor) -> Tensor:
    """[pair ; sign * pair with its two channel halves swapped] (see _PairExpand)."""
    if torch.compiler.is_compiling():  # plain operations: no out= writes in a compiled graph
        half, k, c2 = pair.shape
        swapped = pair.view(half, k, 2, c2 // 2).flip(2) * sign.view(1, k, 1, 1)
        return torch.cat([pair, swapped.view(half, k, c2)], dim=0)
    return _PairExpand.apply(pair, sign)


class _PairExpand(torch.autograd.Function):
    """(P, K_M, 2C) rotated pairs [A || B] of the first half of a paired edge list -> (2P, K_M, 2C)
    with the reversed edges' s * [B || A] below them, written in place (one pass forward, one
    backward; differentiable operations when a graph of the backward is wanted)."""

    @staticmethod
    def forward(ctx, pair: Tensor, sign: Tensor) -> Tensor:
        half, k, c2 = pair.shape
        ctx.save_for_backward(sign)
        out = pair.new_empty(2 * half, k, c2)
        out[:half] = pair
        src = pair.view(half, k, 2, c2 // 2)
        dst = out[half:].view(half, k, 2, c2 // 2)
        s = sign.view(1, k, 1)
        torch.mul(src[:, :, 1], s, out=dst[:, :, 0])
        torch.mul(src[:, :, 0], s, out=dst[:, :, 1])
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (sign,) = ctx.saved_tensors
        n, k, c2 = grad.shape
        half, c = n // 2, c2 // 2
        s = sign.view(1, k, 1, 1)
        top = grad[:half].view(half, k, 2, c)
        bottom = grad[half:].view(half, k, 2, c)
        if torch.is_grad_enabled():
            return (top + bottom.flip(2) * s).view(half, k, c2), None
        out = grad.new_empty(half, k, 2, c)
        torch.addcmul(top[:, :, 0], bottom[:, :, 1], s[..., 0], out=out[:, :, 0])
        torch.addcmul(top[:, :, 1], bottom[:, :, 0], s[..., 0], out=out[:, :, 1])
        return out.view(half, k, c2), None


class _ScalarRows:
    """The layout of an SO2Linear restricted to its m = 0 rows (one group of L + 1 rows), as
    :class:`ModulatedMap` reads it; no weights of its own (they come as arguments)."""

    def __init__(self, linear):
        self.l_max, self.in_channels, self.out_channels = (linear.l_max, linear.in_channels,
                                                           linear.out_channels)
        self._group_sizes = [linear.l_max + 1]

    def split_groups(self, x: Tensor) -> list[Tensor]:
        return [x]


class FastSO2MessageBlock(SO2MessageBlock):
    """:class:`SO2MessageBlock` with the speed-ups of the module docstring; needs its conv1 and
    conv2 to be :class:`est_calc.accel.so2_linear.FastSO2Linear` (``accelerate`` swaps both).

    Attributes set by :func:`est_calc.accel.accelerate`: ``inference`` (frozen weights: the
    ModulatedMap path and the bounded softmax).
    """

    inference = False

    def _accelerate(self, options) -> None:
        self.inference = options.inference
        self._pair_sign = pair_signs(self.l_max, self.m_max)

    def forward(self, x: Tensor, edges: EdgeFeatures) -> Tensor:
        """As :meth:`SO2MessageBlock.forward`."""
        self._check(x, edges)
        n_nodes, k, _ = x.shape
        if edges.n_edges == 0:
            return x
        i, rot = edges.center, edges.rotation
        y, s_alpha, gates = self._first_map(self.norm(x), edges, scalar=False)
        v, _ = self.conv2.map_to_whole(self._gate_groups(y, gates))    # (E, K_M, H d_v)
        v = v * self._value_weights(s_alpha, edges.envelope, i, n_nodes).unsqueeze(1)
        msg = torch.bmm(rot.transpose(1, 2), v)                         # D^T back to global frame
        agg = msg.new_zeros(n_nodes, k, msg.shape[-1]).index_add(0, i, msg)
        return x + self.proj(agg)

    def _logit_bound(self) -> float | None:
        """A bound on |attention logit| from the weights alone, or None while they train.

        LayerNorm output k is w_k n_k + b_k with |n_k| <= sqrt(d - 1), the smooth leaky ReLU
        never increases a magnitude, so |a_h| <= sum_k |alpha_dot_hk| (|w_k| sqrt(d - 1) + |b_k|).
        Computed once per set of weights in inference (it needs a host sync); training and
        torch.compile keep the max-shifted softmax.
        """
        params = [self.alpha_norm.weight, self.alpha_norm.bias, self.alpha_dot]
        if not self.inference or torch.compiler.is_compiling() or any(p.requires_grad
                                                                      for p in params):
            return None

        def bound() -> float:
            d = self.d_alpha
            per_k = self.alpha_norm.weight.abs() * (d - 1) ** 0.5 + self.alpha_norm.bias.abs()
            return float((self.alpha_dot.abs() * per_k).sum(-1).max())

        return derived(self, "logit_bound", params, bound)

    def _value_weights(self, s_alpha: Tensor, envelope: Tensor, i: Tensor, n_nodes: int) -> Tensor:
        """u_e alpha_eh per value channel (E, H d_v) from the attention scalars (E, H d_alpha)."""
        n_edges = s_alpha.shape[0]
        a = self.alpha_norm(s_alpha.view(n_edges, self.n_heads, self.d_alpha))
        logits = (smooth_leaky_relu(a) * self.alpha_dot).sum(-1)        # (E, H)
        alpha = bounded_segment_softmax(logits, envelope, i, n_nodes, self._logit_bound())
        alpha = self.with_sum(alpha) * envelope.unsqueeze(-1)
        # alpha per value channel (head-major, as v's channels), then one broadcast over rows: a
        # broadcast over the innermost d_v channels of (E, K_M, H, d_v) is several times slower
        # on the CPU, forward and backward (the gradient of alpha becomes a strided reduction).
        return alpha.unsqueeze(-1).expand(n_edges, self.n_heads, self.d_value).reshape(n_edges, -1)

    def _gate_groups(self, parts: list[Tensor], gates: Tensor) -> list[Tensor]:
        """:meth:`SO2MessageBlock.gate` on the m-groups of :meth:`FastSO2Linear.map_groups`
        (E, rows, C_h), group by group (no concatenation, no gather of the gates to every row)."""
        if self.l_max == 0:
            return [F.silu(parts[0])]
        n_edges, c_h = gates.shape[0], self.c_hidden
        y0 = parts[0]
        # m = 0 rows are l = 0..L: SiLU(y) = y sigmoid(y) on l = 0, the gates on l >= 1. One
        # sigmoid of the concatenation: y0 and the gates are column slices of conv1's output,
        # on which the CPU's sigmoid runs several times slower than on a contiguous tensor.
        g = torch.sigmoid(torch.cat([y0[:, :1], gates.view(n_edges, self.l_max, c_h)], dim=1))
        gated = [y0 * g]                                                    # g: (E, 1 + L, C_h)
        for m, part in enumerate(parts[1:], start=1):
            n = self.l_max - m + 1                                          # rows l = m..L per sign
            gated.append((part.view(n_edges, 2, n, c_h) * g[:, m:].unsqueeze(1))
                         .view(n_edges, 2 * n, c_h))
        return gated

    def _first_map(self, h: Tensor, edges: EdgeFeatures, scalar: bool
                   ) -> tuple[list[Tensor], Tensor, Tensor]:
        """conv1 on the radially modulated rotated pairs z = D_e [h_i || h_j]: its m-groups, the
        attention scalars and the gates. With ``scalar`` only the m = 0 rows of z (the first
        L + 1 of the K_M layout) are rotated and modulated and only conv1's m = 0 part runs; y
        is then the single m = 0 group."""
        conv1 = self.conv1
        n_rows = self.l_max + 1 if scalar else conv1.n_rows
        i, j, pair_rot = edges.center, edges.neighbor, edges.pair_rotation
        paired = pair_rot is not None
        # [h_i || h_j] in one row gather (backward: index_adds of contiguous gradients).
        if paired:
            half = i.shape[0] // 2
            z = torch.bmm(pair_rot[:, :n_rows], gather_pairs(h, i[:half], j[:half]))
        else:
            z = torch.bmm(edges.rotation[:, :n_rows], gather_pairs(h, i, j))
        hid = self.radial.hidden(edges.radial_in)
        if self.inference and not torch.compiler.is_compiling():
            # Frozen weights: modulation and conv1 in cache-sized blocks, both halves of a paired
            # list from the first half's z (est_calc.accel.modulated_map).
            if scalar:
                outs = ModulatedMap.apply(_ScalarRows(conv1), paired, z, hid,
                                          *self._modulated_weights_m0(paired))
            else:
                outs = ModulatedMap.apply(conv1, paired, z, hid, *self._modulated_weights(paired))
            y, scalars = list(outs[:-1]), outs[-1]
        else:
            if paired:
                z = _pair_expand(z, constant(self._pair_sign[:n_rows], z))
            # The radial MLP's last layer with its rows repeated for +m and -m, so that one
            # product of equal shapes modulates all K_M rows: the same numbers as SO2Linear's
            # per-m-group broadcast (map_groups(..., radial)), without the broadcasts and the
            # concatenation of their gradients. The m = 0 rows come first.
            last = self.radial.last
            w, b = derived(self, "radial_rows", [last.weight, last.bias, conv1._radial_row],
                           lambda: conv1.radial_rows(last.weight, last.bias))
            width = n_rows * conv1.in_channels
            z = z * F.linear(hid, w[:width], b[:width]).view(z.shape)
            # map_groups of the m = 0 group alone is conv1's m = 0 part (fc0 and the scalars)
            y, scalars = conv1.map_groups([z]) if scalar else conv1.map_whole_input(z)
        s_alpha, gates = scalars.split([self.n_heads * self.d_alpha, self.l_max * self.c_hidden], -1)
        return y, s_alpha, gates

    def _modulated_sources(self) -> list[Tensor]:
        conv1, last = self.conv1, self.radial.last
        return [last.weight, last.bias, conv1.fc0.weight, conv1.fc0.bias,
                *(fc.weight for fc in conv1.fcm)]

    def _modulated_weights(self, paired: bool) -> tuple[Tensor, ...]:
        """:func:`modulated_weights` of conv1 and the radial last layer, cached while frozen."""
        conv1, last = self.conv1, self.radial.last
        return derived(self, f"modulated_{'paired' if paired else 'plain'}",
                       self._modulated_sources(),
                       lambda: modulated_weights(conv1, last.weight, last.bias,
                                                 conv1._map_weights()[2:],
                                                 self._pair_sign if paired else None))

    def _modulated_weights_m0(self, paired: bool) -> tuple[Tensor, ...]:
        """The weights of :meth:`_modulated_weights` restricted to conv1's m = 0 rows (the
        layout of :class:`_ScalarRows`): the radial rows of those rows, fc0 as it is."""
        def build() -> tuple[Tensor, ...]:
            full = self._modulated_weights(paired)
            n_blocks = len(self.conv1.fcm)
            width = (self.l_max + 1) * self.conv1.in_channels
            a, b, w0, b0 = full[:4]
            out = [a[:width], b[:width], w0, b0]
            if paired:
                a_r, b_r, w0_r = full[4 + n_blocks:7 + n_blocks]
                out += [a_r[:width], b_r[:width], w0_r]
            return tuple(t.contiguous() for t in out)

        return derived(self, f"modulated_m0_{'paired' if paired else 'plain'}",
                       self._modulated_sources(), build)


class FastScalarSO2MessageBlock(FastSO2MessageBlock):
    """:class:`est_calc.nn.message_so2.ScalarSO2MessageBlock` (the l = 0 row from the m = 0 rows)
    with the speed-ups of :class:`FastSO2MessageBlock`."""

    def forward(self, x: Tensor, edges: EdgeFeatures) -> Tensor:
        """As ``ScalarSO2MessageBlock.forward``: x (N, K, C) -> (N, C)."""
        self._check(x, edges)
        n_nodes, n_edges = x.shape[0], edges.n_edges
        if n_edges == 0:
            return x[:, 0]
        i = edges.center
        y, s_alpha, gates = self._first_map(self.norm(x), edges, scalar=True)
        (gated,) = self._gate_groups([y[0]], gates)
        fc0, width_v = self.conv2.fc0, self.n_heads * self.d_value
        v0 = torch.addmm(fc0.bias[:width_v], gated.reshape(n_edges, -1), fc0.weight[:width_v].t())
        msg = v0 * self._value_weights(s_alpha, edges.envelope, i, n_nodes)
        agg = msg.new_zeros(n_nodes, msg.shape[1]).index_add(0, i, msg)
        return x[:, 0] + agg @ self.proj.weight[0]
