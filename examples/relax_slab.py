"""Relax a rattled Cu(111) slab with an O adatom, then a strained Cu bulk cell.

Run:  python examples/relax_slab.py [--calc est|emt|PATH]

Uses the default EST potential when one ships; otherwise it says so and falls back to ASE's
EMT so that the workflow itself can still be shown.
"""

import argparse

from ase.build import add_adsorbate, bulk

from md_recipes import build_slab, relax


def pick_calculator(spec: str):
    """ESTCalculator for "est" (EMT with a notice if no default potential ships), else EMT/path."""
    from md_recipes.cli import make_calculator

    try:
        return make_calculator(spec)
    except (FileNotFoundError, ValueError) as exc:
        from ase.calculators.emt import EMT

        print(f"[no EST potential available: {exc}]\n[falling back to ASE EMT for this demo]")
        return EMT()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calc", default="est")
    args = parser.parse_args()
    calc = pick_calculator(args.calc)

    slab = build_slab("Cu111", size=(3, 3, 4))  # bottom two layers fixed
    add_adsorbate(slab, "O", 1.5, "fcc")
    slab.rattle(0.05, seed=0)
    res = relax(slab, calc, fmax_eV_per_A=0.03, optimizer="FIRE", trajectory="relax_slab.traj")
    print(f"slab:  converged={res.converged} in {res.steps} steps, "
          f"E {res.energies[0]:.4f} -> {res.energies[-1]:.4f} eV, fmax {res.fmax_eV_per_A:.3f}")

    strained = bulk("Cu", "fcc", a=3.75)
    res = relax(strained, calc, fmax_eV_per_A=1e-3, optimizer="BFGS", relax_cell=True)
    a = res.atoms.cell.cellpar()[0] * 2**0.5
    print(f"bulk:  converged={res.converged}, relaxed fcc lattice constant a = {a:.4f} Å")


if __name__ == "__main__":
    main()
