"""The first SO(2) map of the message block on radially modulated inputs, in cache-sized blocks.

:class:`est_calc.nn.message_so2.SO2MessageBlock` computes, per edge e (rows r of the K_M
layout, channels c of [h_i || h_j]),

    z_e  = D_e [h_i || h_j]                      (K_M, 2C)
    y_e  = SO2Linear_1(z_e * (A hid_e + b))      hid_e: the radial MLP's last hidden layer

Written as whole-tensor operations, z, the radial weights A hid + b, their product and, in the
backward, the gradient of that product are (E, K_M, 2C) tensors that go to memory and come back,
so on a CPU the modulation's products run at memory speed. :class:`ModulatedMap` runs the whole chain
per block of :data:`CHUNK` rows on a CPU (one block on a GPU), so these tensors exist one block at
a time, and keeps only z and hid (E, hidden) for the backward, which recomputes a block's radial
weights (a (rows, hidden) x (hidden, K_M 2C) product) instead of reading them back (a single
block keeps them). The same multiply-adds in the same order within each row: values equal the
whole-tensor form to rounding.

Paired edge lists (``Graph.paired``: edge P + p reverses edge p) pass z of the first half only,
(P, K_M, 2C). The reversed edge's input is s [D h_j || D h_i] (fixed row signs s, channel halves
swapped), so with sigma the swap of the two channel halves of every row,

    SO2Linear(s sigma(z) * (A hid + b)) = SO2Linear'(z * (A' hid + b'))

with A', b' the radial layer's rows permuted by sigma and SO2Linear' the map whose input rows are
permuted by sigma and multiplied by s (a permutation of a product's summation index). Both halves
then read the same z: no (E, K_M, 2C) expansion at all, forward or backward.

Only for frozen weights in eager mode (``accelerate(model, inference=True)``: the calculator);
training and ``torch.compile`` keep the whole-tensor form. The backward is computed with
differentiable operations when a graph of it is requested (a Hessian of a frozen potential).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from est_calc.accel.so2_linear import FastSO2Linear as SO2Linear

__all__ = ["CHUNK", "ModulatedMap", "modulated_weights", "swap_halves"]

#: Rows (edges, or pairs of a paired list) per block on a CPU. The block's temporaries are a few
#: (CHUNK, K_M 2C) tensors, small enough to stay in cache; smaller blocks cost more Python per
#: call.
CHUNK = 1024


def swap_halves(n_rows: int, width: int) -> Tensor:
    """Permutation of a flattened (n_rows, width) layout swapping every row's channel halves."""
    return torch.arange(n_rows * width).view(n_rows, 2, width // 2).flip(1).reshape(-1)


def modulated_weights(linear: SO2Linear, radial_weight: Tensor, radial_bias: Tensor,
                      blocks_t: list[Tensor], sign: tuple[float, ...] | None) -> tuple[Tensor, ...]:
    """The weights :class:`ModulatedMap` takes, in its order.

    Args:
        linear: the SO2Linear (its fc0 weight and bias are read).
        radial_weight, radial_bias: the radial MLP's last layer, (n_radial_rows Cin, hidden).
        blocks_t: the transposed pair blocks of ``linear.fcm`` (rows m Cin, out), as
            :meth:`SO2Linear._map_weights` builds them.
        sign: the K_M row signs of a reversed edge (paired lists), or None.

    Returns:
        (A, b, fc0 weight, fc0 bias, *blocks_t) and, with ``sign``, the reversed edges'
        (A', b', fc0 weight', *blocks_t'): A (K_M Cin, hidden) repeats each radial row for the
        K_M rows it modulates (``SO2Linear.radial_rows``).
    """
    a, b = linear.radial_rows(radial_weight, radial_bias)
    w0, b0 = linear.fc0.weight, linear.fc0.bias
    out = [a, b, w0, b0, *blocks_t]
    if sign is not None:
        c_in, dev = linear.in_channels, a.device
        s = torch.tensor(sign, dtype=a.dtype, device=dev)
        perm = swap_halves(linear.n_rows, c_in).to(dev)
        out += [a[perm], b[perm]]
        first = 0
        for k, rows in enumerate(linear._group_sizes):
            p = swap_halves(rows, c_in).to(dev)
            s_in = s[first:first + rows].repeat_interleave(c_in)   # sign of each input column
            out.append(w0[:, p] * s_in if k == 0 else blocks_t[k - 1][p] * s_in[:, None])
            first += rows
    return tuple(t.contiguous() for t in out)


def _blocks(n: int, device: torch.device) -> list[tuple[int, int]]:
    """[(start, stop)] of about equal blocks of at most CHUNK rows covering range(n); one block
    off the CPU (a GPU gains nothing from cache-sized blocks and pays a launch per kernel)."""
    if device.type != "cpu":
        return [(0, n)]
    count = max(1, -(-n // CHUNK))
    step = -(-n // count)
    return [(start, min(start + step, n)) for start in range(0, n, step)]


def _weight_sets(linear: SO2Linear, paired: bool, weights: tuple[Tensor, ...], n: int):
    """[(first output row, A, b, fc0 weight, blocks_t)] for the forward (and reversed) edges."""
    n_blocks = len(linear._group_sizes) - 1
    a, b, w0, _, *rest = weights
    sets = [(0, a, b, w0, rest[:n_blocks])]
    if paired:
        a_r, b_r, w0_r, *blocks_r = rest[n_blocks:]
        sets.append((n, a_r, b_r, w0_r, blocks_r))
    return sets


def _reference(linear: SO2Linear, paired: bool, x: Tensor, hid: Tensor,
               weights: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """ModulatedMap's outputs in whole-tensor, differentiable operations (its double backward)."""
    n, n_edges = x.shape[0], (2 if paired else 1) * x.shape[0]
    c_out, n0 = linear.out_channels, linear.l_max + 1
    b0 = weights[3]
    outs0, outs_m = [], [[] for _ in linear._group_sizes[1:]]
    for first, a, b, w0, blocks in _weight_sets(linear, paired, weights, n):
        t = x * torch.nn.functional.linear(hid[first:first + n], a, b).view(x.shape)
        groups = [g.reshape(n, -1) for g in linear.split_groups(t)]
        outs0.append(torch.addmm(b0, groups[0], w0.t()))
        for k, (g, bt) in enumerate(zip(groups[1:], blocks)):
            outs_m[k].append(g @ bt)
    out0 = torch.cat(outs0) if paired else outs0[0]
    parts = [out0[:, : n0 * c_out].view(n_edges, n0, c_out)]
    parts += [(torch.cat(o) if paired else o[0]).view(n_edges, -1, c_out) for o in outs_m]
    return (*parts, out0[:, n0 * c_out:])


class ModulatedMap(torch.autograd.Function):
    """``linear.map_groups(split(z * radial))`` in blocks of :data:`CHUNK` rows (module docstring).

    ``apply(linear, paired, x, hid, *weights)``: x (E, K_M, Cin) rotated edge features, or
    (P, K_M, Cin) for a paired list of E = 2P edges; hid (E, hidden); weights from
    :func:`modulated_weights` (frozen). Returns the m-groups (E, rows, Cout) and the extra
    scalars (E, extra), as ``SO2Linear.map_groups``. Only the layout of ``linear`` is read
    (``_group_sizes``, ``l_max``, ``out_channels``, ``split_groups``): the message block's last
    layer passes the m = 0 restriction of conv1 (``so2_message._ScalarRows``) with the matching
    rows of the weights.
    """

    @staticmethod
    def forward(ctx, linear, paired, x, hid, *weights):
        n, k, c_in = x.shape
        n_edges = 2 * n if paired else n
        if hid.shape[0] != n_edges:
            raise ValueError(f"ModulatedMap: hid has {hid.shape[0]} rows for {n_edges} edges")
        sizes, c_out = linear._group_sizes, linear.out_channels
        b0 = weights[3]
        out0 = x.new_empty(n_edges, b0.shape[0])
        outs = [x.new_empty(n_edges, rows * c_out) for rows in sizes[1:]]
        blocks_of_rows = _blocks(n, x.device)
        step = blocks_of_rows[0][1]
        sets = [(first, a.t(), b, w0.t(), blocks)
                for first, a, b, w0, blocks in _weight_sets(linear, paired, weights, n)]
        # One block (a single structure): the backward keeps its radial weights instead of
        # recomputing them (in cache either way; one product fewer per call).
        keep = len(blocks_of_rows) == 1
        radials = [x.new_empty(step, k * c_in) for _ in (sets if keep else sets[:1])]
        product = x.new_empty(step, k, c_in)
        for start, stop in blocks_of_rows:
            m = stop - start
            xb = x[start:stop]
            for radial, (first, a_t, b, w0_t, blocks) in zip(radials * len(sets), sets):
                rows = slice(first + start, first + stop)
                r = torch.addmm(b, hid[rows], a_t, out=radial[:m])
                t = torch.mul(xb, r.view(m, k, c_in), out=product[:m])
                groups = t.split(sizes, dim=1)
                torch.addmm(b0, groups[0].reshape(m, -1), w0_t, out=out0[rows])
                for g, bt, o in zip(groups[1:], blocks, outs):
                    torch.mm(g.reshape(m, -1), bt, out=o[rows])
        ctx.linear, ctx.paired, ctx.n_weights = linear, paired, len(weights)
        ctx.radials = radials if keep else None
        ctx.save_for_backward(x, hid, *weights)
        n0 = linear.l_max + 1
        parts = [out0[:, : n0 * c_out].view(n_edges, n0, c_out)]
        parts += [o.view(n_edges, -1, c_out) for o in outs]
        return (*parts, out0[:, n0 * c_out:])

    @staticmethod
    def backward(ctx, *grads):
        x, hid, *weights = ctx.saved_tensors
        linear, paired = ctx.linear, ctx.paired
        none = (None,) * ctx.n_weights
        if torch.is_grad_enabled():  # a graph of the backward is wanted: differentiable ops
            inputs = [t for t, need in zip((x, hid), ctx.needs_input_grad[2:4]) if need]
            outs = _reference(linear, paired, x, hid, tuple(weights))
            used = [(o, g) for o, g in zip(outs, grads) if g is not None]
            got = iter(torch.autograd.grad([o for o, _ in used], inputs, [g for _, g in used],
                                           create_graph=True, allow_unused=True))
            gx, ghid = (next(got) if need else None for need in ctx.needs_input_grad[2:4])
            return (None, None, gx, ghid, *none)
        n, k, c_in = x.shape
        n_edges = 2 * n if paired else n
        sizes, c_out, n0 = linear._group_sizes, linear.out_channels, linear.l_max + 1
        n_main = n0 * c_out
        g_groups, g_extra = grads[:-1], grads[-1]
        flat = [None if g is None else g.reshape(n_edges, -1) for g in g_groups]
        gx, ghid = torch.empty_like(x), torch.empty_like(hid)
        blocks_of_rows = _blocks(n, x.device)
        step = blocks_of_rows[0][1]
        radial = x.new_empty(step, k * c_in) if ctx.radials is None else None
        g_in = x.new_empty(step, k, c_in)
        g_rad = x.new_empty(step, k * c_in)
        extra = g_extra is not None and weights[2].shape[0] > n_main
        sets = [(first, a, a.t(), b, [w0[:n_main]] + [bt.t() for bt in blocks], w0[n_main:])
                for first, a, b, w0, blocks in _weight_sets(linear, paired, tuple(weights), n)]
        for start, stop in blocks_of_rows:
            m = stop - start
            xb = x[start:stop]
            for half, (first, a, a_t, b, maps, w_extra) in enumerate(sets):
                rows = slice(first + start, first + stop)
                if ctx.radials is None:
                    r = torch.addmm(b, hid[rows], a_t, out=radial[:m]).view(m, k, c_in)
                else:
                    r = ctx.radials[half].view(m, k, c_in)
                gi = g_in[:m]
                targets = gi.split(sizes, dim=1)
                for g, w, t in zip(flat, maps, targets):
                    tv = t.view(m, -1)  # a group's rows are contiguous per edge
                    if g is None:
                        tv.zero_()
                    else:
                        torch.mm(g[rows], w, out=tv)
                if extra:
                    targets[0].view(m, -1).addmm_(g_extra[rows], w_extra)
                if half == 0:
                    torch.mul(gi, r, out=gx[start:stop])
                else:
                    gx[start:stop].addcmul_(gi, r)
                gr = torch.mul(gi, xb, out=g_rad[:m].view(m, k, c_in))
                torch.mm(gr.view(m, -1), a, out=ghid[rows])
        return (None, None, gx, ghid, *none)
