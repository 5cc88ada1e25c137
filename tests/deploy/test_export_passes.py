"""The export's Inductor passes and settings (est_calc/deploy/export.py): UnrollSmallBmm (tiny
batched products with a symbolic batch become broadcast products summed over the shared
dimension; large or fully static ones stay), UnfuseAddmmBias (a linear layer's bias added after
the product, so that the next elementwise kernel absorbs it) and the CPU vector width."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from est_calc.deploy.export import (
    UNROLL_MAX_WORK,
    PostGradPasses,
    UnfuseAddmmBias,
    UnrollSmallBmm,
    _inductor_settings,
)

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


def _linears(x, w1, b1, w2, b2):
    h = torch.nn.functional.silu(torch.nn.functional.linear(x, w1, b1))
    scaled = torch.addmm(b2, h, w2.t(), beta=0.5)       # not the plain form: left alone
    return torch.nn.functional.linear(h, w2, b2) * 2.0, scaled


def test_addmm_bias_is_added_after_the_product_with_the_same_values():
    w1, b1 = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    w2, b2 = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64)
    graph = make_fx(_linears, tracing_mode="symbolic")(x, w1, b1, w2, b2)
    addmm, mm = torch.ops.aten.addmm.default, torch.ops.aten.mm.default
    assert sum(n.target is addmm for n in graph.graph.nodes) == 3
    UnfuseAddmmBias()(graph.graph)
    graph.recompile()
    left = [n for n in graph.graph.nodes if n.target is addmm]
    assert len(left) == 1 and left[0].kwargs == {"beta": 0.5}
    assert sum(n.target is mm for n in graph.graph.nodes) == 2
    x = torch.randn(9, 4, dtype=torch.float64)  # another row count than the traced one
    for got, want in zip(graph(x, w1, b1, w2, b2), _linears(x, w1, b1, w2, b2)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_post_grad_passes_run_both():
    def both(edge, x, w, b):
        return _products(edge)[0], torch.nn.functional.linear(x, w, b)

    args = (_edges(5), torch.randn(5, 4), torch.randn(3, 4), torch.randn(3))
    graph = make_fx(both, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*args)
    PostGradPasses()(graph.graph)
    targets = [n.target for n in graph.graph.nodes]
    assert targets.count(torch.ops.aten.bmm.default) == 1          # the 70 x 70 one stays
    assert targets.count(torch.ops.aten.sum.dim_IntList) == 2      # the two tiny ones unrolled
    assert torch.ops.aten.addmm.default not in targets
    assert PostGradPasses().uuid() == PostGradPasses().uuid()


@pytest.mark.parametrize("channels", [24, 32, 8])
def test_cpu_vector_width_follows_the_channels(channels, monkeypatch):
    import torch._inductor.cpu_vec_isa as isa

    class _Isa:
        def __init__(self, bits):
            self.bits = bits

        def bit_width(self):
            return self.bits

    monkeypatch.setattr(isa, "valid_vec_isa_list", lambda: [_Isa(512), _Isa(256)])
    settings = _inductor_settings("cpu", channels)
    assert settings["freezing"] is True
    # 24 and 8 channels are whole AVX2 vectors and not whole AVX-512 ones; 32 are both.
    assert settings.get("cpp.simdlen") == (None if channels % 16 == 0 else 256)
    assert "cpp.simdlen" not in _inductor_settings("cuda", channels)
    monkeypatch.setattr(isa, "valid_vec_isa_list", lambda: [_Isa(512)])
    assert "cpp.simdlen" not in _inductor_settings("cpu", channels)


def test_load_warning_only_for_an_instruction_set_this_cpu_lacks(monkeypatch):
    import logging

    import torch._inductor.cpu_vec_isa as isa

    from est_calc.deploy.package import _NarrowerIsaIsFine

    monkeypatch.setattr(isa, "valid_vec_isa_list", lambda: ["avx512 avx512_vnni", "avx512",
                                                            "avx2"])

    def record(key, here, package):
        return logging.LogRecord("torch.export.pt2_archive._package", logging.WARNING, __file__,
                                 1, "Device information mismatch for %s: %s vs %s. This could "
                                 "cause some issues", (key, here, package), None)

    keep = _NarrowerIsaIsFine().filter
    assert not keep(record("AOTI_CPU_ISA", "AVX512 AVX512_VNNI", "AVX2"))
    assert not keep(record("AOTI_CPU_ISA", "AVX512 AVX512_VNNI", "AVX512"))
    assert keep(record("AOTI_CPU_ISA", "AVX512 AVX512_VNNI", "AVX512 AVX512_BF16"))  # lacks it
    assert keep(record("AOTI_DEVICE_KEY", "cpu", "cuda"))
