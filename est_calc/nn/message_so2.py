"""EquiformerV2-style SO(2) graph-attention message block (EST_SPEC 7.1), smooth and conservative.

Same interface as :class:`est_calc.nn.message.ESTMessageBlock`::

    x_new = SO2MessageBlock(config, grid)(x, edge_index, edge_sh, edge_rbf, envelope, atom_emb,
                                          edge_vec=None)

Per edge i <- j (i = centre), with D_e = D(R_e) the Wigner-D of a rotation taking r_hat_ij onto
the edge axis (y in e3nn 0.6.0; see :mod:`est_calc.nn.wigner`), keeping only |m| <= M rows:

    h        = EquivariantLayerNorm(x)
    z_e      = D_e [h_i || h_j]                                  (K_M, 2C)  edge frame, |m| <= M
    z_e      = z_e * R(rbf, emb_i, emb_j)                         radial weights, per (m, l, channel)
    y, s     = SO2Linear_1(z_e)                                   (K_M, C_h) + invariant m=0 scalars s
    y        = Gate(y; gates from s)                              SiLU on l=0, sigmoid gates on l>0
    v        = SO2Linear_2(y)                                     (K_M, H * d_v)
    a_eh     = a_h . SmoothLeakyReLU(LayerNorm(s_h))              (H,) attention logits
    alpha_eh = u_e exp(a_eh) / sum_{e' -> i} u_e' exp(a_e'h)      softmax with log u added
    x_i     += DWLinear( sum_j D_e^T (u_e alpha_eh v_eh) )

Paired edge lists (``Graph.paired``: edge P + p is the reverse of edge p): edge_frame(-r) equals
diag(-1, -1, 1) edge_frame(r) bitwise, so the reversed edge's Wigner rows are the forward rows times
fixed signs s and its z is s [D h_j || D h_i]: the rotations and the rotation products are
computed for the first half only (``pair_rot``). With frozen weights (the calculator) the radial
modulation and conv1 run as one :class:`est_calc.nn.modulated_map.ModulatedMap` in cache-sized
blocks of edges, which reads the reversed half from the first half's z through permuted weights.

SO2Linear: for m = 0 an ordinary linear map over (l, channel); for m > 0 the pair
(x_{+m}, x_{-m}) maps as y_{+m} = W_r x_{+m} - W_i x_{-m}, y_{-m} = W_i x_{+m} + W_r x_{-m}, which
commutes with the roll about the edge axis (a 2-D rotation by m phi of every (+m, -m) pair, with
the same handedness for every l). Hence the result does not depend on the roll of R_e, and
D_e^T f(D_e x) is exactly SO(3)-equivariant.

Smoothness and gradients: the Wigner-D matrices are polynomials in R_e (no Euler angles), nothing
on the geometric path is detached, every message carries u_e (C^2 to zero at the cutoff), and the
softmax uses u_e as a multiplicative weight (edges with u_e <= 0 are masked, never log(0)). Atoms
without edges (or with all u = 0) receive exactly zero message, also in gradients.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
from e3nn import o3
from torch import Tensor, nn

from est_calc.nn.derived import constant, derived
from est_calc.nn.gather import gather_pairs, gather_rows
from est_calc.nn.modulated_map import ModulatedMap, modulated_weights
from est_calc.nn.radial import RadialMLP
from est_calc.nn.so3 import DWLinear, EquivariantLayerNorm
from est_calc.nn.wigner import WignerD, edge_axis, edge_frame, so2_index

if TYPE_CHECKING:  # pragma: no cover
    from est_calc.model import ModelConfig

__all__ = ["SO2Linear", "SO2MessageBlock", "segment_softmax", "smooth_leaky_relu"]


def smooth_leaky_relu(x: Tensor, slope: float = 0.2) -> Tensor:
    """C^inf leaky ReLU: ((1+a)/2) x + ((1-a)/2) x (2 sigmoid(x) - 1) = a x + (1-a) SiLU(x).

    The second form is the same function in three operations instead of seven (and as many
    fewer autograd nodes).
    """
    return torch.add(x * slope, torch.nn.functional.silu(x), alpha=1.0 - slope)


#: Largest logit magnitude for which segment_softmax may skip the per-segment max shift: exp(+-30)
#: stays far inside the float32 (and bfloat16) range.
SHIFT_FREE_BOUND = 30.0


def segment_softmax(logits: Tensor, weight: Tensor, segment: Tensor, n_segments: int,
                    bound: float | None = None) -> Tensor:
    """Weighted softmax over the edges of each segment (centre atom).

    alpha_e = w_e exp(a_e) / sum_{e' in seg(e)} w_e' exp(a_e'), i.e. a softmax of a_e + log w_e,
    computed without a logarithm. Edges with w_e <= 0 get alpha = 0; segments without any
    positive-weight edge get alpha = 0 everywhere (no 0/0, also in gradients).

    Args:
        logits: (E, H) logits a.
        weight: (E,) non-negative weights w (the envelope).
        segment: (E,) int64 segment index of each edge.
        n_segments: number of segments N.
        bound: optional guaranteed bound on |a|. When it is at most ``SHIFT_FREE_BOUND`` the
            overflow guard (subtracting each segment's maximum, which cancels exactly) is
            skipped: a dozen small operations fewer, the same values up to round-off.

    Returns:
        (E, H) attention weights.
    """
    valid = (weight > 0).unsqueeze(-1)
    if bound is not None and bound <= SHIFT_FREE_BOUND:
        expo = torch.exp(logits)
    else:
        # The shift only guards exp() against overflow: it cancels exactly between numerator
        # and denominator, so it carries no gradient (detaching it is exact, and avoids
        # differentiating through a max).
        masked = torch.where(valid, logits, torch.full_like(logits, -torch.inf)).detach()
        shift = logits.new_full((n_segments, logits.shape[1]), -torch.inf)
        shift = shift.scatter_reduce(0, segment[:, None].expand_as(masked), masked, "amax")
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        expo = torch.exp(torch.where(valid, logits - shift.index_select(0, segment),
                                     torch.zeros_like(logits)))
    w = torch.where(valid, weight.unsqueeze(-1) * expo, torch.zeros_like(expo))
    denom = w.new_zeros(n_segments, w.shape[1]).index_add(0, segment, w)
    # denom > 0 on segments with a valid edge (exp(a) * min positive weight); 0 only on empty ones.
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    return w / denom.index_select(0, segment)


class SO2Linear(nn.Module):
    """Roll-equivariant linear map on edge-frame coefficients with |m| <= M.

    Input layout (K_M rows) as :func:`est_calc.nn.wigner.so2_index`: m = 0 for l = 0..L, then
    (+m rows, -m rows) for l = m..L, m = 1..M.

    Args:
        l_max: maximum degree L.
        m_max: maximum order M (<= L).
        in_channels: Cin.
        out_channels: Cout.
        extra_scalars: number of additional invariant outputs produced from the m = 0 rows.
    """

    def __init__(self, l_max: int, m_max: int, in_channels: int, out_channels: int,
                 extra_scalars: int = 0):
        super().__init__()
        if not 0 <= m_max <= l_max or in_channels < 1 or out_channels < 1 or extra_scalars < 0:
            raise ValueError(f"SO2Linear: bad sizes l_max={l_max}, m_max={m_max}, "
                             f"in={in_channels}, out={out_channels}, extra={extra_scalars}")
        self.l_max, self.m_max = l_max, m_max
        self.in_channels, self.out_channels, self.extra_scalars = in_channels, out_channels, extra_scalars
        n0 = l_max + 1
        self.fc0 = nn.Linear(n0 * in_channels, n0 * out_channels + extra_scalars)
        self.fcm = nn.ModuleList(
            nn.Linear((l_max - m + 1) * in_channels, 2 * (l_max - m + 1) * out_channels, bias=False)
            for m in range(1, m_max + 1))
        # Row r of the K_M layout -> its (m, l) slot in the radial modulation (shared by +-m).
        rows, offset = list(range(n0)), n0
        for m in range(1, m_max + 1):
            n = l_max - m + 1
            rows += list(range(offset, offset + n)) * 2
            offset += n
        self.n_radial_rows = offset
        self._group_sizes = [n0] + [2 * (l_max - m + 1) for m in range(1, m_max + 1)]
        self.register_buffer("_radial_row", torch.tensor(rows, dtype=torch.long), persistent=False)

    @property
    def n_rows(self) -> int:
        """K_M, the number of coefficient rows."""
        return int(self._radial_row.numel())

    @property
    def radial_size(self) -> int:
        """Width of the per-edge modulation accepted by forward: n_radial_rows * Cin."""
        return self.n_radial_rows * self.in_channels

    def forward(self, x: Tensor, radial: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Apply the map.

        Args:
            x: (E, K_M, Cin) edge-frame coefficients.
            radial: optional (E, radial_size) multiplicative weights, one per (m, l, channel).

        Returns:
            (E, K_M, Cout) coefficients and (E, extra_scalars) invariant scalars.
        """
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
        """Whether :class:`_SO2Map` may run: frozen weights (inference), eager mode."""
        weights = [self.fc0.weight, self.fc0.bias, *(fc.weight for fc in self.fcm)]
        return not (torch.compiler.is_compiling() or any(w.requires_grad for w in weights))

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


class _ScalarRows:
    """The layout of an SO2Linear restricted to its m = 0 rows (one group of L + 1 rows), as
    :class:`ModulatedMap` reads it; no weights of its own (they come as arguments)."""

    def __init__(self, linear: SO2Linear):
        self.l_max, self.in_channels, self.out_channels = (linear.l_max, linear.in_channels,
                                                           linear.out_channels)
        self._group_sizes = [linear.l_max + 1]

    def split_groups(self, x: Tensor) -> list[Tensor]:
        return [x]


def _pair_signs(wigner: WignerD) -> tuple[float, ...]:
    """Signs s (K_M,) with D_KM(F R) = s * D_KM(R) for F = diag(-1, -1, 1), from the module's
    own Wigner rows (so the layout and the e3nn convention are the module's); raises if D(F) is
    not diagonal +-1 on those rows."""
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


def _pair_block(weight: Tensor) -> Tensor:
    """[[W_r, -W_i], [W_i, W_r]] from a weight that stacks W_r over W_i."""
    w_r, w_i = weight.chunk(2, dim=0)
    return torch.cat([torch.cat([w_r, -w_i], dim=1), torch.cat([w_i, w_r], dim=1)], dim=0)


@lru_cache(maxsize=None)
def _sh1_to_direction() -> Tensor:
    """(3, 3) float64 M with r_hat = Y^1(r_hat) @ M (derived from e3nn, not hard-coded)."""
    basis = o3.spherical_harmonics(1, torch.eye(3, dtype=torch.float64), normalize=True,
                                   normalization="component")       # row k = Y^1(e_k) = (T e_k)^T
    return torch.linalg.inv(basis)


def _cfg(config, name: str, default):
    value = getattr(config, name, None)
    return default if value is None else value


class SO2MessageBlock(nn.Module):
    """SO(2)-convolution graph attention (EquiformerV2 message) with residual; see module docstring.

    Config fields read: l_max, channels, n_heads, so2_m_max (M, 2), n_rbf, species_channels,
    radial_hidden (64), so2_hidden_channels (C), so2_alpha_channels (max(C // H, 8)),
    so2_value_channels (max(C // H, 1)).

    Args:
        config: :class:`est_calc.model.ModelConfig` (or any object with those attributes).
        grid: unused (accepted for interface compatibility with ESTMessageBlock).
    """

    def __init__(self, config: "ModelConfig", grid: nn.Module | None = None):
        super().__init__()
        L, C = int(config.l_max), int(config.channels)
        H = int(_cfg(config, "n_heads", 8))
        M = min(int(_cfg(config, "so2_m_max", 2)), L)
        if L < 0 or C < 1 or H < 1 or M < 0:
            raise ValueError(f"SO2MessageBlock: need l_max >= 0, channels >= 1, n_heads >= 1, "
                             f"so2_m_max >= 0; got {L}, {C}, {H}, {M}")
        c_hidden = int(_cfg(config, "so2_hidden_channels", C))
        d_alpha = int(_cfg(config, "so2_alpha_channels", max(C // H, 8)))
        d_value = int(_cfg(config, "so2_value_channels", max(C // H, 1)))
        n_species = int(_cfg(config, "species_channels", C))
        self.l_max, self.m_max, self.channels, self.n_heads = L, M, C, H
        self.d_alpha, self.d_value, self.c_hidden = d_alpha, d_value, c_hidden

        self.norm = EquivariantLayerNorm(L, C)
        self.wigner = WignerD(L, rows=so2_index(L, M))
        self.conv1 = SO2Linear(L, M, 2 * C, c_hidden, extra_scalars=H * d_alpha + L * c_hidden)
        self.conv2 = SO2Linear(L, M, c_hidden, H * d_value)
        self.radial = RadialMLP(int(config.n_rbf) + 2 * n_species,
                                int(_cfg(config, "radial_hidden", 64)), self.conv1.radial_size)
        self.alpha_norm = nn.LayerNorm(d_alpha)
        self.alpha_dot = nn.Parameter(torch.randn(H, d_alpha) / d_alpha**0.5)
        self.proj = DWLinear(L, H * d_value, C, bias=False)
        # Direction from the l = 1 SH block (only the direction matters; edge_frame normalises).
        self.register_buffer("_sh1_to_dir", _sh1_to_direction().to(torch.get_default_dtype()),
                             persistent=False)
        # Y^l_0(a) for l = 0..L (sqrt(2l + 1) for component normalisation), from e3nn in float64
        # and kept as Python floats, so every dtype gets them rounded once.
        y_axis = o3.spherical_harmonics(list(range(L + 1)), edge_axis(), normalize=True,
                                        normalization="component")
        self._sh_axis = tuple(float(y_axis[l * l + l]) for l in range(L + 1))
        # Reversed edges: edge_frame(-r) = F edge_frame(r) with F = diag(-1, -1, 1) (bitwise), so
        # their Wigner rows are D(F) D(R); on the K_M rows D(F) is diagonal with entries +-1.
        self._pair_sign = _pair_signs(self.wigner)

    def _edge_frames(self, edge_dir: Tensor) -> Tensor:
        """(E, 3, 3) rotations taking each edge direction onto the edge axis (hook for tests)."""
        return edge_frame(edge_dir)

    def edge_rotation(self, edge_vec: Tensor) -> Tensor:
        """Wigner-D rows (E, K_M, K) into each edge's frame: depends on the edges only, so a
        model computes it once and passes it to every block (``edge_rot``)."""
        return self.wigner(self._edge_frames(edge_vec))

    def pair_rotation(self, pair_rot: Tensor) -> Tensor:
        """Wigner rows (E, K_M, K) of a paired edge list (``Graph.paired``) from those of its first
        half (P, K_M, K): the reversed edges' rows are the same times fixed signs."""
        sign = constant(self._pair_sign, pair_rot)
        return torch.cat([pair_rot, pair_rot * sign[:, None]], dim=0)

    def edge_sh_from_rotation(self, edge_rot: Tensor) -> Tensor:
        """The edge SH Y(r_hat) (E, K), component-normalised, read off ``edge_rot``.

        R_e r_hat = a and Y(a) has only its m = 0 entries Y^l_0(a), so Y^l(r_hat) =
        D^l(R_e)^T Y^l(a) = Y^l_0(a) D^l_{0,:}(R_e): the first L + 1 rows of edge_rot (m = 0,
        l = 0..L) scaled per degree. Two cheap operations instead of evaluating the harmonics
        again (and their backward).
        """
        n_m0 = self.l_max + 1
        scale = constant(self._sh_axis, edge_rot)
        return (edge_rot[:, :n_m0, :] * scale[:, None]).sum(dim=1)

    def _logit_bound(self) -> float | None:
        """A bound on |attention logit| from the weights alone, or None while they train.

        LayerNorm output k is w_k n_k + b_k with |n_k| <= sqrt(d - 1), the smooth leaky ReLU
        never increases a magnitude, so |a_h| <= sum_k |alpha_dot_hk| (|w_k| sqrt(d - 1) + |b_k|).
        Computed once per set of weights in inference (it needs a host sync); training and
        torch.compile keep the max-shifted softmax.
        """
        params = [self.alpha_norm.weight, self.alpha_norm.bias, self.alpha_dot]
        if torch.compiler.is_compiling() or any(p.requires_grad for p in params):
            return None

        def bound() -> float:
            d = self.d_alpha
            per_k = self.alpha_norm.weight.abs() * (d - 1) ** 0.5 + self.alpha_norm.bias.abs()
            return float((self.alpha_dot.abs() * per_k).sum(-1).max())

        return derived(self, "logit_bound", params, bound)

    def _modulated_fusable(self) -> bool:
        """Whether the radial modulation and conv1 run as one :class:`ModulatedMap`: frozen
        weights of both (the calculator), eager mode."""
        last = self.radial.last
        return self.conv1._fusable() and not (last.weight.requires_grad or last.bias.requires_grad)

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

    def _gate(self, parts: list[Tensor], gates: Tensor) -> list[Tensor]:
        """SiLU on the l = 0 row, sigmoid(invariant gate of degree l) on the rows of degree l > 0;
        ``parts`` are the m-groups of :meth:`SO2Linear.map_groups` (E, rows, C_h), gated group by
        group (no concatenation, no gather of the gates to every row)."""
        if self.l_max == 0:
            return [torch.nn.functional.silu(parts[0])]
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

    def forward(self, x: Tensor, edge_index: Tensor, edge_sh: Tensor, edge_rbf: Tensor,
                envelope: Tensor, atom_emb: Tensor, edge_vec: Tensor | None = None,
                edge_rot: Tensor | None = None, pair_rot: Tensor | None = None,
                scalars_only: bool = False) -> Tensor:
        """Message passing step with residual.

        Args:
            x: (N, K, C) node features.
            edge_index: (2, E) int64, rows (i = centre, j = neighbour).
            edge_sh: (E, K) component-normalised SH of r_hat_ij (its l = 1 block gives the edge
                direction when edge_vec is None).
            edge_rbf: (E, n_rbf) radial basis of |r_ij|.
            envelope: (E,) envelope u(|r_ij|), 0 at and beyond the cutoff.
            atom_emb: (N, Cz) scalar species embedding.
            edge_vec: optional (E, 3) edge vectors r_ij in Å (only their direction is used).
            edge_rot: optional (E, K_M, K) :meth:`edge_rotation` of these edges (computed here
                when None).
            pair_rot: for a paired edge list (the second half reverses the first, edge for edge;
                ``Graph.paired``), the first half's rotations (E / 2, K_M, K), with ``edge_rot``
                their :meth:`pair_rotation`. The rotated pair features [h_i || h_j] are then
                computed for the first half only: the reversed edge's are
                s * [D h_j || D h_i] with the fixed row signs s.
            scalars_only: return only the l = 0 row of the result, (N, C), computing only what
                it depends on (:meth:`_scalar_messages`; the model's last layer).

        Returns:
            (N, K, C) x plus the aggregated messages ((N, C), its l = 0 row, with scalars_only).
        """
        n_nodes, k, c = x.shape
        if k != (self.l_max + 1) ** 2 or c != self.channels:
            raise ValueError(f"SO2MessageBlock: x must be (N, {(self.l_max + 1) ** 2}, "
                             f"{self.channels}), got {tuple(x.shape)}")
        if edge_index.dim() != 2 or edge_index.shape[0] != 2:
            raise ValueError(f"SO2MessageBlock: edge_index must be (2, E), got {tuple(edge_index.shape)}")
        n_edges = edge_index.shape[1]
        if n_edges == 0:
            return x[:, 0] if scalars_only else x
        if edge_sh.shape != (n_edges, k) or envelope.shape != (n_edges,):
            raise ValueError(f"SO2MessageBlock: edge_sh must be (E, K) and envelope (E,), got "
                             f"{tuple(edge_sh.shape)} and {tuple(envelope.shape)}")
        if edge_rot is None and edge_vec is None:
            if self.l_max < 1:
                raise ValueError("SO2MessageBlock: l_max = 0 needs edge_vec (no l=1 SH to read)")
            edge_vec = edge_sh[:, 1:4] @ self._sh1_to_dir.to(edge_sh.dtype)
        i, j = edge_index[0], edge_index[1]

        if edge_rot is None:
            rot = self.edge_rotation(edge_vec.to(x.dtype))               # (E, K_M, K)
        else:
            rot = edge_rot.to(x.dtype)
            if rot.shape != (n_edges, self.conv1.n_rows, k):
                raise ValueError(f"SO2MessageBlock: edge_rot must be (E, {self.conv1.n_rows}, "
                                 f"{k}), got {tuple(rot.shape)}")
        h = self.norm(x)
        if pair_rot is not None:
            half = n_edges // 2
            if pair_rot.shape != (half, self.conv1.n_rows, k) or 2 * half != n_edges:
                raise ValueError(f"SO2MessageBlock: pair_rot must be (E / 2, {self.conv1.n_rows}, "
                                 f"{k}) for E = {n_edges}, got {tuple(pair_rot.shape)}")
            pair_rot = pair_rot.to(x.dtype)
        radial_in = torch.cat([edge_rbf, gather_rows(atom_emb, i), gather_rows(atom_emb, j)],
                              dim=-1).to(x.dtype)
        y, s_alpha, gates = self._first_map(h, i, j, rot, pair_rot, radial_in, scalars_only)
        if scalars_only:
            return self._scalar_messages(x, y[0], s_alpha, gates, envelope, i)
        v, _ = self.conv2.map_to_whole(self._gate(y, gates))            # (E, K_M, H d_v)
        v = v * self._value_weights(s_alpha, envelope, i, n_nodes).unsqueeze(1)
        msg = torch.bmm(rot.transpose(1, 2), v)                         # D^T back to global frame
        agg = msg.new_zeros(n_nodes, k, msg.shape[-1]).index_add(0, i, msg)
        return x + self.proj(agg)

    def _value_weights(self, s_alpha: Tensor, envelope: Tensor, i: Tensor, n_nodes: int) -> Tensor:
        """u_e alpha_eh per value channel (E, H d_v) from the attention scalars (E, H d_alpha)."""
        n_edges = s_alpha.shape[0]
        a = self.alpha_norm(s_alpha.view(n_edges, self.n_heads, self.d_alpha))
        logits = (smooth_leaky_relu(a) * self.alpha_dot).sum(-1)        # (E, H)
        u = envelope.to(s_alpha.dtype)
        alpha = segment_softmax(logits, u, i, n_nodes, bound=self._logit_bound()) * u.unsqueeze(-1)
        # alpha per value channel (head-major, as v's channels), then one broadcast over rows: a
        # broadcast over the innermost d_v channels of (E, K_M, H, d_v) is several times slower
        # on the CPU, forward and backward (the gradient of alpha becomes a strided reduction).
        return alpha.unsqueeze(-1).expand(n_edges, self.n_heads, self.d_value).reshape(n_edges, -1)

    def _first_map(self, h: Tensor, i: Tensor, j: Tensor, rot: Tensor, pair_rot: Tensor | None,
                   radial_in: Tensor, scalars_only: bool) -> tuple[list[Tensor], Tensor, Tensor]:
        """conv1 on the radially modulated rotated pairs z = D_e [h_i || h_j]: its m-groups, the
        attention scalars and the gates. With ``scalars_only`` only the m = 0 rows of z (the first
        L + 1 of the K_M layout) are rotated and modulated and only conv1's m = 0 part runs
        (:meth:`_scalar_messages`); y is then the single m = 0 group."""
        conv1 = self.conv1
        n_rows = self.l_max + 1 if scalars_only else conv1.n_rows
        # [h_i || h_j] in one row gather (backward: index_adds of contiguous gradients).
        paired = pair_rot is not None
        if paired:
            half = i.shape[0] // 2
            z = torch.bmm(pair_rot[:, :n_rows], gather_pairs(h, i[:half], j[:half]))
        else:
            z = torch.bmm(rot[:, :n_rows], gather_pairs(h, i, j))
        hid = self.radial.hidden(radial_in)
        # The two SO(2) maps and the gate between them work on the m-groups (see map_groups).
        if self._modulated_fusable():
            # Frozen weights: modulation and conv1 in cache-sized blocks, both halves of a paired
            # list from the first half's z (est_calc.nn.modulated_map).
            if scalars_only:
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
            z = z * torch.nn.functional.linear(hid, w[:width], b[:width]).view(z.shape)
            # map_groups of the m = 0 group alone is conv1's m = 0 part (fc0 and the scalars)
            y, scalars = conv1.map_groups([z]) if scalars_only else conv1.map_whole_input(z)
        s_alpha, gates = scalars.split([self.n_heads * self.d_alpha, self.l_max * self.c_hidden], -1)
        return y, s_alpha, gates

    def _scalar_messages(self, x: Tensor, y0: Tensor, s_alpha: Tensor, gates: Tensor,
                         envelope: Tensor, i: Tensor) -> Tensor:
        """The l = 0 row of ``forward``'s result, (N, C), from conv1's m = 0 rows y0 (E, L + 1,
        C_h), the attention scalars and the gates (:meth:`_first_map` with scalars_only).

        The message's l = 0 row is D_e^T's l = 0 row (1 on the m = 0, l = 0 row of the edge
        frame, 0 elsewhere: D is block diagonal in l) times v, i.e. v's (m = 0, l = 0) row, and
        proj maps l = 0 to l = 0. That row of SO2Linear_2 reads the m = 0 rows of the gated y
        only; those, the gates and the attention scalars come from SO2Linear_1's m = 0 part,
        which reads the m = 0 rows of z. So only L + 1 of the K_M rows of z are rotated and
        modulated, and the m > 0 maps and the back rotation are skipped: the same numbers as
        ``forward(...)[:, 0]``.
        """
        n_nodes, n_edges = x.shape[0], i.shape[0]
        (gated,) = self._gate([y0], gates)
        fc0, width_v = self.conv2.fc0, self.n_heads * self.d_value
        v0 = torch.addmm(fc0.bias[:width_v], gated.reshape(n_edges, -1), fc0.weight[:width_v].t())
        msg = v0 * self._value_weights(s_alpha, envelope, i, n_nodes)
        agg = msg.new_zeros(n_nodes, msg.shape[1]).index_add(0, i, msg)
        return x[:, 0] + self.proj.forward_scalars(agg)

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

    def extra_repr(self) -> str:
        return (f"l_max={self.l_max}, m_max={self.m_max}, channels={self.channels}, "
                f"heads={self.n_heads}, alpha={self.d_alpha}, value={self.d_value}")
