"""Batched evaluation and batched relaxation versus one structure at a time (EST "small").

Table 1: ``ESTCalculator.calculate_batch`` of N small adsorbate/slab structures in one pass
versus N single ``calculate`` calls (energy + forces).
Table 2: ``md_recipes.relax_many`` (batched FIRE) versus N separate ``md_recipes.relax`` runs
with the same calculator, fmax and step limit (the untrained model's energy scale is raised so
its forces are of order 0.5 eV/Å; the total FIRE steps of both paths are shown). The calculator
has the recipes' 1 Å Verlet skin (``md_recipes.relax.DEFAULT_SKIN_A``, as ``est relax``) for
both paths; the two paths alternate for ``rounds`` rounds (medians).

Speed-up = t_one_by_one / t_batched; target of the Performance issue: >= 5x. N = 64 (``--quick``:
16).

Usage: python benchmarks/batched.py [--quick | --full] [--device cpu|cuda] [--n N]
"""

from __future__ import annotations

import time
import warnings

from _common import base_parser, fmt_ms, markdown_table, resolve_device, sync

TARGET = 5.0
FORCE_SCALE = 30.0
SPECIES = [1, 6, 8, 29]


def small_slabs(n: int) -> list:
    """n different small adsorbate/slab structures: Cu(111) 2x2x3 + O, CO or H, rattled (13-14 atoms)."""
    from ase.build import add_adsorbate, fcc111
    from ase import Atoms

    adsorbates = [Atoms("O"), Atoms("CO", positions=[(0, 0, 0), (0, 0, 1.15)]), Atoms("H")]  # C down
    out = []
    for k in range(n):
        slab = fcc111("Cu", size=(2, 2, 3), vacuum=8.0)
        add_adsorbate(slab, adsorbates[k % 3], 1.8, ("ontop", "fcc", "hcp")[k % 3])
        slab.pbc = True
        slab.rattle(0.08, seed=k)
        out.append(slab)
    return out


def make_calculator(device: str, dtype: str, skin: float = 0.0):
    """ESTCalculator around an untrained "small" potential with forces of order 0.5 eV/Å.

    An untrained model gives forces of ~0.02 eV/Å, below fmax, so every relaxation would stop
    at step 0; its energy scale (a buffer that training sets) is raised to FORCE_SCALE so the
    relaxations have work to do. Speed does not depend on the value.
    """
    import torch

    from est_calc.calculator import ESTCalculator
    from est_calc.potential import Potential

    torch.manual_seed(0)
    potential = Potential.from_config("small", species=SPECIES)
    potential.model.energy_scale.fill_(FORCE_SCALE)
    return ESTCalculator(potential, device=device, dtype=dtype, skin=skin)


def time_evaluation(calc, structs: list, device: str, rounds: int = 3) -> tuple[float, float]:
    """(seconds for N single calls, seconds for one calculate_batch of all N), after warm-up.

    Single and batched passes alternate for ``rounds`` rounds and the median of each is
    returned, so a change of machine load during the run hits both paths alike.
    """
    import statistics

    from ase.calculators.calculator import all_changes

    props = ["energy", "forces"]
    calc.calculate(structs[0], props, all_changes)  # warm-up
    calc.calculate_batch(structs[:2], props)
    sync(device)
    singles, batched = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for atoms in structs:
            calc.calculate(atoms, props, all_changes)
        sync(device)
        t1 = time.perf_counter()
        calc.calculate_batch(structs, props)
        sync(device)
        singles.append(t1 - t0)
        batched.append(time.perf_counter() - t1)
    return statistics.median(singles), statistics.median(batched)


def time_relaxation(calc, structs: list, max_steps: int, device: str, rounds: int = 3) -> dict:
    """Seconds (median over ``rounds`` alternating rounds) and steps of N separate relax() runs
    and of one relax_many() run."""
    import statistics

    from md_recipes.relax import relax, relax_many

    single_s, many_s = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not converged" warnings of an untrained model
        for k in range(rounds):
            order = ("single", "many") if k % 2 == 0 else ("many", "single")
            for path in order:
                t0 = time.perf_counter()
                if path == "single":
                    singles = [relax(a, calc, fmax_eV_per_A=0.05, max_steps=max_steps)
                               for a in structs]
                else:
                    many = relax_many(structs, calc, fmax_eV_per_A=0.05, max_steps=max_steps)
                sync(device)
                (single_s if path == "single" else many_s).append(time.perf_counter() - t0)
    return {"single_s": statistics.median(single_s), "many_s": statistics.median(many_s),
            "single_steps": sum(r.steps for r in singles),
            "many_steps": sum(r.steps for r in many),
            "single_conv": sum(r.converged for r in singles),
            "many_conv": sum(r.converged for r in many),
            "ratios": [a / b for a, b in zip(single_s, many_s)]}


def run(args) -> str:
    """Both tables as one markdown string."""
    device = resolve_device(args.device)
    n = args.n or (16 if args.quick else 64)
    steps = args.relax_steps or (5 if args.quick else 30)
    structs = small_slabs(n)
    from md_recipes.relax import DEFAULT_SKIN_A

    calc = make_calculator(device, args.dtype)
    t_single, t_batch = time_evaluation(calc, structs, device)
    relax_calc = make_calculator(device, args.dtype, skin=DEFAULT_SKIN_A)
    rounds = 1 if args.quick else 3
    relax_t = time_relaxation(relax_calc, structs, steps, device, rounds)
    speed = t_single / t_batch
    rspeed = relax_t["single_s"] / relax_t["many_s"]
    atoms = sum(len(a) for a in structs)

    def verdict(x: float) -> str:
        return "met" if x >= TARGET else "NOT met"

    rows = [[f"{n} single calculate()", n, atoms, fmt_ms(t_single), fmt_ms(t_single / n), "1.00x"],
            ["one calculate_batch()", n, atoms, fmt_ms(t_batch), fmt_ms(t_batch / n),
             f"{speed:.2f}x"]]
    out = [f"### Batched evaluation, EST-small, energy+forces ({device}, {args.dtype}; median "
           "of 3 alternating rounds)", "",
           markdown_table(["path", "structures", "atoms", "total ms", "ms/structure",
                           "speed-up"], rows), "",
           f"Target >= {TARGET:.0f}x: {verdict(speed)} ({speed:.2f}x).", ""]
    rows = [[f"{n} x relax()", relax_t["single_steps"], relax_t["single_conv"],
             fmt_ms(relax_t["single_s"]), "1.00x"],
            ["relax_many()", relax_t["many_steps"], relax_t["many_conv"],
             fmt_ms(relax_t["many_s"]), f"{rspeed:.2f}x"]]
    out += [f"### Batched relaxation, EST-small (untrained), FIRE, fmax 0.05 eV/Å, at most "
            f"{steps} steps, {DEFAULT_SKIN_A:g} Å Verlet skin ({device}; median of {rounds} "
            "alternating rounds)", "",
            markdown_table(["path", "total steps", "converged", "total ms", "speed-up"], rows),
            "", f"Target >= {TARGET:.0f}x: {verdict(rspeed)} ({rspeed:.2f}x; rounds "
            + ", ".join(f"{r:.2f}x" for r in relax_t["ratios"]) + ").", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=None, help="number of structures (64; quick: 16)")
    p.add_argument("--relax-steps", type=int, default=None, help="FIRE step limit (30; quick: 5)")
    args = p.parse_args(argv)
    if args.n is not None and args.n < 2:
        raise ValueError(f"--n must be >= 2, got {args.n}")
    print(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
