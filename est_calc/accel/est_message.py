"""The full-EST message block with its node side folded into one matrix product.

:class:`FastESTMessageBlock` computes what :class:`est_calc.nn.message.ESTMessageBlock` computes
(same parameters), with the linear algebra rearranged:

* F m_ij = F(W_dst h_i) + F(W_src h_j), and the depth-wise weights and the grid transform F fold
  into one (K C, S 2 C_f) matrix, so the node side is one matrix product and the per-edge signal a
  gather and a sum on the grid;
* F e_ij = sum_l R_l (F Y^l): one batched (S, L+1) x (L+1, C_f) product per edge instead of
  broadcasting R over m into a (E, K, C_f) tensor and transforming it;
* lin_out's bias, which sits on l = 0 only, is added where it is used.
"""

from __future__ import annotations

import torch
from torch import Tensor

from est_calc.nn.edges import EdgeFeatures
from est_calc.nn.message import ESTMessageBlock, neighbour_attention

__all__ = ["FastESTMessageBlock", "FastScalarESTMessageBlock"]


class FastESTMessageBlock(ESTMessageBlock):
    """:class:`ESTMessageBlock` with the rearrangements of the module docstring."""

    def _accelerate(self, options) -> None:
        """No option of ``accelerate`` concerns this block."""

    def _node_queries(self, h: Tensor) -> Tensor:
        """F(W_dst h) and F(W_src h) side by side, (N, S, 2 Cf), as one matrix product.

        The depth-wise weights and the grid transform F are folded into one (K C, S 2Cf) matrix
        (a few hundred kB, built from the parameters each call), so the node side costs one
        matrix product instead of two DWLinear + two grid transforms.
        """
        g = self.grid.to_grid_matrix  # (S, K)
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

    def forward(self, x: Tensor, edges: EdgeFeatures) -> Tensor:
        """As :meth:`ESTMessageBlock.forward`."""
        n_nodes, n_edges = x.shape[0], edges.n_edges
        if n_edges == 0:
            return x
        i, j, envelope = edges.center, edges.neighbor, edges.envelope
        q = self._node_queries(self.norm(x))  # (N, S, 2 Cf)
        # Contiguous halves so the per-edge gathers are index_select (backward: index_add).
        q = (q[..., :self.fourier_channels].contiguous(),
             q[..., self.fourier_channels:].contiguous())

        coeff = self.radial(edges.radial_in).view(n_edges, self.l_max + 1, self.fourier_channels)
        # (K, S (L+1)) matrix taking Y(r_hat) to its per-degree grid values.
        edge_sh = edges.sh
        g = self.grid.to_grid_matrix
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


class FastScalarESTMessageBlock(FastESTMessageBlock):
    """:class:`est_calc.nn.message.ScalarESTMessageBlock` (the l = 0 row of the result)."""

    def forward(self, x: Tensor, edges: EdgeFeatures) -> Tensor:
        """x (N, K, C) -> (N, C)."""
        return super().forward(x, edges)[:, 0]
