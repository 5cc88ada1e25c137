"""Input embeddings: species -> l=0 channels, and the edge-degree embedding of the neighbour shell.

x^(0) = AtomEmbedding(Z) fills only the l = 0 row of the steerable feature (N, K, C). The
EdgeDegreeEmbedding then adds, for every centre i,

    x_i^(l) += 1/<deg> * sum_j u(r_ij) * c_l(r_ij, Z_i, Z_j) * Y^l(r_hat_ij)

with c_l a radial MLP output shared over m (one coefficient per degree and channel) and Y^l the
component-normalised real spherical harmonics in e3nn order. This is the EquiformerV2 input block
(which rotates m = 0 coefficients back from the edge frame; that equals c_l * Y^l up to the
normalisation constant, which the MLP absorbs).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from est_calc.nn.edges import EdgeFeatures
from est_calc.nn.radial import RadialMLP

__all__ = ["AtomEmbedding", "EdgeDegreeEmbedding", "N_ELEMENTS", "degree_of_index"]

#: Embedding tables cover atomic numbers 0..118 (0 is unused by real atoms).
N_ELEMENTS = 119


def degree_of_index(l_max: int) -> Tensor:
    """(K,) int64 tensor whose entry k is the degree l of flat index k = l^2 + l + m."""
    return torch.cat([torch.full((2 * l + 1,), l, dtype=torch.long) for l in range(l_max + 1)])


def check_atomic_numbers(z: Tensor) -> None:
    """Raise ValueError if any atomic number is outside 1..118.

    Skipped while torch.compile traces (a data-dependent branch would split the graph): the
    compiled model checks its atomic numbers eagerly before entering the compiled region. Skipped
    too while a CUDA graph is captured (no value can be read back then): the captured step of
    :mod:`est_calc.accel.graphs` checks them on the host.
    """
    if torch.compiler.is_compiling() or (z.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    if z.numel() and (int(z.min()) < 1 or int(z.max()) >= N_ELEMENTS):
        bad = z[(z < 1) | (z >= N_ELEMENTS)].unique().tolist()
        raise ValueError(f"atomic numbers must be in 1..{N_ELEMENTS - 1}, got {bad}")


class AtomEmbedding(nn.Module):
    """Species embedding into the l = 0 row of a steerable feature.

    Args:
        l_max: maximum degree L (K = (L+1)^2 rows in the output).
        channels: C.
    """

    def __init__(self, l_max: int, channels: int):
        super().__init__()
        self.l_max = int(l_max)
        self.channels = int(channels)
        self.embedding = nn.Embedding(N_ELEMENTS, self.channels)

    def forward(self, atomic_numbers: Tensor) -> Tensor:
        """Args: atomic_numbers (N,) int64. Returns x (N, K, C), zero for every l > 0 row."""
        check_atomic_numbers(atomic_numbers)
        s = self.embedding(atomic_numbers)
        k = (self.l_max + 1) ** 2
        x = s.new_zeros(s.shape[0], k, self.channels)
        x[:, 0, :] = s
        return x


class EdgeDegreeEmbedding(nn.Module):
    """Sum over neighbours of c_l(r, Z_i, Z_j) Y^l(r_hat) u(r), divided by the average degree.

    Args:
        l_max: maximum degree L.
        channels: C (output channels).
        n_rbf: width of the radial basis input.
        species_channels: width Cz of the scalar species embedding given per atom.
        radial_hidden: hidden width of the radial MLP.
        avg_degree: normaliser <deg> (dimensionless, > 0).
    """

    def __init__(self, l_max: int, channels: int, n_rbf: int, species_channels: int,
                 radial_hidden: int, avg_degree: float):
        super().__init__()
        if not avg_degree > 0:
            raise ValueError(f"avg_degree must be positive, got {avg_degree!r}")
        self.l_max = int(l_max)
        self.channels = int(channels)
        self.avg_degree = float(avg_degree)
        self.radial = RadialMLP(n_rbf + 2 * species_channels, radial_hidden,
                                (self.l_max + 1) * self.channels)
        self.register_buffer("degree_index", degree_of_index(self.l_max), persistent=False)

    def forward(self, x: Tensor, edges: EdgeFeatures) -> Tensor:
        """Add the edge-degree embedding to x.

        Args:
            x: (N, K, C) node features.
            edges: the batch's :class:`EdgeFeatures` (sh, radial_in, envelope, center).

        Returns:
            (N, K, C) x plus the aggregated embedding (x itself where a node has no edges).
        """
        n_edges = edges.n_edges
        if n_edges == 0:
            return x
        coeff = self.radial(edges.radial_in).view(n_edges, self.l_max + 1, self.channels)
        # c_l broadcast over the 2l+1 orders of each degree, times u Y^l_m, as one batched
        # product (E, K, L+1) x (E, L+1, C) with the envelope and 1/<deg> folded into the
        # small left factor (no (E, K, C) gather, and its backward needs no zero-filled scatter).
        sh = edges.sh
        onehot = (self.degree_index[:, None]
                  == torch.arange(self.l_max + 1, device=sh.device)).to(sh.dtype)
        scale = (edges.envelope / self.avg_degree).view(n_edges, 1, 1)
        edge_feat = torch.bmm(sh.unsqueeze(-1) * onehot * scale, coeff)
        return x.index_add(0, edges.center, edge_feat)
