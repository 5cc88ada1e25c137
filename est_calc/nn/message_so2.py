"""EquiformerV2-style SO(2) graph-attention message block (EST_SPEC 7.1), smooth and conservative.

Per edge i <- j (i = centre), with D_e = ``edges.rotation`` the Wigner-D rows |m| <= M of a
rotation R_e taking r_hat_ij onto the edge axis (y in e3nn 0.6.0; :mod:`est_calc.nn.wigner`):

=================================================================  ==============================
equation                                                           code (``forward``)
=================================================================  ==============================
h = EquivariantLayerNorm(x)                                        ``self.norm``
z_e = D_e [h_i || h_j]                            (K_M, 2C)        rotate
z_e <- z_e * R(rbf, emb_i, emb_j)                 per (m, l, c)    modulate (``self.radial``)
y, s = SO2Linear_1(z_e)                           (K_M, C_h)       conv (``self.conv1``)
y <- Gate(y; gates from s)                        SiLU on l = 0,   gate (``gate()``)
                                                  sigmoid on l > 0
v = SO2Linear_2(y)                                (K_M, H d_v)     conv (``self.conv2``)
a_eh = a_h . SmoothLeakyReLU(LayerNorm(s_h))      (H,)             attend (``attention_weights()``)
alpha_eh = u_e exp(a_eh) / sum_{e' -> i} u_e' exp(a_e'h)
  (+ w_h / <deg> with ``neighbour_sum``)                                   ``attention_weights()``
x_i += DWLinear( sum_j D_e^T (u_e alpha_eh v_eh) )                 rotate back, sum, ``self.proj``
=================================================================  ==============================

The softmax makes the message a weighted *mean* over the neighbours: the weights sum to one
whatever their number, so within this block the count of neighbours reaches the message only
through the envelope (the model's edge-degree embedding, before the first layer, is a sum).
``neighbour_sum`` adds a learned per-head weight w_h / <deg> to every alpha_eh (w_h
starts at 1), i.e. the plain neighbour sum that the "est" block (``message.py``) keeps beside its
attention: an atom with one neighbour fewer then also receives one message fewer.

SO2Linear: for m = 0 an ordinary linear map over (l, channel); for m > 0 the pair
(x_{+m}, x_{-m}) maps as y_{+m} = W_r x_{+m} - W_i x_{-m}, y_{-m} = W_i x_{+m} + W_r x_{-m}, which
commutes with the roll about the edge axis (a 2-D rotation by m phi of every (+m, -m) pair, with
the same handedness for every l). Hence the result does not depend on the roll of R_e, and
D_e^T f(D_e x) is exactly SO(3)-equivariant.

:class:`ScalarSO2MessageBlock` is the block built for the model's last layer: it returns the l = 0
row of the result only. That row is v's (m = 0, l = 0) row (D_e is block diagonal in l and
D^0 = 1) mapped by proj's l = 0 weight; it reads the m = 0 rows of the gated y, which with the
gates and the attention scalars come from SO2Linear_1's m = 0 part, which reads the m = 0 rows of
z. So only the L + 1 m = 0 rows are rotated and modulated, and the m > 0 maps and the back
rotation are not computed.

Smoothness and gradients: the Wigner-D matrices are polynomials in R_e (no Euler angles), nothing
on the geometric path is detached, every message carries u_e (C^2 to zero at the cutoff), and the
softmax uses u_e as a multiplicative weight (edges with u_e <= 0 are masked, never log(0)). Atoms
without edges (or with all u = 0) receive exactly zero message, also in gradients.

Faster forms of the same block (paired edge lists, blocked radial modulation, fused SO(2) maps)
are in :mod:`est_calc.accel.so2_message`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from est_calc.nn.edges import EdgeFeatures
from est_calc.nn.radial import RadialMLP
from est_calc.nn.so3 import DWLinear, EquivariantLayerNorm
from est_calc.nn.wigner import so2_index

__all__ = ["SO2Linear", "SO2MessageBlock", "ScalarSO2MessageBlock", "segment_softmax",
           "smooth_leaky_relu"]


def smooth_leaky_relu(x: Tensor, slope: float = 0.2) -> Tensor:
    """C^inf leaky ReLU: ((1+a)/2) x + ((1-a)/2) x (2 sigmoid(x) - 1) = a x + (1-a) SiLU(x).

    The second form is the same function in three operations instead of seven.
    """
    return torch.add(x * slope, F.silu(x), alpha=1.0 - slope)


def segment_softmax(logits: Tensor, weight: Tensor, segment: Tensor, n_segments: int) -> Tensor:
    """Weighted softmax over the edges of each segment (centre atom).

    alpha_e = w_e exp(a_e) / sum_{e' in seg(e)} w_e' exp(a_e'), i.e. a softmax of a_e + log w_e,
    computed without a logarithm. Edges with w_e <= 0 get alpha = 0; segments without any
    positive-weight edge get alpha = 0 everywhere (no 0/0, also in gradients). Each segment's
    largest logit is subtracted first (it cancels exactly; it only keeps exp() finite).

    Args:
        logits: (E, H) logits a.
        weight: (E,) non-negative weights w (the envelope).
        segment: (E,) int64 segment index of each edge.
        n_segments: number of segments N.

    Returns:
        (E, H) attention weights.
    """
    valid = (weight > 0).unsqueeze(-1)
    # The shift cancels between numerator and denominator, so it carries no gradient (detaching
    # it is exact, and avoids differentiating through a max).
    masked = torch.where(valid, logits, torch.full_like(logits, -torch.inf)).detach()
    shift = logits.new_full((n_segments, logits.shape[1]), -torch.inf)
    shift = shift.scatter_reduce(0, segment[:, None].expand_as(masked), masked, "amax")
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    expo = torch.exp(torch.where(valid, logits - shift.index_select(0, segment),
                                 torch.zeros_like(logits)))
    return normalized_by_segment(expo, weight, valid, segment, n_segments)


def normalized_by_segment(expo: Tensor, weight: Tensor, valid: Tensor, segment: Tensor,
                          n_segments: int) -> Tensor:
    """w_e expo_e / sum_{e' in seg(e)} w_e' expo_e', zero where ``valid`` is False and on
    segments without a valid edge (the last step of :func:`segment_softmax`)."""
    w = torch.where(valid, weight.unsqueeze(-1) * expo, torch.zeros_like(expo))
    denom = w.new_zeros(n_segments, w.shape[1]).index_add(0, segment, w)
    # denom > 0 on segments with a valid edge (exp(a) * min positive weight); 0 only on empty ones.
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    return w / denom.index_select(0, segment)


class SO2Linear(nn.Module):
    """Roll-equivariant linear map on edge-frame coefficients with |m| <= M.

    Input layout (K_M rows) as :func:`est_calc.nn.wigner.so2_index`: m = 0 for l = 0..L, then
    (+m rows, -m rows) for l = m..L, m = 1..M. Parameters: ``fc0`` maps the m = 0 rows (and
    produces the extra invariant scalars); ``fcm[m - 1].weight`` stacks W_r over W_i of order m.

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
            radial: optional (E, radial_size) multiplicative weights, one per (m, l, channel),
                shared by the +m and -m rows.

        Returns:
            (E, K_M, Cout) coefficients and (E, extra_scalars) invariant scalars.
        """
        if x.dim() != 3 or x.shape[1:] != (self.n_rows, self.in_channels):
            raise ValueError(f"SO2Linear: expected x (E, {self.n_rows}, {self.in_channels}), "
                             f"got {tuple(x.shape)}")
        n_edges, n0, c_out = x.shape[0], self.l_max + 1, self.out_channels
        if radial is not None:
            x = x * radial.view(n_edges, self.n_radial_rows, self.in_channels)[:, self._radial_row]
        groups = x.split(self._group_sizes, dim=1)
        y0, extra = self.fc0(groups[0].reshape(n_edges, -1)).split(
            [n0 * c_out, self.extra_scalars], dim=-1)
        parts = [y0.view(n_edges, n0, c_out)]
        for m, (fc, pair) in enumerate(zip(self.fcm, groups[1:]), start=1):
            n = self.l_max - m + 1
            x_pos, x_neg = pair[:, :n].reshape(n_edges, -1), pair[:, n:].reshape(n_edges, -1)
            w_r, w_i = fc.weight.chunk(2, dim=0)
            parts.append((x_pos @ w_r.t() - x_neg @ w_i.t()).view(n_edges, n, c_out))
            parts.append((x_pos @ w_i.t() + x_neg @ w_r.t()).view(n_edges, n, c_out))
        return torch.cat(parts, dim=1), extra

    def extra_repr(self) -> str:
        return (f"l_max={self.l_max}, m_max={self.m_max}, in={self.in_channels}, "
                f"out={self.out_channels}, extra={self.extra_scalars}")


class SO2MessageBlock(nn.Module):
    """SO(2)-convolution graph attention (EquiformerV2 message) with residual; see the module
    docstring for the equations.

    Args:
        l_max: maximum degree L.
        m_max: maximum order M kept in the edge frame (<= L).
        channels: C.
        n_heads: attention heads H.
        n_rbf: width of the radial basis.
        species_channels: width Cz of the scalar species embedding.
        radial_hidden: hidden width of the radial MLP.
        hidden_channels: C_h, channels between the two SO(2) maps (default C).
        alpha_channels: d_alpha, attention scalars per head (default max(C // H, 8)).
        value_channels: d_v, value channels per head (default max(C // H, 1)).
        neighbour_sum: add w_h / avg_degree to the attention weights (module docstring).
        avg_degree: <deg>, the normaliser of that sum (typical number of neighbours).
    """

    def __init__(self, l_max: int, m_max: int, channels: int, *, n_heads: int, n_rbf: int,
                 species_channels: int, radial_hidden: int, hidden_channels: int | None = None,
                 alpha_channels: int | None = None, value_channels: int | None = None,
                 neighbour_sum: bool = False, avg_degree: float = 1.0):
        super().__init__()
        L, M, C, H = l_max, m_max, channels, n_heads
        if L < 0 or not 0 <= M <= L or C < 1 or H < 1:
            raise ValueError(f"SO2MessageBlock: need l_max >= 0, 0 <= m_max <= l_max, "
                             f"channels >= 1, n_heads >= 1; got {L}, {M}, {C}, {H}")
        c_hidden = C if hidden_channels is None else hidden_channels
        d_alpha = max(C // H, 8) if alpha_channels is None else alpha_channels
        d_value = max(C // H, 1) if value_channels is None else value_channels
        self.l_max, self.m_max, self.channels, self.n_heads = L, M, C, H
        self.d_alpha, self.d_value, self.c_hidden = d_alpha, d_value, c_hidden

        self.norm = EquivariantLayerNorm(L, C)
        self.conv1 = SO2Linear(L, M, 2 * C, c_hidden, extra_scalars=H * d_alpha + L * c_hidden)
        self.conv2 = SO2Linear(L, M, c_hidden, H * d_value)
        self.radial = RadialMLP(n_rbf + 2 * species_channels, radial_hidden, self.conv1.radial_size)
        self.alpha_norm = nn.LayerNorm(d_alpha)
        self.alpha_dot = nn.Parameter(torch.randn(H, d_alpha) / d_alpha**0.5)
        self.w_sum = nn.Parameter(torch.ones(H)) if neighbour_sum else None
        self.avg_degree = float(avg_degree)
        self.proj = DWLinear(L, H * d_value, C, bias=False)
        degree = [int(k**0.5) for k in so2_index(L, M).tolist()]
        self.register_buffer("_row_degree", torch.tensor(degree, dtype=torch.long),
                             persistent=False)

    def _check(self, x: Tensor, edges: EdgeFeatures) -> None:
        k = (self.l_max + 1) ** 2
        if x.dim() != 3 or x.shape[1:] != (k, self.channels):
            raise ValueError(f"{type(self).__name__}: x must be (N, {k}, {self.channels}), got "
                             f"{tuple(x.shape)}")
        rot = edges.rotation
        if rot is None or rot.shape != (edges.n_edges, self.conv1.n_rows, k):
            raise ValueError(f"{type(self).__name__}: edges.rotation must be (E, "
                             f"{self.conv1.n_rows}, {k}), got "
                             f"{None if rot is None else tuple(rot.shape)}")

    def gate(self, y: Tensor, gates: Tensor) -> Tensor:
        """SiLU on the l = 0 row (row 0 of the K_M layout), sigmoid of the invariant gate of
        degree l on every row of degree l > 0: y (E, K_M, C_h), gates (E, L C_h)."""
        g = torch.sigmoid(gates.view(-1, self.l_max, self.c_hidden))
        return torch.cat([F.silu(y[:, :1]), y[:, 1:] * g[:, self._row_degree[1:] - 1]], dim=1)

    def attention_weights(self, s_alpha: Tensor, envelope: Tensor, center: Tensor,
                          n_nodes: int) -> Tensor:
        """u_e alpha_eh (E, H) from the attention scalars s_alpha (E, H d_alpha) (with the
        neighbour-sum weight w_h / <deg> added to alpha_eh when the block has one)."""
        a = self.alpha_norm(s_alpha.view(-1, self.n_heads, self.d_alpha))
        logits = (smooth_leaky_relu(a) * self.alpha_dot).sum(-1)
        return self.with_sum(segment_softmax(logits, envelope, center, n_nodes)) \
            * envelope.unsqueeze(-1)

    def with_sum(self, alpha: Tensor) -> Tensor:
        """alpha (E, H) plus w_h / <deg> when the block has a neighbour sum, else alpha."""
        return alpha if self.w_sum is None else alpha + self.w_sum / self.avg_degree

    def forward(self, x: Tensor, edges: EdgeFeatures) -> Tensor:
        """x (N, K, C) -> x plus the aggregated messages (N, K, C)."""
        self._check(x, edges)
        n_nodes, n_edges = x.shape[0], edges.n_edges
        if n_edges == 0:
            return x
        i, j, rot = edges.center, edges.neighbor, edges.rotation
        h = self.norm(x)
        z = rot @ torch.cat([h[i], h[j]], dim=-1)                         # rotate (E, K_M, 2C)
        y, s = self.conv1(z, self.radial(edges.radial_in))                 # modulate, conv
        s_alpha, gates = s.split([self.n_heads * self.d_alpha, self.l_max * self.c_hidden], -1)
        v, _ = self.conv2(self.gate(y, gates))                             # gate, conv
        alpha = self.attention_weights(s_alpha, edges.envelope, i, n_nodes)  # attend (E, H)
        v = v.view(n_edges, -1, self.n_heads, self.d_value) * alpha[:, None, :, None]
        msg = rot.transpose(1, 2) @ v.flatten(2)                           # rotate back (E, K, H d_v)
        return x + self.proj(msg.new_zeros(n_nodes, *msg.shape[1:]).index_add(0, i, msg))

    def extra_repr(self) -> str:
        return (f"l_max={self.l_max}, m_max={self.m_max}, channels={self.channels}, "
                f"heads={self.n_heads}, alpha={self.d_alpha}, value={self.d_value}"
                + (f", neighbour_sum (<deg> {self.avg_degree:g})" if self.w_sum is not None
                   else ""))


class ScalarSO2MessageBlock(SO2MessageBlock):
    """The l = 0 row (N, C) of :class:`SO2MessageBlock`'s result from the m = 0 rows alone
    (module docstring); same constructor and parameters, for the model's last layer."""

    def forward(self, x: Tensor, edges: EdgeFeatures) -> Tensor:
        """x (N, K, C) -> (N, C), the l = 0 row of ``SO2MessageBlock.forward``."""
        self._check(x, edges)
        n_nodes, n_edges = x.shape[0], edges.n_edges
        if n_edges == 0:
            return x[:, 0]
        i, j = edges.center, edges.neighbor
        n0, c_in, c_h = self.l_max + 1, 2 * self.channels, self.c_hidden
        h = self.norm(x)
        z0 = edges.rotation[:, :n0] @ torch.cat([h[i], h[j]], dim=-1)    # m = 0 rows (E, L+1, 2C)
        radial0 = self.radial(edges.radial_in)[:, :n0 * c_in]             # their slots come first
        out0 = self.conv1.fc0((z0 * radial0.view(n_edges, n0, c_in)).flatten(1))
        y0, s_alpha, gates = out0.split(
            [n0 * c_h, self.n_heads * self.d_alpha, self.l_max * c_h], dim=-1)
        y0 = y0.view(n_edges, n0, c_h)                                     # rows l = 0..L
        gated = torch.cat([F.silu(y0[:, :1]),
                           y0[:, 1:] * torch.sigmoid(gates.view(n_edges, self.l_max, c_h))], 1)
        width = self.n_heads * self.d_value                                # conv2's (0, 0) row
        fc0 = self.conv2.fc0
        v0 = F.linear(gated.flatten(1), fc0.weight[:width], fc0.bias[:width])
        alpha = self.attention_weights(s_alpha, edges.envelope, i, n_nodes)
        msg0 = (v0.view(n_edges, self.n_heads, self.d_value) * alpha[:, :, None]).flatten(1)
        agg0 = msg0.new_zeros(n_nodes, width).index_add(0, i, msg0)
        return x[:, 0] + agg0 @ self.proj.weight[0]
