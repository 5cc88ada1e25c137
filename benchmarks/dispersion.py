"""What DFT-D3(BJ) adds to an ESTCalculator call: plain versus ``dispersion="d3bj"``.

Systems: the 66-atom CO/Cu(111) slab and the 864-atom Cu fcc bulk of ``_common``. Each call is
a full ``ESTCalculator.calculate(atoms, ["energy", "forces", "stress"])`` with every cache
invalidated (``all_changes``, Verlet skin 0: both the model's and D3's neighbour lists are built
in every call), median of N calls after one warm-up call. The plain calculator and the one with
D3 (same potential, an untrained "small" EST, functional "rpbe") alternate in rounds, system by
system, so a change of machine load hits both; the added cost t_D3 / t_plain - 1 is taken within
each round and reported as the median over rounds with its range. Target (issue 26, item 4):
at most 15 % on the 864-atom bulk on the CPU.

A second table times the D3 term alone: its pair search, and its energy with forces and stress
(forward and backward of the term on its own).

Usage: python benchmarks/dispersion.py [--quick] [--device cpu|cuda] [--dtype float32|float64]
       [--repeats N] [--rounds N] [--cutoff A] [--cn-cutoff A]
"""

from __future__ import annotations

import statistics

from _common import (base_parser, co_cu_slab, cu_bulk, fmt_ms, machine_info, markdown_table,
                     median_time, resolve_device)

PROPERTIES = ["energy", "forces", "stress"]
SPECIES = [6, 8, 29]
FUNCTIONAL = "rpbe"
TARGET = 0.15  # at most 15 % added on the 864-atom bulk


def systems() -> dict:
    """name -> Atoms of the benchmark systems."""
    return {"CO/Cu(111) slab": co_cu_slab(), "Cu bulk": cu_bulk(6)}


def make_calculators(device: str, dtype: str, cutoff_A: float | None, cn_cutoff_A: float | None):
    """(plain, with D3) ESTCalculators sharing one untrained "small" potential."""
    import torch

    from est_calc.calculator import ESTCalculator
    from est_calc.dispersion import DispersionD3
    from est_calc.potential import Potential

    torch.manual_seed(0)
    potential = Potential.from_config("small", species=SPECIES)
    plain = ESTCalculator(potential, device=device, dtype=dtype)
    cutoffs = {k: v for k, v in (("cutoff_A", cutoff_A), ("cn_cutoff_A", cn_cutoff_A))
               if v is not None}
    d3 = DispersionD3(FUNCTIONAL, **cutoffs) if cutoffs else "d3bj"
    with_d3 = ESTCalculator(potential, device=device, dtype=dtype, dispersion=d3,
                            functional=FUNCTIONAL)
    return plain, with_d3


def time_call(calc, atoms, repeats: int, device: str) -> float:
    """Median seconds of one energy+forces+stress calculation of ``atoms``."""
    from ase.calculators.calculator import all_changes

    atoms = atoms.copy()
    return median_time(lambda: calc.calculate(atoms, PROPERTIES, all_changes),
                       repeats=repeats, warmup=1, device=device)


def time_term(calc, atoms, repeats: int, device: str) -> tuple[float, float, int]:
    """Median seconds of the D3 term alone: (pair search, energy + forces + stress), pairs."""
    import torch

    from est_calc.batch import AtomsBatch
    from est_calc.geometry import apply_strain, symmetrize

    d3 = calc.dispersion
    batch = AtomsBatch.from_atoms(atoms, device=calc.device, dtype=calc.dtype)
    pair_list = d3.pair_list()
    pairs = pair_list(batch)

    def derivatives():
        pos = batch.positions.detach().requires_grad_(True)
        strain = torch.zeros(1, 3, 3, dtype=calc.dtype, device=calc.device, requires_grad=True)
        p, c = apply_strain(pos, batch.cell, symmetrize(strain), batch.system_idx)
        energy = d3(batch.replace(positions=p, cell=c), pairs).energy.sum()
        torch.autograd.grad(energy, [pos, strain])

    t_pairs = median_time(lambda: pair_list(batch), repeats=repeats, device=device)
    t_term = median_time(derivatives, repeats=repeats, device=device)
    return t_pairs, t_term, int(pairs.i.numel())


def run(args) -> str:
    """The tables of this benchmark as one markdown string."""
    device = resolve_device(args.device)
    repeats = args.repeats or (3 if args.quick else 5)
    rounds = args.rounds or (3 if args.quick else 5)
    structs = systems()
    plain, with_d3 = make_calculators(device, args.dtype, args.cutoff, args.cn_cutoff)
    d3 = with_d3.dispersion
    times = {name: {"plain": [], "d3": []} for name in structs}
    # Alternating rounds: each ratio compares timings taken seconds apart.
    for _ in range(rounds):
        for name, atoms in structs.items():
            times[name]["plain"].append(time_call(plain, atoms, repeats, device))
            times[name]["d3"].append(time_call(with_d3, atoms, repeats, device))
    rows = []
    verdict = []
    for name, atoms in structs.items():
        t0, t1 = times[name]["plain"], times[name]["d3"]
        added = [b / a - 1.0 for a, b in zip(t0, t1)]
        med = statistics.median(added)
        rows.append([name, len(atoms), fmt_ms(statistics.median(t0)),
                     fmt_ms(statistics.median(t1)), f"{100 * med:+.1f} %",
                     f"{100 * min(added):+.1f} to {100 * max(added):+.1f} %"])
        if name == "Cu bulk":
            verdict.append(f"864-atom bulk: D3 adds {100 * med:.1f} % (target <= "
                           f"{100 * TARGET:.0f} %: {'met' if med <= TARGET else 'NOT met'})")
    term_rows = []
    for name, atoms in structs.items():
        t_pairs, t_term, n_pairs = time_term(with_d3, atoms, repeats, device)
        term_rows.append([name, len(atoms), n_pairs, fmt_ms(t_pairs), fmt_ms(t_term),
                          fmt_ms(t_pairs + t_term)])
    out = [f"## DFT-D3(BJ) cost ({device}, {args.dtype})", "", machine_info(device), "",
           (f"D3: functional {FUNCTIONAL!r}, pair cutoff {d3.cutoff_A:g} Å, CN cutoff "
            f"{d3.cn_cutoff_A:g} Å; {rounds} rounds x {repeats} calls (median after one "
            "warm-up), plain and D3 alternating."), "",
           markdown_table(["system", "atoms", "plain ms", "with D3 ms", "added (median)",
                           "added (range over rounds)"], rows), "",
           *verdict, "",
           "### The D3 term alone, ms", "",
           markdown_table(["system", "atoms", "pairs", "pair search", "energy+forces+stress",
                           "total"], term_rows), ""]
    return "\n".join(out)


def main(argv=None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per case and round (after one warm-up call)")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds of plain and D3 timings, alternating (default 5, --quick 3)")
    p.add_argument("--cutoff", type=float, default=None,
                   help="D3 pair cutoff in Å (default: est_calc.dispersion.DEFAULT_CUTOFF_A)")
    p.add_argument("--cn-cutoff", type=float, default=None,
                   help="D3 coordination-number cutoff in Å (default: DEFAULT_CN_CUTOFF_A)")
    args = p.parse_args(argv)
    print(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
