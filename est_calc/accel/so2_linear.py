"""SO2Linear with its order-m pairs as one block matrix, and whole-tensor maps with frozen weights.

:class:`FastSO2Linear` computes what :class:`est_calc.nn.message_so2.SO2Linear` computes:

* every order m > 0 maps its (+m, -m) rows in one product with the block matrix
  [[W_r, -W_i], [W_i, W_r]] on (x+ || x-), which gives (y+ || y-) in the K_M row order directly
  (the same multiply-adds as the four products of the plain form, without the partial results);
  the block matrices are cached while the weights are frozen (:func:`derived`);
* the message block works on the m-groups of rows (:meth:`FastSO2Linear.map_groups`), which saves
  the concatenation after one map and the split before the next;
* with ``inference`` (frozen weights) :class:`_SO2Map` reads a whole input or writes a whole output
  by matrix products with ``out=`` into row-block views, instead of the concatenations that split
  and cat cost forward or backward. Its backward gives no weight gradient (the weights are
  frozen) and is written in differentiable operations when a graph of it is requested.
"""

from __future__ import annotations

import torch
from torch import Tensor

from est_calc.accel.weights import derived
from est_calc.nn.message_so2 import SO2Linear

__all__ = ["FastSO2Linear"]


class FastSO2Linear(SO2Linear):
    """:class:`SO2Linear` with the speed-ups of the module docstring; same parameters.

    Attributes set by :func:`est_calc.accel.accelerate`: ``inference`` (frozen weights: the
    whole-tensor maps of :class:`_SO2Map` outside ``torch.compile``).
    """

    inference = False

    def _accelerate(self, options) -> None:
        self.inference = options.inference

    def forward(self, x: Tensor, radial: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """As :meth:`SO2Linear.forward`, through :meth:`map_groups`."""
        if x.dim() != 3 or x.shape[1:] != (self.n_rows, self.in_channels):
            raise ValueError(f"SO2Linear: expected x (E, {self.n_rows}, {self.in_channels}), "
                             f"got {tuple(x.shape)}")
        parts, extra = self.map_groups(self.split_groups(x), radial)
        return torch.cat(parts, dim=1), extra

    def radial_rows(self, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        """A linear layer producing the ``radial`` of :meth:`forward` ((radial_size, hidden)
        weight and bias) with the rows of each (m, l) slot repeated for every one of the K_M
        rows it modulates (+m and -m): its output, viewed as (E, K_M, Cin), multiplies the input
        rows directly, the same numbers as ``map_groups(groups, radial)``."""
        hidden = weight.shape[1]
        w = weight.view(-1, self.in_channels, hidden).index_select(0, self._radial_row)
        b = bias.view(-1, self.in_channels).index_select(0, self._radial_row)
        return w.reshape(-1, hidden), b.reshape(-1)

    def split_groups(self, x: Tensor) -> list[Tensor]:
        """(E, K_M, C) -> the m-groups of :meth:`map_groups` (views; split, not slicing, so that
        backward concatenates gradients instead of zero-filling)."""
        return list(x.split(self._group_sizes, dim=1))

    def _fusable(self) -> bool:
        """Whether :class:`_SO2Map` may run: inference (frozen weights), eager mode."""
        return self.inference and not torch.compiler.is_compiling()

    def _map_weights(self) -> list[Tensor]:
        return [self.fc0.weight, self.fc0.bias] + [
            derived(self, f"block{m}", [fc.weight], lambda fc=fc: _pair_block(fc.weight).t())
            for m, fc in enumerate(self.fcm, start=1)]

    def map_whole_input(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """:meth:`map_groups` of ``split_groups(x)``, x (E, K_M, Cin). With frozen weights the
        gradient of x is written into one tensor (no concatenation of per-group gradients)."""
        if not self._fusable():
            return self.map_groups(self.split_groups(x))
        outs = _SO2Map.apply(self, True, False, x, *self._map_weights())
        return list(outs[:-1]), outs[-1]

    def map_to_whole(self, groups: list[Tensor]) -> tuple[Tensor, Tensor]:
        """:meth:`map_groups` with the output groups concatenated, (E, K_M, Cout). With frozen
        weights every group's product is written straight into that tensor."""
        if not self._fusable():
            parts, extra = self.map_groups(groups)
            return torch.cat(parts, dim=1), extra
        return _SO2Map.apply(self, False, True, *groups, *self._map_weights())

    def map_groups(self, groups: list[Tensor], radial: Tensor | None = None
                   ) -> tuple[list[Tensor], Tensor]:
        """:meth:`forward` on rows already split by m, returning them split the same way.

        ``groups[0]`` (E, L+1, Cin) holds the m = 0 rows, ``groups[m]`` (E, 2 (L-m+1), Cin) the
        +m rows then the -m rows. Chained maps stay in this form, which saves the
        concatenation after one map and the split (and copies) before the next.
        """
        n_edges = groups[0].shape[0]
        n0 = self.l_max + 1
        if radial is not None:
            # Modulate each group by its radial rows, broadcasting over +-m: the same product as
            # indexing the rows out to (E, K_M, Cin), without materialising that gather (whose
            # backward is a slow scatter-add).
            rad = radial.view(n_edges, self.n_radial_rows, self.in_channels).split(
                [n0] + [self.l_max - m + 1 for m in range(1, self.m_max + 1)], dim=1)
            groups = [groups[0] * rad[0]] + [
                (g.view(n_edges, 2, -1, self.in_channels) * r.unsqueeze(1)).view(g.shape)
                for g, r in zip(groups[1:], rad[1:])]
        out0 = self.fc0(groups[0].reshape(n_edges, -1))
        if self.extra_scalars:
            out0, extra = out0.split([n0 * self.out_channels, self.extra_scalars], dim=-1)
        else:  # no split: its backward would concatenate an empty gradient
            extra = out0.new_zeros(n_edges, 0)
        parts = [out0.view(n_edges, n0, self.out_channels)]
        for m, (fc, pair) in enumerate(zip(self.fcm, groups[1:]), start=1):
            n = self.l_max - m + 1
            # fc.weight stacks W_r (first n Cout rows) over W_i. Both halves of the pair map in
            # one product with the block matrix [[W_r, -W_i], [W_i, W_r]] on (x+ || x-), which
            # gives (y+ || y-) = (W_r x+ - W_i x-, W_i x+ + W_r x-) in the K_M row order directly:
            # the same multiply-adds as mapping x+ and x- separately, without the four (E, n,
            # Cout) partial results and the subtraction and addition that combined them.
            block_t = derived(self, f"block{m}", [fc.weight], lambda fc=fc: _pair_block(fc.weight).t())
            out = torch.mm(pair.reshape(n_edges, 2 * n * self.in_channels), block_t)
            parts.append(out.view(n_edges, 2 * n, self.out_channels))
        return parts, extra


class _SO2Map(torch.autograd.Function):
    """SO2Linear.map_groups on frozen weights, with whole (E, K_M, C) tensors where the message
    block has them: input groups read as row blocks of one tensor (their gradient written into
    one tensor) and/or output groups written into one tensor, by matrix products with ``out=``
    into row-block views (BLAS takes the row stride). Replaces the concatenations that split and
    cat cost forward or backward; the same multiply-adds, the same values.

    Inputs: (linear, whole_in, whole_out, *xs, fc0.weight, fc0.bias, *block_t) with xs either the
    whole input or its m-groups. Outputs: the m-groups then the extra scalars, or the whole
    output then the extra scalars. Weights get no gradient (frozen); the input gradient is
    computed with differentiable operations when a graph of the backward is requested.
    """

    @staticmethod
    def forward(ctx, linear, whole_in, whole_out, *tensors):
        n_groups = len(linear._group_sizes)
        n_x = 1 if whole_in else n_groups
        xs, (w0, b0, *blocks_t) = tensors[:n_x], tensors[n_x:]
        groups = linear.split_groups(xs[0]) if whole_in else list(xs)
        n_edges, c_out = groups[0].shape[0], linear.out_channels
        n0 = linear.l_max + 1
        ctx.linear, ctx.whole_in, ctx.whole_out = linear, whole_in, whole_out
        ctx.save_for_backward(w0, *blocks_t)
        flat = [g.reshape(n_edges, -1) for g in groups]  # views: rows of a group are contiguous
        if whole_out:
            y = flat[0].new_empty(n_edges, linear.n_rows, c_out)
            parts = linear.split_groups(y)
            torch.addmm(b0[: n0 * c_out], flat[0], w0[: n0 * c_out].t(),
                        out=parts[0].view(n_edges, -1))
            for xm, bt, part in zip(flat[1:], blocks_t, parts[1:]):
                torch.mm(xm, bt, out=part.view(n_edges, -1))
            extra = torch.addmm(b0[n0 * c_out:], flat[0], w0[n0 * c_out:].t())
            return y, extra
        out0 = torch.addmm(b0, flat[0], w0.t())
        outs = [out0[:, : n0 * c_out].view(n_edges, n0, c_out)]
        outs += [torch.mm(xm, bt).view(n_edges, -1, c_out) for xm, bt in zip(flat[1:], blocks_t)]
        return (*outs, out0[:, n0 * c_out:])

    @staticmethod
    def backward(ctx, *grads):
        linear = ctx.linear
        w0, *blocks_t = ctx.saved_tensors
        c_out, n0, sizes = linear.out_channels, linear.l_max + 1, linear._group_sizes
        if ctx.whole_out:
            g_y, g_extra = grads
            g_groups = linear.split_groups(g_y) if g_y is not None else [None] * len(sizes)
        else:
            g_groups, g_extra = list(grads[:-1]), grads[-1]
        ref = next(g for g in [*g_groups, g_extra] if g is not None)
        n_edges = ref.shape[0]
        weights = [w0[: n0 * c_out]] + [bt.t() for bt in blocks_t]
        n_extra = w0.shape[0] - n0 * c_out

        def flat(g, rows):
            return (ref.new_zeros(n_edges, rows * c_out) if g is None
                    else g.reshape(n_edges, rows * c_out))

        if torch.is_grad_enabled():  # a graph of the backward is wanted: differentiable ops
            gx = [flat(g, r) @ w for g, r, w in zip(g_groups, sizes, weights)]
            if n_extra and g_extra is not None:
                gx[0] = gx[0] + g_extra @ w0[n0 * c_out:]
            gx = [g.view(n_edges, r, -1) for g, r in zip(gx, sizes)]
            gx = [torch.cat(gx, dim=1)] if ctx.whole_in else gx
        else:
            c_in = linear.in_channels
            whole = ref.new_empty(n_edges, linear.n_rows, c_in) if ctx.whole_in else None
            targets = (linear.split_groups(whole) if ctx.whole_in
                       else [ref.new_empty(n_edges, r, c_in) for r in sizes])
            for g, r, w, t in zip(g_groups, sizes, weights, targets):
                torch.mm(flat(g, r), w, out=t.view(n_edges, -1))
            if n_extra and g_extra is not None:
                targets[0].view(n_edges, -1).addmm_(g_extra, w0[n0 * c_out:])
            gx = [whole] if ctx.whole_in else targets
        return (None, None, None, *gx, *([None] * (1 + 1 + len(blocks_t))))


def _pair_block(weight: Tensor) -> Tensor:
    """[[W_r, -W_i], [W_i, W_r]] from a weight that stacks W_r over W_i."""
    w_r, w_i = weight.chunk(2, dim=0)
    return torch.cat([torch.cat([w_r, -w_i], dim=1), torch.cat([w_i, w_r], dim=1)], dim=0)
