"""UnrollSmallBmm (est_calc/deploy/export.py): tiny batched products with a symbolic batch
become broadcast products summed over the shared dimension; large or fully static ones stay."""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from est_calc.deploy.export import UNROLL_MAX_WORK, UnrollSmallBmm

_G = torch.Generator().manual_seed(0)
# Rows picked by an edge index, as the model's tensors are: a symbolic batch, fixed matrices.
ROT, PAIR, V, W = (torch.randn(4, *shape, generator=_G, dtype=torch.float64)
                   for shape in ((7, 9), (9, 48), (7, 24), (70, 70)))


def _products(edge):
    rot, pair, v, w = ROT[edge], PAIR[edge], V[edge], W[edge]
    z = torch.bmm(rot, pair)                   # the edge rotation
    back = torch.bmm(rot.transpose(1, 2), v)   # its transpose on another operand
    big = torch.bmm(w, w.transpose(1, 2))      # too large to unroll
    return z, back, big


def _edges(n):
    return torch.randint(0, 4, (n,), generator=_G)


def test_small_symbolic_products_are_unrolled_with_the_same_values():
    assert 70 * 70 * 70 > UNROLL_MAX_WORK >= 7 * 9 * 48
    graph = make_fx(_products, tracing_mode="symbolic", _allow_non_fake_inputs=True)(_edges(5))
    bmm = torch.ops.aten.bmm.default
    assert sum(n.target is bmm for n in graph.graph.nodes) == 3
    UnrollSmallBmm()(graph.graph)
    graph.recompile()
    left = [n for n in graph.graph.nodes if n.target is bmm]
    assert len(left) == 1 and tuple(left[0].meta["val"].shape[1:]) == (70, 70)
    sums = [n for n in graph.graph.nodes if n.target is torch.ops.aten.sum.dim_IntList]
    assert len(sums) == 2
    for total in sums:  # their operands are materialised, not recomputed per row
        left_in, right_in = (u.args[0] for u in total.args[0].args)
        assert left_in.meta["inductor_realize_to_strides"]
        assert right_in.meta["inductor_realize_to_strides"]
    edges = _edges(11)  # another edge count than the traced one
    for got, want in zip(graph(edges), _products(edges)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_static_batch_is_left_alone():
    graph = make_fx(_products, tracing_mode="real")(_edges(5))
    before = str(graph.graph)
    UnrollSmallBmm()(graph.graph)
    assert str(graph.graph) == before
