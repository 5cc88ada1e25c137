"""gather_rows: index_select with a contiguous backward (est_calc.nn.gather)."""

import torch

from est_calc.nn.gather import gather_rows


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
