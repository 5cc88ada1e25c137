"""Full-EST message block (EST_SPEC 7.2): spherical cross-attention on every edge.

Interface shared by every message block (``ESTMessageBlock`` here, ``SO2MessageBlock`` in
``message_so2.py``)::

    block = Block(config: ModelConfig, grid: SphericalGrid)
    x_new = block(x, edge_index, edge_sh, edge_rbf, envelope, atom_emb)

    x          (N, K, C)     steerable node features, K = (L+1)^2, e3nn order
    edge_index (2, E) int64  rows (i = centre, j = neighbour); messages j -> i are summed onto i
    edge_sh    (E, K)        Y(r_hat_ij), component normalisation (Y_00 = 1)
    edge_rbf   (E, n_rbf)    radial basis of |r_ij| (config.n_rbf functions of kind config.rbf)
    envelope   (E,)          polynomial envelope u(|r_ij|), exactly 0 at and beyond the cutoff
    atom_emb   (N, Cz)       scalar species embedding, Cz = config.species_channels
    x_new      (N, K, C)     x + aggregated message (the residual is included)

Per edge, with C_f = config.fourier_channels < C:

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

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from est_calc.nn.embedding import degree_of_index
from est_calc.nn.gather import gather_rows
from est_calc.nn.radial import RadialMLP

if TYPE_CHECKING:  # pragma: no cover
    from est_calc.model import ModelConfig

__all__ = ["ESTMessageBlock", "neighbour_attention"]

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
        config: the model configuration (uses l_max, channels, fourier_channels, message_heads,
            l_roe, n_rbf, species_channels, radial_hidden, hidden_mult, avg_degree).
        grid: the shared ``est_calc.sphere.SphericalGrid``.
        edge_chunk_size: edges processed per grid pass (bounds the E x S x C_f transient).
    """

    def __init__(self, config: "ModelConfig", grid: nn.Module, edge_chunk_size: int = 8192):
        super().__init__()
        from est_calc.nn.attention import SphericalAttention
        from est_calc.nn.so3 import DWLinear, EquivariantLayerNorm

        L, C, Cf = config.l_max, config.channels, config.fourier_channels
        self.l_max, self.channels, self.fourier_channels = L, C, Cf
        self.avg_degree = float(config.avg_degree)
        if edge_chunk_size < 1:
            raise ValueError(f"edge_chunk_size must be >= 1, got {edge_chunk_size}")
        self.edge_chunk_size = int(edge_chunk_size)

        self.norm = EquivariantLayerNorm(L, C)
        self.lin_dst = DWLinear(L, C, Cf, bias=True)
        self.lin_src = DWLinear(L, C, Cf, bias=False)
        self.radial = RadialMLP(config.n_rbf + 2 * config.species_channels, config.radial_hidden,
                                (L + 1) * Cf)
        self.grid = grid
        self.attention = SphericalAttention(Cf, grid, n_heads=config.message_heads,
                                            l_roe=config.l_roe, kv_channels=Cf)
        hidden = config.hidden_mult * Cf
        self.ffn = nn.Sequential(nn.LayerNorm(Cf), nn.Linear(Cf, hidden), nn.SiLU(),
                                 nn.Linear(hidden, Cf))
        self.lin_out = DWLinear(L, Cf, C, bias=True)
        self.logit = nn.Sequential(nn.Linear(C, C), nn.SiLU(), nn.Linear(C, 1))
        self.w_sum = nn.Parameter(torch.ones(C))
        self.w_att = nn.Parameter(torch.ones(C))
        self.register_buffer("degree_index", degree_of_index(L), persistent=False)

    def _node_queries(self, h: Tensor) -> Tensor:
        """F(W_dst h) and F(W_src h) side by side, (N, S, 2 Cf), as one matrix product.

        The depth-wise weights and the grid transform F are folded into one (K C, S 2Cf) matrix
        (a few hundred kB, built from the parameters each call), so the node side costs one
        matrix product instead of two DWLinear + two grid transforms.
        """
        g = self.grid.to_grid_matrix.to(h.dtype)  # (S, K)
        w = torch.cat([self.lin_dst.weight, self.lin_src.weight], dim=-1)[self.degree_index]
        mat = torch.einsum("sk,kco->kcso", g, w).reshape(h.shape[1] * h.shape[2], -1)
        bias = torch.cat([self.lin_dst.bias, torch.zeros_like(self.lin_dst.bias)])
        bias = (g[:, :1] * bias).reshape(-1)  # the bias sits on l = 0 only
        out = torch.addmm(bias, h.reshape(h.shape[0], -1), mat)
        return out.view(h.shape[0], g.shape[0], 2 * self.fourier_channels)

    def _edge_grid(self, q: tuple[Tensor, Tensor], i: Tensor, j: Tensor, yg: Tensor, coeff: Tensor) -> Tensor:
        """Cross-attention + FFN on the grid for a chunk of edges.

        Args:
            q: two (N, S, Cf) node signals on the grid, F W_dst h and F W_src h (F is linear, so
                F m_ij = F(W_dst h_i) + F(W_src h_j) is gathered instead of transformed per edge).
            i, j: (B,) centre and neighbour indices of the chunk.
            yg: (B, S, L+1) per-degree parts of Y(r_hat) on the grid, sum_{m} F_sk Y_k.
            coeff: (B, L+1, Cf) radial coefficients R_l.

        Returns:
            (B, K, Cf) coefficients of the processed edge signal.
        """
        # F e_ij = sum_l R_l (F Y^l): one batched (S, L+1) x (L+1, Cf) product per edge instead
        # of broadcasting R over m into a (B, K, Cf) tensor and transforming it.
        kv = torch.bmm(yg, coeff)
        f = self.attention(q[0].index_select(0, i) + q[1].index_select(0, j), kv=kv)
        f = f + self.ffn(f)
        return self.grid.from_grid(f)

    def forward(self, x: Tensor, edge_index: Tensor, edge_sh: Tensor, edge_rbf: Tensor,
                envelope: Tensor, atom_emb: Tensor) -> Tensor:
        """Apply the block; shapes as in the module docstring. Returns x + message."""
        n_nodes, n_edges = x.shape[0], edge_index.shape[1]
        if n_edges == 0:
            return x
        i, j = edge_index[0], edge_index[1]
        q = self._node_queries(self.norm(x))  # (N, S, 2 Cf)
        # Contiguous halves so the per-edge gathers are index_select (backward: index_add).
        q = (q[..., :self.fourier_channels].contiguous(),
             q[..., self.fourier_channels:].contiguous())

        radial_in = torch.cat([edge_rbf, gather_rows(atom_emb, i), gather_rows(atom_emb, j)],
                              dim=-1)
        coeff = self.radial(radial_in).view(n_edges, self.l_max + 1, self.fourier_channels)
        # (K, S (L+1)) matrix taking Y(r_hat) to its per-degree grid values.
        g = self.grid.to_grid_matrix.to(edge_sh.dtype)
        onehot = (self.degree_index[:, None] == torch.arange(self.l_max + 1,
                                                              device=g.device)).to(g.dtype)
        per_degree = (g.t()[:, :, None] * onehot[:, None, :]).reshape(g.shape[1], -1)
        yg = (edge_sh @ per_degree).view(n_edges, g.shape[0], self.l_max + 1)

        chunk = self.edge_chunk_size
        if n_edges <= chunk:
            mu = self._edge_grid(q, i, j, yg, coeff)
        else:
            mu = torch.cat([self._edge_grid(q, i[s:s + chunk], j[s:s + chunk], yg[s:s + chunk],
                                            coeff[s:s + chunk])
                            for s in range(0, n_edges, chunk)], dim=0)
        # lin_out without its bias, which lives on l = 0 only and is added where it is used
        # (saves concatenating a full (E, K, C) tensor).
        mu = torch.einsum("ekc,kco->eko", mu, self.lin_out.weight[self.degree_index])
        mu0 = mu[:, 0, :] + self.lin_out.bias  # (E, C) the l = 0 row of lin_out(...)

        alpha = neighbour_attention(self.logit(mu0).squeeze(-1), envelope, i, n_nodes)
        coef = self.w_sum / self.avg_degree + alpha.unsqueeze(-1) * self.w_att  # (E, C)
        weight = envelope.unsqueeze(-1) * coef  # (E, C)
        msg = mu * weight.unsqueeze(1)
        msg[:, 0, :] += self.lin_out.bias * weight
        return x.index_add(0, i, msg)
