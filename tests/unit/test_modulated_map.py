"""ModulatedMap (est_calc.accel.modulated_map): the radial modulation and the first SO(2) map of
the message block in blocks of rows, both halves of a paired edge list from the first half's
features, equal to the whole-tensor form it replaces in values, gradients and gradients of
gradients; and the model takes it only when accelerated for inference (frozen weights)."""

from __future__ import annotations

import pytest
import torch

from est_calc.accel import accelerate, modulated_map
from est_calc.accel.modulated_map import ModulatedMap, swap_halves
from est_calc.accel.so2_message import FastSO2MessageBlock, _pair_expand
from est_calc.accel.weights import constant
from est_calc.batch import AtomsBatch
from est_calc.forces import energy_forces_stress
from est_calc.model import ModelConfig
from est_calc.neighbors import build_graph
from est_calc.nn.message_so2 import SO2MessageBlock
from est_calc.potential import Potential

F64 = torch.float64


def _block(device, seed=0, inference=True, **overrides):
    torch.manual_seed(seed)
    c = ModelConfig.preset("small", **overrides)
    block = SO2MessageBlock(c.l_max, c.so2_m_max, c.channels, n_heads=c.n_heads, n_rbf=c.n_rbf,
                            species_channels=c.species_channels, radial_hidden=c.radial_hidden)
    block = block.to(device, F64)
    for p in block.parameters():
        p.requires_grad_(False)
    return accelerate(block, inference=inference)


def _whole_tensor_form(block, paired, x, hid):
    """What the block computed before ModulatedMap: expand the pairs, modulate, map."""
    conv1, last = block.conv1, block.radial.last
    z = _pair_expand(x, constant(block._pair_sign, x)) if paired else x
    w, b = conv1.radial_rows(last.weight, last.bias)
    z = z * torch.nn.functional.linear(hid, w, b).view(z.shape)
    return conv1.map_groups(conv1.split_groups(z))


def test_swap_halves_swaps_the_channel_halves_of_every_row():
    t = torch.arange(3 * 8).view(3, 8)
    swapped = t.flatten()[swap_halves(3, 8)].view(3, 8)
    assert torch.equal(swapped, torch.cat([t[:, 4:], t[:, :4]], dim=1))


@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("chunk", [4, 7, 10_000])  # several uneven blocks, and one block
def test_values_gradients_and_double_backward_equal_the_whole_tensor_form(
        paired, chunk, torch_device, monkeypatch):
    monkeypatch.setattr(modulated_map, "CHUNK", chunk)
    block = _block(torch_device)
    conv1 = block.conv1
    n = 23
    n_edges = 2 * n if paired else n
    kw = {"dtype": F64, "device": torch_device}
    x = torch.randn(n, conv1.n_rows, conv1.in_channels, **kw).requires_grad_(True)
    hid = torch.randn(n_edges, block.radial.last.in_features, **kw).requires_grad_(True)
    w_groups = [torch.randn(n_edges, rows, conv1.out_channels, **kw) for rows in conv1._group_sizes]
    w_extra = torch.randn(n_edges, conv1.extra_scalars, **kw)

    def loss(parts, extra):
        return (sum((torch.tanh(p) * w).sum() for p, w in zip(parts, w_groups))
                + (torch.sin(extra) * w_extra).sum())

    ref_parts, ref_extra = _whole_tensor_form(block, paired, x, hid)
    outs = ModulatedMap.apply(conv1, paired, x, hid, *block._modulated_weights(paired))
    parts, extra = list(outs[:-1]), outs[-1]
    assert "ModulatedMap" in type(extra.grad_fn).__name__
    for a, b in zip(parts, ref_parts):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-12
    assert (extra - ref_extra).abs().max() < 1e-12

    ref = loss(ref_parts, ref_extra)
    got = loss(parts, extra)
    g_ref = torch.autograd.grad(ref, (x, hid), create_graph=True)
    g_got = torch.autograd.grad(got, (x, hid), create_graph=True)
    for a, b in zip(g_got, g_ref):
        assert (a - b).abs().max() < 1e-12
    # gradients of gradients (a Hessian-vector product of a frozen potential)
    gg_ref = torch.autograd.grad(sum((g**2).sum() for g in g_ref), (x, hid))
    gg_got = torch.autograd.grad(sum((g**2).sum() for g in g_got), (x, hid))
    for a, b in zip(gg_got, gg_ref):
        assert (a - b).abs().max() < 1e-10 * max(1.0, float(b.abs().max()))
    # the first-order backward without a graph (the calculator's path) gives the same numbers
    g_plain = torch.autograd.grad(loss(*_split(ModulatedMap.apply(
        conv1, paired, x, hid, *block._modulated_weights(paired)))), (x, hid))
    for a, b in zip(g_plain, g_ref):
        assert (a - b).abs().max() < 1e-12


