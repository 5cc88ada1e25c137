"""Equivariance error of untrained EST update-block stacks versus grid (paper Table 5 protocol).

Inputs are node features built from real molecules (ase.collections.g2 plus rattled copies):

    x_i[k, c] = a_c(Z_i) [k = 0] + sum_{j != i, r_ij < 5 A} b_c(Z_j) G_c(r_ij) u(r_ij) Y_k(r_ij / r_ij)

with Gaussian radial channels G_c, a cosine cutoff u and random element weights a, b. The molecule
is rotated (positions R p) and the features are recomputed, so the rotated input is exact (no
Wigner-D round-off). A stack of 1..6 untrained ESTUpdateBlocks (same weights for every grid) is
applied to both inputs and we report, after each layer, mean |y(x) - R^-1 y(R x)| over the
l = 0 (invariant) and l = 1 (vector: R applied) outputs, per atom and channel, in float64.

Rows: Fibonacci (offset) at several S, the author-code lattice, Lebedev rules, the e3nn lat/long
grid with and without log-quadrature weights, the paper's normalised-transpose inverse, and
rotation averaging over k = 2, 4 fixed random grid rotations (:func:`rotation_averaged`), which
multiplies the cost by k in exchange for a lower error.

Usage::

    python benchmarks/equivariance.py --quick     # < 1 min
    python benchmarks/equivariance.py             # a few minutes, >= 100 molecules
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import numpy as np
import torch
from ase.collections import g2
from e3nn import o3

from est_calc.nn import ESTUpdateBlock
from est_calc.sphere import SphericalGrid, lat_long, make_grid

F64 = torch.float64


def rotation_averaged(fn, x: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Average fn over k fixed random rotations of the grid: (1/k) sum_j D_j^T fn(D_j x).

    Rotating the input features by D(R_j) and the output back by D(R_j)^T is the same as running
    fn on the grid rotated by R_j^T. The rotations are drawn from ``seed`` so the averaged map is a
    fixed function. It trades k times the cost for a smaller equivariance error (the grid
    discretisation errors of different orientations partly cancel); it is never exact.

    Args:
        fn: maps [N, K, C] -> [N, K, C] (or a list of such tensors, e.g. one per layer).
        x: [N, K, C] steerable features, K = (L+1)^2.
        k: number of rotations (k >= 1).
        seed: seed of the rotations.
    """
    if k < 1:
        raise ValueError(f"rotation_averaged: k must be >= 1, got {k}")
    l_max = math.isqrt(x.shape[1]) - 1
    irreps = o3.Irreps.spherical_harmonics(l_max)
    gen = torch.Generator().manual_seed(seed)
    total, is_list = None, False
    for _ in range(k):
        q = torch.randn(4, generator=gen, dtype=F64)
        d = irreps.D_from_matrix(o3.quaternion_to_matrix(q / q.norm())).to(x)
        out = fn(torch.einsum("ij,njc->nic", d, x))
        is_list = isinstance(out, list)
        outs = out if is_list else [out]
        back = [torch.einsum("ji,njc->nic", d, y) for y in outs]
        total = back if total is None else [a + b for a, b in zip(total, back)]
    total = [t / k for t in total]
    return total if is_list else total[0]


def molecules(n_molecules: int, n_rattled: int, seed: int = 0):
    """g2 molecules with >= 2 atoms (the first n_molecules) plus n_rattled rattled copies of each."""
    mols = [a for a in g2 if len(a) >= 2][:n_molecules]
    out = []
    for i, atoms in enumerate(mols):
        out.append(atoms.copy())
        for r in range(n_rattled):
            copy = atoms.copy()
            copy.rattle(stdev=0.05, seed=seed + 1000 * r + i)
            out.append(copy)
    return out


