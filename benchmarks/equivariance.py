"""Equivariance error of untrained EST update-block stacks and whole models versus grid (Table 5).

Inputs are node features built from real molecules (ase.collections.g2 plus rattled copies):

    x_i[k, c] = a_c(Z_i) [k = 0] + sum_{j != i, r_ij < 5 A} b_c(Z_j) G_c(r_ij) u(r_ij) Y_k(r^_ij)

with Gaussian radial channels G_c, a cosine cutoff u and random element weights a, b. The molecule
is rotated (positions R p) and the features are recomputed, so the rotated input is exact (no
Wigner-D round-off). A stack of 1..6 untrained ESTUpdateBlocks (same weights for every grid) is
applied to both inputs and we report, after each layer, mean |y(x) - R^-1 y(R x)| over the
l = 0 (invariant) and l = 1 (vector: R applied) outputs, per atom and channel, in float64.

Rows: Fibonacci (offset) at several S, the author-code lattice, Lebedev rules, the e3nn lat/long
grid with and without log-quadrature weights, the paper's normalised-transpose inverse, and
rotation averaging over k = 2, 4 fixed random grid rotations (:func:`rotation_averaged`), which
multiplies the cost by k in exchange for a lower error.

``--models`` applies the same protocol to whole untrained ``ESTModel``s (float64, eval mode, the
"tiny" preset with L=2, C=16 by default, 1..6 layers, message block "est" and "so2", one row per
grid): each molecule m is rotated by its own random R_m, the energy E and the forces F (autograd,
``energy_forces_stress``) are computed for x and R x on a non-periodic graph, and we report the mean
|E(x) - E(Rx)| / n_atoms and the mean |R F(x) - F(Rx)| per force component, in the untrained
model's own units (energy_scale = 1, no references), plus the time of one energy+forces call.

Usage::

    python benchmarks/equivariance.py --quick             # < 1 min
    python benchmarks/equivariance.py                     # a few minutes, >= 100 molecules
    python benchmarks/equivariance.py --models --quick    # < 3 min, layers 1, 3, 6
    python benchmarks/equivariance.py --models            # 100 molecules + rattled, layers 1..6
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time

import numpy as np
import torch
from ase.collections import g2
from e3nn import o3

from est_calc.accel import accelerate
from est_calc.batch import AtomsBatch
from est_calc.forces import energy_forces_stress
from est_calc.geometry import random_rotations
from est_calc.model import ESTModel, ModelConfig
from est_calc.neighbors import build_graph
from est_calc.nn import ESTUpdateBlock
from est_calc.sphere import SphericalGrid, lat_long, make_grid
from est_calc.sphere.points import lebedev, lebedev_degrees

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
        d = irreps.D_from_matrix(random_rotations(1, F64, generator=gen)[0]).to(x)
        out = fn(torch.einsum("ij,njc->nic", d, x))
        is_list = isinstance(out, list)
        outs = out if is_list else [out]
        back = [torch.einsum("ji,njc->nic", d, y) for y in outs]
        total = back if total is None else [a + b for a, b in zip(total, back)]
    total = [t / k for t in total]
    return total if is_list else total[0]


def molecules(n_molecules: int, n_rattled: int, seed: int = 0):
    """The first n_molecules g2 molecules with >= 2 atoms, plus n_rattled rattled copies of each."""
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
    """Steerable node features [N, K, C] (float64) of all atoms; molecule m rotated by R_m."""
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
        envelope = 0.5 * (torch.cos(math.pi * r / cutoff) + 1)
        radial = torch.exp(-((r[:, None] - mu) / 0.6) ** 2) * envelope[:, None]
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
    rows.append((f"lat_long S={len(ll.points)} + log-weights",
                 SphericalGrid(l_max, ll.points, ll.weights), 1))
    rows.append((f"lat_long S={len(ll.points)} unweighted", SphericalGrid(l_max, ll.points), 1))
    for k_rot in (2, 4):
        rows.append((f"fibonacci S={s0}, rotation-averaged k={k_rot}",
                     make_grid("fibonacci", l_max, s0), k_rot))
    return rows


def macs_per_atom(l_max, channels, n_points, k_rot=1, hidden_mult=2, n_st=1, n_sp=1):
    """Multiply-accumulates per atom of one ESTUpdateBlock (EST_SPEC.md section 11 cost model).

    to/from grid 2SKC + Q, K, V, O projections 4SC^2 + scores and values 2S^2C + spherical experts
    2 n_sp S C H + steerable experts 2 n_st K C H (H = hidden_mult C); times k for rotation
    averaging (the Wigner rotations themselves are negligible).
    """
    s, k, c, h = n_points, (l_max + 1) ** 2, channels, hidden_mult * channels
    per = (2 * s * k * c + 4 * s * c * c + 2 * s * s * c + 2 * n_sp * s * c * h
           + 2 * n_st * k * c * h)
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


def model_grid_rows(l_max):
    """(label, ModelConfig overrides) of every grid of the models mode.

    Fibonacci at S0 = (2L+1)(2L+2) and 4 S0, the author-code lattice at S0, the smallest Lebedev
    rule of degree >= 2L and the smallest of degree >= 4L+1 (exact for products of two degree-2L
    functions), and the e3nn lat/long grid. ``message_n_points=None``: the "est" message block
    samples its per-edge features on the same grid as the update blocks.
    """
    s0 = (2 * l_max + 1) * (2 * l_max + 2)
    rows = [(f"fibonacci S={s0}", dict(grid="fibonacci", n_points=s0)),
            (f"fibonacci S={4 * s0}", dict(grid="fibonacci", n_points=4 * s0)),
            (f"fibonacci_poles S={s0}", dict(grid="fibonacci_poles", n_points=s0))]
    for lowest in (2 * l_max, 4 * l_max + 1):
        deg = min(d for d in lebedev_degrees() if d >= lowest)
        label = f"lebedev deg {deg} S={len(lebedev(deg).points)}"
        rows.append((label, dict(grid="lebedev", n_points=deg)))
    rows.append((f"lat_long S={len(lat_long(l_max).points)}", dict(grid="lat_long", n_points=None)))
    return [(name, dict(kw, message_n_points=None)) for name, kw in rows]


def rotated_copies(mols, rotations):
    """Copies of mols with positions p -> R_m p (rows: p R_m^T); non-periodic, no cell."""
    out = []
    for atoms, rot in zip(mols, rotations):
        atoms = atoms.copy()
        atoms.positions = atoms.positions @ rot.numpy().T
        out.append(atoms)
    return out


def model_equivariance(model, inputs, atom_rot, n_atoms):
    """Energy and force equivariance errors of one model.

    Args:
        model: an ESTModel in eval mode, float64.
        inputs: ((batch, graph) of x, (batch, graph) of R x).
        atom_rot: [N, 3, 3] rotation of each atom's molecule.
        n_atoms: [B] atoms per structure.

    Returns:
        (mean |E(x) - E(Rx)| / n_atoms, mean |R F(x) - F(Rx)| per component, mean |E| / n_atoms,
        mean |F| per component, ms per energy+forces call over all B structures, the faster of the
        two calls, which is less sensitive to other jobs on a shared machine).
    """
    preds, times = [], []
    for batch, graph in inputs:
        t0 = time.perf_counter()
        preds.append(energy_forces_stress(model, batch, graph))
        times.append(time.perf_counter() - t0)
    p, q = preds
    e_err = ((p.energy - q.energy).abs() / n_atoms).mean().item()
    f_err = (torch.einsum("nij,nj->ni", atom_rot, p.forces) - q.forces).abs().mean().item()
    e_abs = (p.energy.abs() / n_atoms).mean().item()
    return e_err, f_err, e_abs, p.forces.abs().mean().item(), 1e3 * min(times)


def main_models(args, mols, rots, layers):
    """The --models mode: whole untrained ESTModels, energy and force errors (markdown tables)."""
    l = 2 if args.l_max is None else args.l_max
    c = 16 if args.channels is None else args.channels
    inputs = []
    for structures in (mols, rotated_copies(mols, rots)):
        batch = AtomsBatch.from_atoms(structures, device=args.device, dtype=F64)
        inputs.append((batch, build_graph(batch, ModelConfig.preset("tiny").cutoff_A)))
    n_atoms = inputs[0][0].atoms_per_system().to(F64)
    atom_rot = torch.cat([r.expand(len(m), 3, 3) for r, m in zip(rots, mols)]).to(args.device)
    print(f"# whole untrained ESTModels (preset tiny, L={l}, C={c}), {len(mols)} structures, "
          f"{inputs[0][0].n_atoms} atoms, {inputs[0][1].edge_index.shape[1]} edges, float64, eval, "
          f"{args.device}; same weights for every grid of a message block")
    torch.manual_seed(args.seed)  # warm-up call (lazy initialisation): a fair first-row time
    warm = ESTModel(ModelConfig.preset("tiny", l_max=l, channels=c)).to(args.device, F64).eval()
    warm = accelerate(warm, inference=True)
    energy_forces_stress(warm, *inputs[0])
    tables = {"energy": [], "forces": [], "time": []}
    for message in ("est", "so2"):
        for name, grid_kw in model_grid_rows(l):
            cells = {k: [] for k in tables}
            for n in layers:
                cfg = ModelConfig.preset("tiny", l_max=l, channels=c, n_layers=n, message=message,
                                         **grid_kw)
                torch.manual_seed(args.seed)  # parameters do not depend on the grid
                model = accelerate(ESTModel(cfg).to(args.device, F64).eval(), inference=True)
                e_err, f_err, e_abs, f_abs, ms = model_equivariance(model, inputs, atom_rot,
                                                                    n_atoms)
                cells["energy"].append(f"{e_err:.1e}")
                cells["forces"].append(f"{f_err:.1e}")
                cells["time"].append(f"{ms:.0f}")
            cells["energy"].append(f"{e_abs:.2g}")
            cells["forces"].append(f"{f_abs:.2g}")
            for k in tables:
                tables[k].append(f"| {message} | {name} | " + " | ".join(cells[k]) + " |")
            print(f"#   done: {message} {name}", file=sys.stderr, flush=True)
    cols = " | ".join(f"{n} layer{'s' if n > 1 else ''}" for n in layers)
    titles = {
        "energy": ("mean |E(x) - E(Rx)| / atom", f" | mean abs(E) / atom ({layers[-1]} layers)"),
        "forces": ("mean |R F(x) - F(Rx)| per component", f" | mean abs(F) ({layers[-1]} layers)"),
        "time": ("ms per energy+forces call (all structures at once, faster of x and Rx)", ""),
    }
    for k, (title, extra) in titles.items():
        print(f"\n## {title}\n\n| message | grid | {cols}{extra} |")
        print("|" + "---|" * (2 + len(layers) + bool(extra)))
        print("\n".join(tables[k]))
    print("\nNotes: untrained models, so errors are in the model's own units (energy_scale = 1); "
          "compare them with the mean |E| / atom and |F| columns. The \"so2\" message block is "
          "exactly equivariant (Wigner rotations to the edge frame), so its rows show the update "
          "blocks' grid contribution alone; the \"est\" rows add the per-edge grid of the message "
          "block. With one so2 layer the error is round-off: the update block's l=0 output reads "
          "only x^0 (scalar_out), the energy reads only l=0, so the grid's error (in the l>0 "
          "outputs) reaches the energy only through a later message block. Times are wall clock "
          "on a shared machine and only indicative.")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (< 1 min)")
    parser.add_argument("--models", action="store_true",
                        help="whole untrained ESTModels (energy, forces) instead of block stacks")
    parser.add_argument("--l-max", type=int, default=None, help="default 4 blocks, 2 models")
    parser.add_argument("--channels", type=int, default=None, help="default 32 blocks, 16 models")
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
    rots = list(random_rotations(len(mols), F64, generator=gen))
    if args.models:
        layers = range(1, args.layers + 1)
        if args.quick:
            layers = [n for n in (1, 3, 6) if n <= args.layers]
        return main_models(args, mols, rots, list(layers))
    eye = [torch.eye(3, dtype=F64)] * len(mols)
    l = 4 if args.l_max is None else args.l_max
    c = 32 if args.channels is None else args.channels
    x = node_features(mols, eye, l, c, seed=args.seed).to(args.device)
    x_rot = node_features(mols, rots, l, c, seed=args.seed).to(args.device)
    atom_rot = torch.cat([r.expand(len(m), 3, 3) for r, m in zip(rots, mols)]).to(args.device)
    print(f"# EST update-block stacks, untrained: L={l}, C={c}, {len(mols)} structures "
          f"({n_mol} g2 molecules + {n_rat} rattled copies each), {x.shape[0]} atoms, float64, "
          f"{args.device}")
    print("# error = mean over atoms, channels and components of |y(x) - R^-1 y(Rx)| on the l=0 "
          "and l=1 outputs (last layer for err x MMAC); MMAC from the section-11 cost model; "
          "time = one block forward in float32 over all atoms (x k for averaging), wall clock\n")
    cols = " | ".join(f"{n} layer{'s' if n > 1 else ''}" for n in range(1, args.layers + 1))
    header = "| grid | " + cols
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