def _split(outs):
    return list(outs[:-1]), outs[-1]


def test_gradcheck_with_several_blocks(monkeypatch):
    monkeypatch.setattr(modulated_map, "CHUNK", 3)
    block = _block("cpu", seed=1, channels=4, n_heads=2, radial_hidden=4, species_channels=2)
    conv1 = block.conv1
    x = torch.randn(5, conv1.n_rows, conv1.in_channels, dtype=F64, requires_grad=True)
    hid = torch.randn(10, block.radial.last.in_features, dtype=F64, requires_grad=True)
    weights = block._modulated_weights(True)

    def fn(x, hid):
        return ModulatedMap.apply(conv1, True, x, hid, *weights)

    assert torch.autograd.gradcheck(fn, (x, hid))
    assert torch.autograd.gradgradcheck(fn, (x, hid))


def test_rows_must_match_the_edges():
    block = _block("cpu")
    conv1 = block.conv1
    x = torch.randn(4, conv1.n_rows, conv1.in_channels, dtype=F64)
    hid = torch.randn(7, block.radial.last.in_features, dtype=F64)
    with pytest.raises(ValueError, match="ModulatedMap"):
        ModulatedMap.apply(conv1, True, x, hid, *block._modulated_weights(True))


def _slab_batch(device):
    from ase.build import add_adsorbate, fcc111

    structures = []
    for k in range(3):
        slab = fcc111("Cu", (2, 2, 3), vacuum=5.0)
        add_adsorbate(slab, "O", 1.5, "fcc")
        slab.pbc = True
        slab.rattle(0.1, seed=k)
        structures.append(slab)
    return AtomsBatch.from_atoms(structures, dtype=F64, device=device)


@pytest.mark.parametrize("paired", [False, True])
def test_model_with_the_fused_map_equals_the_whole_tensor_path(paired, torch_device, monkeypatch):
    """Energies, forces and stress of a frozen potential, inference (fused) against training
    (whole-tensor) acceleration, with the rows split into several blocks."""
    from est_calc import neighbors

    monkeypatch.setattr(modulated_map, "CHUNK", 50)
    monkeypatch.setattr(neighbors, "PAIR_MIN_EDGES", 0)
    torch.manual_seed(3)
    pot = Potential.from_config(ModelConfig.preset("small"), species=[8, 29]).to(torch_device, F64)
    pot.eval()
    for p in pot.parameters():
        p.requires_grad_(False)
    batch = _slab_batch(torch_device)
    graph = build_graph(batch, pot.cutoff_A, paired=paired)
    assert graph.paired == paired
    calls = []
    original = ModulatedMap.forward

    def spy(ctx, linear, is_paired, x, hid, *weights):
        calls.append((is_paired, x.shape[0]))
        return original(ctx, linear, is_paired, x, hid, *weights)

    monkeypatch.setattr(ModulatedMap, "forward", staticmethod(spy))
    got = energy_forces_stress(accelerate(pot, inference=True), batch, graph, compute_stress=True)
    assert calls == [(paired, graph.n_edges // (2 if paired else 1))] * 2  # both layers
    ref = energy_forces_stress(accelerate(pot), batch, graph, compute_stress=True)
    assert len(calls) == 2
    assert (got.energy - ref.energy).abs().max() < 1e-11
    assert (got.forces - ref.forces).abs().max() < 1e-11
    assert (got.stress - ref.stress).abs().max() < 1e-11


def test_only_inference_acceleration_takes_the_blocked_map():
    assert isinstance(_block("cpu"), FastSO2MessageBlock)
    assert _block("cpu").inference and not _block("cpu", inference=False).inference
