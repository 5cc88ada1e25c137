"""Tests for the edge-frame Wigner-D (est_calc.nn.wigner) and the SO(2) message block.

Everything runs in float64 with a small block (L = 2, C = 8). Node features are built from
spherical harmonics of the relative positions, so rotating the positions rotates the features
exactly; equivariance of the output is checked by evaluating the output functions
sum_k x_k Y_k(v) at rotated points (independent of any Wigner-D implementation).
"""

from __future__ import annotations

import math

import pytest
import torch
from e3nn import o3

from est_calc.nn.edges import EdgeFeatures
from est_calc.nn.message_so2 import SO2Linear, SO2MessageBlock, segment_softmax
from est_calc.nn.radial import GaussianBasis, PolynomialEnvelope
from est_calc.nn.wigner import (
    EdgeRotation,
    WignerD,
    edge_axis,
    edge_frame,
    roll_about_axis,
    so2_index,
)

F64 = torch.float64
CUTOFF = 4.0


def sh(l_max, v):
    return o3.spherical_harmonics(list(range(l_max + 1)), v, normalize=True,
                                  normalization="component")


def make_block(l_max=2, channels=8, m_max=2, seed=0):
    torch.manual_seed(seed)
    return SO2MessageBlock(l_max, m_max, channels, n_heads=2, n_rbf=8, species_channels=4,
                           radial_hidden=16).to(F64)


def radius_graph(pos, cutoff=CUTOFF):
    d = (pos[None, :, :] - pos[:, None, :]).norm(dim=-1)
    mask = (d < cutoff) & ~torch.eye(len(pos), dtype=torch.bool)
    return torch.stack(torch.nonzero(mask, as_tuple=True))


class Inputs:
    """Rotation-covariant block inputs built from positions (fixed random per-atom weights):
    node features x and the EdgeFeatures of the edges."""

    def __init__(self, n_atoms, l_max=2, channels=8, m_max=2, seed=1, rotation=None):
        g = torch.Generator().manual_seed(seed)
        self.l_max, self.channels = l_max, channels
        self.decay = 0.3 + torch.rand(channels, generator=g, dtype=F64)
        self.species = torch.randn(n_atoms, 4, generator=g, dtype=F64)
        self.scalar = torch.randn(n_atoms, channels, generator=g, dtype=F64)
        self.rbf = GaussianBasis(8, CUTOFF).to(F64)
        self.env = PolynomialEnvelope(CUTOFF).to(F64)
        self.rotation = EdgeRotation(l_max, m_max).to(F64) if rotation is None else rotation

    def __call__(self, pos, edge_index):
        i, j = edge_index
        vec = pos[j] - pos[i]
        r = vec.norm(dim=-1)
        u = self.env(r)
        y = sh(self.l_max, vec)
        # x_i = sum_j u(r_ij) exp(-b_c r_ij) Y(r_ij), plus species scalars on l = 0.
        w = u[:, None] * torch.exp(-self.decay[None, :] * r[:, None])
        x = torch.zeros(len(pos), y.shape[1], self.channels, dtype=F64)
        x = x.index_add(0, i, y[:, :, None] * w[:, None, :])
        x = torch.cat([x[:, :1] + self.scalar[:, None], x[:, 1:]], dim=1)
        rbf = self.rbf(r)
        edges = EdgeFeatures(i, j, r, y, rbf, u,
                             torch.cat([rbf, self.species[i], self.species[j]], dim=-1),
                             self.rotation(vec))
        return (x, edges), vec


def cluster(n_atoms=6, seed=3, scale=1.4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_atoms, 3, generator=g, dtype=F64) * scale


# ----------------------------------------------------------------------------- Wigner-D


def test_edge_axis_carries_only_m0():
    a = edge_axis()
    y = sh(4, a[None])[0]
    m0 = [l * l + l for l in range(5)]
    rest = torch.ones_like(y, dtype=torch.bool)
    rest[m0] = False
    assert y[rest].abs().max() < 1e-12 and abs(float(a.norm()) - 1) < 1e-15


def test_edge_frame_is_rotation_onto_axis():
    vec = torch.randn(200, 3, dtype=F64)
    vec[:3] = torch.eye(3, dtype=F64) * 2.5     # coordinate axes: ties in the helper choice
    vec[3] = torch.tensor([1.0, 1.0, 1.0], dtype=F64)
    rot = edge_frame(vec)
    eye = torch.eye(3, dtype=F64).expand_as(rot)
    assert (rot @ rot.transpose(1, 2) - eye).abs().max() < 1e-13
    assert (torch.linalg.det(rot) - 1).abs().max() < 1e-13
    mapped = torch.einsum("eab,eb->ea", rot, vec / vec.norm(dim=1, keepdim=True))
    assert (mapped - edge_axis()).abs().max() < 1e-13


