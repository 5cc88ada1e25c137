"""Adsorption energies of O and CO on the sites of Cu(111), OC20 references.

Run:  python examples/adsorption_energy.py [--calc est|emt|PATH]
"""

import argparse

from md_recipes import adsorption_energy, build_slab

try:
    from relax_slab import pick_calculator
except ImportError:  # run from elsewhere
    from examples.relax_slab import pick_calculator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calc", default="est")
    args = parser.parse_args()
    calc = pick_calculator(args.calc)

    slab = build_slab("Cu111", size=(3, 3, 4))
    for adsorbate in ("O", "CO"):
        res = adsorption_energy(slab, adsorbate, calc, sites="all", fmax_eV_per_A=0.03)
        print(f"\n{adsorbate} on Cu(111)")
        print(res.table())
        print(f"most stable: {res.best.site}")


if __name__ == "__main__":
    main()
