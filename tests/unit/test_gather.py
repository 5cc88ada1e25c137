"""gather_rows and gather_pairs: row gathers with fast, contiguous backwards (est_calc.accel.gather)."""

import pytest
import torch

from est_calc.accel.gather import gather_pairs, gather_rows, pair_index


def _inputs():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(7, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    index = torch.tensor([0, 3, 3, 6, 1, 0, 5, 3])
    return x, index


def test_values_and_gradients_equal_index_select_also_for_strided_gradients():
    x, index = _inputs()
    other = torch.randn(8, 3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, 3, 8, dtype=torch.float64)
    grads = []
    for gather in (gather_rows, lambda t, i: t.index_select(0, i)):
        # concatenating along the feature axis hands the gather a strided gradient slice
        y = torch.cat([gather(x, index), other], dim=-1)
        assert torch.equal(y[..., :4], x.detach().index_select(0, index))
        grads.append(torch.autograd.grad((y * weight).sum(), x)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-14)


def test_gradcheck_and_double_backward():
    x, index = _inputs()
    assert torch.autograd.gradcheck(lambda t: gather_rows(t, index), (x,))
    assert torch.autograd.gradgradcheck(lambda t: gather_rows(t, index) ** 2, (x,))


def test_no_autograd_node_without_grad():
    x, index = _inputs()
    with torch.no_grad():
        assert gather_rows(x, index).grad_fn is None
    assert gather_rows(x.detach(), index).grad_fn is None


def _pair_inputs(device="cpu"):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, 3, dtype=torch.float64, generator=gen).to(device).requires_grad_(True)
    i = torch.tensor([0, 0, 1, 5, 3, 3, 2, 5, 4], device=device)
    j = torch.tensor([1, 5, 0, 0, 2, 4, 3, 3, 5], device=device)
    return x, i, j


def test_gather_pairs_equals_the_concatenation_of_two_gathers(torch_device):
    x, i, j = _pair_inputs(torch_device)
    weight = torch.randn(9, 4, 6, dtype=torch.float64, device=torch_device)
    ref = torch.cat([x.index_select(0, i), x.index_select(0, j)], dim=-1)
    got = gather_pairs(x, i, j)
    assert got.shape == (9, 4, 6) and torch.equal(got, ref)
    assert torch.equal(gather_pairs(x, i, j, pair_index(i, j, 4)), ref)
    g_ref = torch.autograd.grad((ref * weight).sum(), x)[0]
    g_got = torch.autograd.grad((got * weight).sum(), x)[0]
    torch.testing.assert_close(g_got, g_ref, rtol=0, atol=1e-14)


def test_gather_pairs_gradcheck_and_double_backward(torch_device):
    x, i, j = _pair_inputs(torch_device)
    assert torch.autograd.gradcheck(lambda t: gather_pairs(t, i, j), (x,))
    assert torch.autograd.gradgradcheck(lambda t: gather_pairs(t, i, j) ** 2, (x,))


def test_gather_pairs_checks_shapes_and_records_nothing_without_grad():
    x, i, j = _pair_inputs()
    with torch.no_grad():
        assert gather_pairs(x, i, j).grad_fn is None
    with pytest.raises(ValueError, match="gather_pairs"):
        gather_pairs(x[0], i, j)
    with pytest.raises(ValueError, match="gather_pairs"):
        gather_pairs(x, i, j[:-1])