@pytest.mark.parametrize("l_max", [0, 2, 4])
def test_wigner_matches_e3nn_and_rotates_sh(l_max):
    torch.manual_seed(0)
    rot = o3.rand_matrix(10, dtype=F64)
    d = WignerD(l_max).to(F64)(rot)
    irreps = o3.Irreps("+".join(f"{l}e" if l % 2 == 0 else f"{l}o" for l in range(l_max + 1)))
    # e3nn's D_from_matrix is itself only accurate to ~3e-7 in float64.
    assert (d - irreps.D_from_matrix(rot)).abs().max() < 5e-6
    v = torch.randn(10, 3, dtype=F64)
    lhs = sh(l_max, torch.einsum("eab,eb->ea", rot, v))
    rhs = torch.einsum("eab,eb->ea", d, sh(l_max, v))
    assert (lhs - rhs).abs().max() < 1e-10


def test_truncated_rows_and_roll_acts_as_2d_rotation():
    l_max, m_max = 3, 2
    rows = so2_index(l_max, m_max)
    assert rows.numel() == (l_max + 1) + 2 * l_max + 2 * (l_max - 1)
    phi = torch.tensor([0.37], dtype=F64)
    d = WignerD(l_max, rows=rows).to(F64)(roll_about_axis(phi))[0]
    full = WignerD(l_max).to(F64)(roll_about_axis(phi))[0]
    assert (d - full[rows]).abs().max() < 1e-14
    # The roll fixes m = 0 and rotates each (+m, -m) pair by m*phi with the same sense for all l.
    for l in range(l_max + 1):
        c = l * l + l
        assert abs(float(full[c, c]) - 1) < 1e-12
        for m in range(1, l + 1):
            blk = full[[c + m, c - m]][:, [c + m, c - m]]
            ref = full.new_tensor([[math.cos(m * phi), -math.sin(m * phi)],
                                   [math.sin(m * phi), math.cos(m * phi)]])
            ref_other = ref.T
            assert min((blk - ref).abs().max(), (blk - ref_other).abs().max()) < 1e-12
            if l == m == 1:
                sense = (blk - ref).abs().max() < 1e-12
            assert ((blk - ref).abs().max() < 1e-12) == sense


def directional_fd(fn, x, direction, h=1e-5):
    """Central finite difference of scalar fn along direction (error O(h^2))."""
    with torch.no_grad():
        return (fn(x + h * direction) - fn(x - h * direction)) / (2 * h)


def test_wigner_double_backward_through_frame():
    # A roll-invariant function of D(R_e): per-row weights that depend on (|m|, l) only, applied to
    # |D c|^2, so it is smooth even where the frame's helper axis switches (vec[0] is at a tie).
    torch.manual_seed(0)
    vec = torch.randn(6, 3, dtype=F64)
    vec[0] = torch.tensor([1.0, 1.0, 1.0 + 1e-7], dtype=F64)
    rows = so2_index(2, 1)
    w = WignerD(2, rows=rows).to(F64)
    key = [(int(k**0.5), abs(k - int(k**0.5) ** 2 - int(k**0.5))) for k in rows.tolist()]
    row_w = torch.tensor([1.0 + l + 0.5 * m for l, m in key], dtype=F64)
    coeff = torch.randn(6, 9, dtype=F64)

    def scalar(v):
        dc = torch.einsum("erk,ek->er", w(edge_frame(v)), coeff)
        return (dc.square() * row_w).sum().square()

    def grad_norm(v):
        v = v if v.requires_grad else v.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(scalar(v), v, create_graph=True)
        return g.square().sum()

    direction = torch.randn_like(vec)
    v = vec.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(scalar(v), v)
    assert abs(float((g * direction).sum() - directional_fd(scalar, vec, direction))) < 1e-6
    v = vec.clone().requires_grad_(True)
    (gg,) = torch.autograd.grad(grad_norm(v), v)
    fd = (grad_norm(vec + 1e-5 * direction) - grad_norm(vec - 1e-5 * direction)).detach() / 2e-5
    assert abs(float((gg * direction).sum() - fd)) < 1e-5 * max(1.0, abs(float(fd)))


# ----------------------------------------------------------------------------- pieces