def node_features(mols, rotations, l_max, channels, cutoff=5.0, seed=0):
    """Steerable node features [N, K, C] (float64) of all atoms, molecule m rotated by rotations[m]."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(119, channels, generator=gen, dtype=F64)
    b = torch.randn(119, channels, generator=gen, dtype=F64)
    mu = torch.linspace(0.8, cutoff, channels, dtype=F64)
    feats = []
    for atoms, rot in zip(mols, rotations):
        pos = torch.as_tensor(atoms.positions, dtype=F64) @ rot.T
        z = torch.as_tensor(atoms.numbers)
        x = torch.zeros(len(atoms), (l_max + 1) ** 2, channels, dtype=F64)
        x[:, 0] = a[z]
        vec = pos[None, :, :] - pos[:, None, :]
        dist = vec.norm(dim=-1)
        i, j = torch.nonzero((dist < cutoff) & (dist > 0), as_tuple=True)
        r = dist[i, j]
        y = o3.spherical_harmonics(list(range(l_max + 1)), vec[i, j], normalize=True,
                                   normalization="component")
        radial = torch.exp(-((r[:, None] - mu) / 0.6) ** 2) * (0.5 * (torch.cos(math.pi * r / cutoff) + 1))[:, None]
        x.index_add_(0, i, y[:, :, None] * (radial * b[z[j]])[:, None, :])
        feats.append(x)
    return torch.cat(feats)


def build_stack(grid, l_max, channels, n_layers, seed=0):
    torch.manual_seed(seed)  # identical weights for every grid (parameters do not depend on S)
    return torch.nn.ModuleList(ESTUpdateBlock(l_max, channels, grid) for _ in range(n_layers))


def run_stack(stack, x):
    outs = []
    for block in stack:
        x = block(x)
        outs.append(x)
    return outs


def grid_rows(l_max, quick):
    k = (l_max + 1) ** 2
    s0 = (2 * l_max + 1) * (2 * l_max + 2)
    ll = lat_long(l_max)
    rows = [
        (f"fibonacci S=K={k}", make_grid("fibonacci", l_max, k), 1),
        (f"fibonacci S={s0}", make_grid("fibonacci", l_max, s0), 1),
        (f"fibonacci S={4 * s0}", make_grid("fibonacci", l_max, 4 * s0), 1),
        (f"fibonacci_poles S={s0}", make_grid("fibonacci_poles", l_max, s0), 1),
        (f"fibonacci_poles S={s0} + normalized_transpose (paper)",
         make_grid("fibonacci_poles", l_max, s0, inverse="normalized_transpose"), 1),
    ]
    lebedev_degrees = [9, 17] if quick else [9, 17, 29]
    for deg in lebedev_degrees:
        if deg >= 2 * l_max:
            g = make_grid("lebedev", l_max, deg)
            rows.append((f"lebedev deg {deg} S={g.n_points}", g, 1))
    rows.append((f"lat_long S={len(ll.points)} + log-weights", SphericalGrid(l_max, ll.points, ll.weights), 1))
    rows.append((f"lat_long S={len(ll.points)} unweighted", SphericalGrid(l_max, ll.points), 1))
    for k_rot in (2, 4):
        rows.append((f"fibonacci S={s0}, rotation-averaged k={k_rot}", make_grid("fibonacci", l_max, s0), k_rot))
    return rows


def macs_per_atom(l_max, channels, n_points, k_rot=1, hidden_mult=2, n_st=1, n_sp=1):
    """Multiply-accumulates per atom of one ESTUpdateBlock (EST_SPEC.md section 11 cost model).

    to/from grid 2SKC + Q, K, V, O projections 4SC^2 + scores and values 2S^2C + spherical experts
    2 n_sp S C H + steerable experts 2 n_st K C H (H = hidden_mult C); times k for rotation
    averaging (the Wigner rotations themselves are negligible).
    """
    s, k, c, h = n_points, (l_max + 1) ** 2, channels, hidden_mult * channels
    per = 2 * s * k * c + 4 * s * c * c + 2 * s * s * c + 2 * n_sp * s * c * h + 2 * n_st * k * c * h
    return k_rot * per


def time_per_call(stack, x, k_rot, repeats=3):
    """Median wall time (ms) of one float32 forward of the first block (times k_rot)."""
    block = copy.deepcopy(stack[0]).to(torch.float32)
    x32 = x.to(torch.float32)
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            if k_rot == 1:
                block(x32)
            else:
                rotation_averaged(block, x32, k_rot)
            if x32.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (< 1 min)")
    parser.add_argument("--l-max", type=int, default=4)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--molecules", type=int, default=None, help="default 20 quick, 100 full")
    parser.add_argument("--rattled", type=int, default=None, help="copies per molecule; 0 / 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    n_mol = args.molecules or (20 if args.quick else 100)
    n_rat = args.rattled if args.rattled is not None else (0 if args.quick else 1)
    mols = molecules(n_mol, n_rat, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    rots = [o3.quaternion_to_matrix(q / q.norm()) for q in torch.randn(len(mols), 4, generator=gen, dtype=F64)]
    eye = [torch.eye(3, dtype=F64)] * len(mols)
    l, c = args.l_max, args.channels
    x = node_features(mols, eye, l, c, seed=args.seed).to(args.device)
    x_rot = node_features(mols, rots, l, c, seed=args.seed).to(args.device)
    atom_rot = torch.cat([r.expand(len(m), 3, 3) for r, m in zip(rots, mols)]).to(args.device)
    print(f"# EST update-block stacks, untrained: L={l}, C={c}, {len(mols)} structures "
          f"({n_mol} g2 molecules + {n_rat} rattled copies each), {x.shape[0]} atoms, float64, "
          f"{args.device}")
    print("# error = mean over atoms, channels and components of |y(x) - R^-1 y(Rx)| on the l=0 and "
          "l=1 outputs (last layer for err x MMAC); MMAC from the section-11 cost model; time = one "
          "block forward in float32 over all atoms (x k for averaging), wall clock\n")
    header = "| grid | " + " | ".join(f"{n} layer{'s' if n > 1 else ''}" for n in range(1, args.layers + 1))
    print(header + " | MMAC / atom / block | err x MMAC | ms / block call |")
    print("|" + "---|" * (args.layers + 4))
    for name, grid, k_rot in grid_rows(l, args.quick):
        stack = build_stack(grid, l, c, args.layers, seed=args.seed).to(args.device, F64)
        with torch.no_grad():
            if k_rot == 1:
                y, y_rot = run_stack(stack, x), run_stack(stack, x_rot)
            else:
                y = rotation_averaged(lambda t: run_stack(stack, t), x, k_rot)
                y_rot = rotation_averaged(lambda t: run_stack(stack, t), x_rot, k_rot)
        errs, scale = [], None
        for a, b in zip(y, y_rot):
            e0 = (b[:, 0] - a[:, 0]).abs()
            e1 = (torch.einsum("nji,njc->nic", atom_rot, b[:, 1:4]) - a[:, 1:4]).abs()  # R^T y1(Rx)
            errs.append(torch.cat([e0.flatten(), e1.flatten()]).mean().item())
            scale = a[:, :4].abs().mean().item()
        ms = time_per_call(stack, x, k_rot)
        mmac = macs_per_atom(l, c, grid.n_points, k_rot) / 1e6
        cells = " | ".join(f"{e:.1e}" for e in errs)
        print(f"| {name} | {cells} | {mmac:.2f} | {errs[-1] * mmac:.1e} | {ms:.1f} |", flush=True)
    print(f"\n# mean |y| of the l<=1 outputs after the last layer: {scale:.2f}")


if __name__ == "__main__":
    main()
