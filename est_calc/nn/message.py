"""Full-EST message block (EST_SPEC 7.2): spherical cross-attention on every edge.

Interface shared by the message blocks (``ESTMessageBlock`` here, ``SO2MessageBlock`` in
``message_so2.py``)::

    x_new = block(x, edges)

    x       (N, K, C)     steerable node features, K = (L+1)^2, e3nn order
    edges   EdgeFeatures  the batch's edges (:mod:`est_calc.nn.edges`): centre i, neighbour j,
                          Y(r_hat_ij), radial inputs, envelope u(|r_ij|) (0 at the cutoff)
    x_new   (N, K, C)     x + aggregated message (the residual is included)

Per edge, with C_f = fourier_channels < C:

    h     = EquivariantLayerNorm(x)
    m_ij  = DWLinear_dst(h_i) + DWLinear_src(h_j)                     (K, C_f)
    e_ij  = R_l(rbf, Z_i, Z_j) Y^l(r_hat_ij)                            (K, C_f), R shared over m
    f_ij  = SphericalAttention(Q from F m_ij, K/V from F e_ij)         (S, C_f)   cross-attention
    f_ij += FFN(f_ij)                                                   point-wise
    mu_ij = DWLinear_out(F^-1 f_ij)                                     (K, C)
    a_ij  = MLP(mu_ij^(0))  (invariant logit, bounded by tanh)
    alpha_ij = u_ij exp(a_ij) / (sum_k u_ik exp(a_ik) + eps)            (log u added to the logits)
    x_i  += sum_j u_ij mu_ij * (w_sum / <deg> + w_att alpha_ij)         per-channel w_sum, w_att

Smoothness: every edge term carries u_ij, and alpha_ij is smooth (the eps keeps it finite when all
of i's neighbours sit at the cutoff, where u = 0; no log(0) or 0/0 appears, also in gradients). An
atom with no edges receives exactly zero message. There is no cap on the number of neighbours.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from est_calc.nn.attention import SphericalAttention
from est_calc.nn.edges import EdgeFeatures
from est_calc.nn.embedding import degree_of_index
from est_calc.nn.radial import RadialMLP
from est_calc.nn.so3 import DWLinear, EquivariantLayerNorm
from est_calc.sphere import SphericalGrid

__all__ = ["ESTMessageBlock", "ScalarESTMessageBlock", "neighbour_attention"]

# Logits are squashed to (-LOGIT_BOUND, LOGIT_BOUND) so exp() can never overflow and no running
# maximum (a non-smooth operation) is needed.
LOGIT_BOUND = 10.0
# Added to the softmax denominator: keeps alpha and its derivatives finite when every neighbour of
# an atom is at the cutoff (all u = 0). Far below any real denominator (>= u e^-10).
DENOM_EPS = 1e-12


def neighbour_attention(logits: Tensor, envelope: Tensor, centre: Tensor, n_nodes: int) -> Tensor:
    """Envelope-weighted softmax over the neighbours of each centre.

    alpha_ij = u_ij exp(a_ij) / (sum_k u_ik exp(a_ik) + eps), i.e. a softmax with log u added to
    the logits, computed without a logarithm so u = 0 is safe.

    Args:
        logits: (E,) or (E, H) raw logits a_ij.
        envelope: (E,) u_ij in [0, 1].
        centre: (E,) int64 centre index i of each edge.
        n_nodes: N.

    Returns:
        alpha with the shape of ``logits``; sums to ~1 over the edges of each centre with u > 0.
    """
    a = LOGIT_BOUND * torch.tanh(logits / LOGIT_BOUND)
    u = envelope if a.ndim == 1 else envelope.unsqueeze(-1)
    w = u * torch.exp(a)
    denom = w.new_zeros((n_nodes,) + tuple(w.shape[1:])).index_add(0, centre, w)
    return w / (denom[centre] + DENOM_EPS)


class ESTMessageBlock(nn.Module):
    """Full-EST message block; see the module docstring for the equations.

    Args:
        l_max: maximum degree L.
        channels: C.
        grid: the ``est_calc.sphere.SphericalGrid`` of the per-edge signals.
        fourier_channels: C_f, channels of the per-edge grid signal.
        n_heads: heads of the per-edge cross-attention (divides C_f).
        l_roe: Legendre terms of its orientation bias.
        n_rbf: width of the radial basis.
        species_channels: width Cz of the scalar species embedding.
        radial_hidden: hidden width of the radial MLP.
        hidden_mult: hidden width multiplier of the point-wise FFN.
        avg_degree: <deg>, the normaliser of the plain neighbour sum.
        edge_chunk_size: edges processed per grid pass (bounds the E x S x C_f transient).
    """

    def __init__(self, l_max: int, channels: int, grid: SphericalGrid, *, fourier_channels: int,
                 n_heads: int, l_roe: int, n_rbf: int, species_channels: int, radial_hidden: int,
                 hidden_mult: int, avg_degree: float, edge_chunk_size: int = 8192):
        super().__init__()
        L, C, Cf = l_max, channels, fourier_channels
        self.l_max, self.channels, self.fourier_channels = L, C, Cf
        self.avg_degree = float(avg_degree)
        if edge_chunk_size < 1:
            raise ValueError(f"edge_chunk_size must be >= 1, got {edge_chunk_size}")
        self.edge_chunk_size = int(edge_chunk_size)

        self.norm = EquivariantLayerNorm(L, C)
        self.lin_dst = DWLinear(L, C, Cf, bias=True)
        self.lin_src = DWLinear(L, C, Cf, bias=False)
        self.radial = RadialMLP(n_rbf + 2 * species_channels, radial_hidden, (L + 1) * Cf)
        self.grid = grid
        self.attention = SphericalAttention(Cf, grid, n_heads=n_heads, l_roe=l_roe,
                                            kv_channels=Cf)
        hidden = hidden_mult * Cf
        self.ffn = nn.Sequential(nn.LayerNorm(Cf), nn.Linear(Cf, hidden), nn.SiLU(),
                                 nn.Linear(hidden, Cf))
        self.lin_out = DWLinear(L, Cf, C, bias=True)
        self.logit = nn.Sequential(nn.Linear(C, C), nn.SiLU(), nn.Linear(C, 1))
        self.w_sum = nn.Parameter(torch.ones(C))
        self.w_att = nn.Parameter(torch.ones(C))
        self.register_buffer("degree_index", degree_of_index(L), persistent=False)

    def edge_signal(self, m: Tensor, e: Tensor) -> Tensor:
        """mu before lin_out: F^-1 of the attended grid signal plus its FFN, (B, K, C_f), from
        the pair signal m (B, K, C_f) and the edge signal e (B, K, C_f) of B edges."""
        f = self.attention(self.grid.to_grid(m), kv=self.grid.to_grid(e))
        f = f + self.ffn(f)
        return self.grid.from_grid(f)

    def forward(self, x: Tensor, edges: EdgeFeatures) -> Tensor:
        """Apply the block; shapes as in the module docstring. Returns x + message."""
        n_nodes, n_edges = x.shape[0], edges.n_edges
        if n_edges == 0:
            return x
        i, j, u = edges.center, edges.neighbor, edges.envelope
        h = self.norm(x)
        m = self.lin_dst(h)[i] + self.lin_src(h)[j]                            # (E, K, Cf)
        coeff = self.radial(edges.radial_in).view(n_edges, self.l_max + 1, self.fourier_channels)
        e = coeff[:, self.degree_index] * edges.sh.unsqueeze(-1)               # R_l Y^l
        n = self.edge_chunk_size
        # One pass when the edges fit a chunk: no Python loop over a size (a traced or exported
        # graph then keeps the edge count symbolic, est_calc.deploy).
        mu = (self.edge_signal(m, e) if n_edges <= n else
              torch.cat([self.edge_signal(m[s:s + n], e[s:s + n]) for s in range(0, n_edges, n)]))
        mu = self.lin_out(mu)                                                  # (E, K, C)
        alpha = neighbour_attention(self.logit(mu[:, 0]).squeeze(-1), u, i, n_nodes)
        weight = u.unsqueeze(-1) * (self.w_sum / self.avg_degree + alpha.unsqueeze(-1) * self.w_att)
        return x.index_add(0, i, mu * weight.unsqueeze(1))


class ScalarESTMessageBlock(ESTMessageBlock):
    """The l = 0 row (N, C) of :class:`ESTMessageBlock`'s result, for the model's last layer.

    The per-edge attention mixes every degree into every grid point, so the row needs the whole
    per-edge signal: the same computation, its l = 0 row returned.
    """

    def forward(self, x: Tensor, edges: EdgeFeatures) -> Tensor:
        """x (N, K, C) -> (N, C), the l = 0 row of ``ESTMessageBlock.forward``."""
        return super().forward(x, edges)[:, 0]