def test_so2_linear_commutes_with_roll():
    torch.manual_seed(0)
    lin = SO2Linear(3, 2, 4, 5, extra_scalars=3).to(F64)
    rows = so2_index(3, 2)
    roll = WignerD(3, rows=rows).to(F64)(roll_about_axis(torch.tensor([1.1], dtype=F64)))[0]
    roll = roll[:, rows]                                        # (K_M, K_M) block of the roll
    x = torch.randn(7, rows.numel(), 4, dtype=F64)
    radial = torch.randn(7, lin.radial_size, dtype=F64)
    y, s = lin(x, radial)
    y_rot, s_rot = lin(torch.einsum("ab,ebc->eac", roll, x), radial)
    assert (y_rot - torch.einsum("ab,ebc->eac", roll, y)).abs().max() < 1e-12
    assert (s_rot - s).abs().max() < 1e-12


def test_segment_softmax_weights_and_empty_segments():
    logits = torch.randn(6, 2, dtype=F64, requires_grad=True)
    u = torch.tensor([0.5, 1.0, 0.0, 0.2, 0.0, 0.0], dtype=F64, requires_grad=True)
    seg = torch.tensor([0, 0, 0, 1, 2, 2])
    alpha = segment_softmax(logits, u, seg, 4)
    ref0 = u[:2, None] * logits[:2].exp() / (u[:2, None] * logits[:2].exp()).sum(0)
    assert torch.allclose(alpha[:2], ref0) and (alpha[2] == 0).all()
    assert torch.allclose(alpha[3], torch.ones(2, dtype=F64)) and (alpha[4:] == 0).all()
    g = torch.autograd.grad(alpha.square().sum(), (logits, u), create_graph=True)
    assert all(torch.isfinite(t).all() for t in g)


# ----------------------------------------------------------------------------- the block


def run_block(block, inputs, pos, edge_index=None):
    edge_index = radius_graph(pos) if edge_index is None else edge_index
    args, vec = inputs(pos, edge_index)
    return block(*args), args, vec


def test_block_rotation_equivariance():
    block, inputs, pos = make_block(), Inputs(6), cluster(6)
    ei = radius_graph(pos)
    out, args, _ = run_block(block, inputs, pos, ei)
    assert (out - args[0]).abs().max() > 1e-2            # the message is not negligible
    assert (out[:, 4:] - args[0][:, 4:]).abs().max() > 1e-3   # ... also on l = 2
    torch.manual_seed(5)
    q = o3.rand_matrix(dtype=F64)
    out_rot, _, _ = run_block(block, inputs, pos @ q.T, ei)
    pts = torch.randn(20, 3, dtype=F64)
    f = torch.einsum("nkc,pk->npc", out, sh(2, pts))
    f_rot = torch.einsum("nkc,pk->npc", out_rot, sh(2, pts @ q.T))
    assert (f - f_rot).abs().max() < 1e-10
    d = o3.Irreps("0e+1o+2e").D_from_matrix(q)
    assert (out_rot - torch.einsum("ab,nbc->nac", d, out)).abs().max() < 1e-5


def test_block_needs_the_rotations_of_its_order():
    """The block reads the edge rotations the model computed once (EdgeFeatures.rotation); the
    rows must be those of its m_max."""
    block, inputs, pos = make_block(), Inputs(6), cluster(6)
    _, (x, edges), _ = run_block(block, inputs, pos)
    assert edges.rotation.shape == (edges.n_edges, block.conv1.n_rows, 9)
    with pytest.raises(ValueError, match="rotation"):
        block(x, edges._replace(rotation=edges.rotation[:, :5]))
    with pytest.raises(ValueError, match="rotation"):
        block(x, edges._replace(rotation=None))


def test_model_computes_the_edges_once_for_every_layer():
    """ESTModel builds one EdgeFeatures per call and hands it to every message block; its
    rotations are the model's EdgeRotation of the edge vectors."""
    from est_calc.batch import AtomsBatch
    from est_calc.model import ESTModel, ModelConfig
    from est_calc.neighbors import build_graph

    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", message="so2", n_layers=2)
    model = ESTModel(cfg).to(F64).eval()
    g = torch.Generator().manual_seed(2)
    pos = torch.rand(7, 3, generator=g, dtype=F64) * 5.0
    batch = AtomsBatch.from_arrays([pos], [torch.tensor([29, 29, 8, 6, 29, 1, 8])],
                                   [torch.eye(3, dtype=F64) * 5.0], [[True, True, False]],
                                   dtype=F64)
    graph = build_graph(batch, cfg.cutoff_A)
    seen = []
    hooks = [m.register_forward_pre_hook(lambda _m, a: seen.append(a[1])) for m in model.messages]
    model(batch, graph)
    for h in hooks:
        h.remove()
    assert len(seen) == 2 and seen[0] is seen[1] and isinstance(seen[0], EdgeFeatures)
    from est_calc.geometry import edge_vectors

    vec = edge_vectors(batch.positions, batch.cell, graph.edge_index, graph.shifts,
                       batch.system_idx)
    assert torch.equal(seen[0].rotation, model.edge_rotation(vec))


def test_block_float32_matches_float64():
    block, inputs, pos = make_block(), Inputs(6), cluster(6)
    out, (x, edges), _ = run_block(block, inputs, pos)
    edges32 = EdgeFeatures(*[t.float() if torch.is_tensor(t) and t.is_floating_point() else t
                             for t in edges])
    out32 = block.float()(x.float(), edges32)
    assert out32.dtype == torch.float32
    assert (out32.double() - out).detach().abs().max() < 1e-4 * max(1.0, float(out.detach().abs().max()))


class RolledRotation(EdgeRotation):
    """Edge rotations with a random roll about the edge axis added to every edge frame."""

    def forward(self, edge_vec):
        g = torch.Generator().manual_seed(11)
        phi = 2 * math.pi * torch.rand(edge_vec.shape[0], generator=g, dtype=edge_vec.dtype)
        return self.wigner(roll_about_axis(phi) @ edge_frame(edge_vec, self.axis_basis))


def test_block_independent_of_frame_roll():
    block, pos = make_block(), cluster(6)
    out, _, _ = run_block(block, Inputs(6), pos)
    rolled, _, _ = run_block(block, Inputs(6, rotation=RolledRotation(2, 2).to(F64)), pos)
    assert (rolled - out).abs().max() < 1e-10


def test_block_permutation_equivariance():
    block, inputs, pos = make_block(), Inputs(6), cluster(6)
    out, _, _ = run_block(block, inputs, pos)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(2))
    inv = torch.argsort(perm)
    ei = radius_graph(pos)
    shuffle = torch.randperm(ei.shape[1], generator=torch.Generator().manual_seed(4))
    (x, edges), _ = inputs(pos, ei)
    edges_p = EdgeFeatures(*[t[shuffle] if torch.is_tensor(t) else t for t in edges])
    edges_p = edges_p._replace(center=inv[edges_p.center], neighbor=inv[edges_p.neighbor])
    assert (block(x[perm], edges_p) - out[perm]).abs().max() < 1e-12


def test_isolated_atoms_get_zero_message_and_finite_gradients():
    block, inputs = make_block(), Inputs(7)
    pos = cluster(7).detach()
    pos[5] = torch.tensor([50.0, 0.0, 0.0], dtype=F64)            # no neighbours at all
    pos[6] = torch.tensor([50.0 + CUTOFF, 0.0, 0.0], dtype=F64)   # one neighbour exactly at u = 0
    pos.requires_grad_(True)
    ei = radius_graph(pos.detach(), cutoff=CUTOFF + 1e-9)
    assert ((ei[0] == 6) | (ei[1] == 6)).any()
    out, args, _ = run_block(block, inputs, pos, ei)
    assert torch.isfinite(out).all()
    assert torch.equal(out[5], args[0][5]) and torch.equal(out[6], args[0][6])
    (grad,) = torch.autograd.grad(out.square().sum(), pos, create_graph=True)
    (gg,) = torch.autograd.grad(grad.square().sum(), pos)
    assert torch.isfinite(grad).all() and torch.isfinite(gg).all()
    assert grad[5].abs().max() == 0


def small_energy_setup():
    block, inputs = make_block(channels=4), Inputs(4, channels=4)
    pos = cluster(4, scale=1.0)
    ei = radius_graph(pos)
    readout = torch.randn(4, dtype=F64, generator=torch.Generator().manual_seed(8))

    def energy(p):
        out, _, _ = run_block(block, inputs, p, ei)
        return (out[:, 0, :] @ readout).sum() + out[:, 1:4].square().sum()

    return block, pos, energy


def test_forces_and_double_backward():
    block, pos, energy = small_energy_setup()

    def force_sq(p):
        p = p if p.requires_grad else p.clone().requires_grad_(True)
        (f,) = torch.autograd.grad(-energy(p), p, create_graph=True)
        return f.square().sum()

    direction = torch.randn(pos.shape, dtype=F64, generator=torch.Generator().manual_seed(9))
    p = pos.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(energy(p), p)
    fd = directional_fd(energy, pos, direction)
    assert abs(float((g * direction).sum() - fd)) < 1e-6 * max(1.0, abs(float(fd)))
    p = pos.clone().requires_grad_(True)
    (gg,) = torch.autograd.grad(force_sq(p), p)            # double backward w.r.t. positions
    fd = (force_sq(pos + 1e-5 * direction) - force_sq(pos - 1e-5 * direction)).detach() / 2e-5
    assert abs(float((gg * direction).sum() - fd)) < 1e-5 * max(1.0, abs(float(fd)))
    force_sq(pos).backward()                               # training step on force loss
    grads = [p.grad for p in block.parameters() if p.grad is not None]
    assert len(grads) > 0 and all(torch.isfinite(g).all() for g in grads)
    assert max(float(g.abs().max()) for g in grads) > 0


@pytest.mark.slow
def test_gradcheck_and_gradgradcheck_full():
    _, pos, energy = small_energy_setup()
    pos = pos.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(energy, (pos,))
    assert torch.autograd.gradgradcheck(energy, (pos,))


def test_continuous_as_neighbour_crosses_cutoff():
    block, inputs = make_block(), Inputs(5)
    base = cluster(4, scale=0.6)
    base = base - base.mean(0)

    def result(r):
        pos = torch.cat([base, torch.tensor([[r, 0.0, 0.0]], dtype=F64)]).requires_grad_(True)
        out, _, _ = run_block(block, inputs, pos)
        e = out.square().sum()
        (g,) = torch.autograd.grad(e, pos)
        return out.detach(), g

    # Distance of the moving atom from atom 0 crosses the cutoff; it sees no other atom.
    r_c = float(base[0, 0]) + math.sqrt(CUTOFF**2 - float(base[0, 1:].square().sum()))
    assert all(float((base[k] - torch.tensor([r_c + 0.5, 0, 0], dtype=F64)).norm()) > CUTOFF
               for k in range(1, 4))
    inside, g_in = result(r_c - 1e-3)
    outside, g_out = result(r_c + 1e-3)
    deep, _ = result(r_c - 1.0)
    assert (deep - outside).abs().max() > 1e-3          # the neighbour matters when inside
    assert (inside - outside).abs().max() < 1e-6
    assert (g_in - g_out).abs().max() < 1e-4


def test_bad_input_raises():
    block, inputs, pos = make_block(), Inputs(6), cluster(6)
    _, (x, edges), _ = run_block(block, inputs, pos)
    with pytest.raises(ValueError):
        block(x[:, :4], edges)
    with pytest.raises(ValueError):
        block(x[..., :5], edges)


def test_so2linear_radial_modulation_equals_row_indexed_product():
    """The grouped, broadcast radial modulation equals multiplying every K_M row by its radial
    row (the same radial weights shared by +m and -m)."""
    gen = torch.Generator().manual_seed(5)
    for l_max, m_max in ((2, 2), (3, 1), (1, 0)):
        lin = SO2Linear(l_max, m_max, 6, 5, extra_scalars=2).double()
        x = torch.randn(9, lin.n_rows, 6, dtype=torch.float64, generator=gen)
        rad = torch.randn(9, lin.radial_size, dtype=torch.float64, generator=gen)
        got, got_extra = lin(x, rad)
        rows = rad.view(9, lin.n_radial_rows, 6)[:, lin._radial_row]
        want, want_extra = lin(x * rows, None)
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(got_extra, want_extra, rtol=1e-14, atol=1e-14)


def test_so2linear_m_pairs_follow_the_complex_rule_with_the_stored_weight_layout():
    """For m > 0 the stored fc.weight is W_r stacked over W_i, and the pair maps as
    y+ = W_r x+ - W_i x-, y- = W_i x+ + W_r x- (what checkpoints were trained with)."""
    gen = torch.Generator().manual_seed(8)
    l_max, m_max, cin, cout = 3, 2, 4, 5
    lin = SO2Linear(l_max, m_max, cin, cout).double()
    x = torch.randn(6, lin.n_rows, cin, dtype=torch.float64, generator=gen)
    y, _ = lin(x, None)
    offset = l_max + 1
    for m, fc in enumerate(lin.fcm, start=1):
        n = l_max - m + 1
        w_r, w_i = fc.weight.chunk(2, dim=0)
        x_pos = x[:, offset:offset + n].reshape(6, -1)
        x_neg = x[:, offset + n:offset + 2 * n].reshape(6, -1)
        want_pos = (x_pos @ w_r.t() - x_neg @ w_i.t()).view(6, n, cout)
        want_neg = (x_pos @ w_i.t() + x_neg @ w_r.t()).view(6, n, cout)
        torch.testing.assert_close(y[:, offset:offset + n], want_pos, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(y[:, offset + n:offset + 2 * n], want_neg, rtol=1e-13, atol=1e-13)
        offset += 2 * n
