"""OC20-style adsorption energies with an EST potential against its teacher (ASE's EMT).

The same workflow (``md_recipes.adsorption_energy``: relaxed clean slab, OC20 gas references
computed with the same calculator, each site relaxed, best converged site) runs once with EMT and
once with the potential; the table gives both adsorption energies per slab and adsorbate and
their difference. Slabs use EMT's own lattice constants, so the teacher's slabs are unstrained.

Usage: python benchmarks/adsorption_vs_teacher.py [POTENTIAL] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SLABS = {"Cu111": ("fcc", "ontop"), "Pt111": ("fcc", "ontop"), "Au100": ("hollow", "ontop")}
ADSORBATES = ("O", "H", "C", "N", "OH", "CO")


def run(potential: str, slabs: dict, adsorbates, size=(3, 3, 3)) -> list[dict]:
    import warnings

    from ase.calculators.emt import EMT

    from est_calc.calculator import ESTCalculator
    from est_calc.training.synthetic import emt_lattice_constant
    from md_recipes import adsorption_energy, build_slab

    calcs = {"EMT": EMT(), "EST": ESTCalculator(potential, device="cpu", skin=1.0)}
    rows = []
    for name, sites in slabs.items():
        slab = build_slab(name, size=size, a_A=emt_lattice_constant(name[:-3]))
        for ads in adsorbates:
            row = {"slab": name, "adsorbate": ads}
            for label, calc in calcs.items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "not converged" is reported in the table
                    res = adsorption_energy(slab, ads, calc, sites=list(sites))
                best = res.best
                row[label] = best.E_ads_eV
                row[f"{label}_site"] = best.site
                row[f"{label}_converged"] = best.converged
            rows.append(row)
            print(f"{name:6s} {ads:3s} EMT {row['EMT']:+.3f} eV ({row['EMT_site']}), "
                  f"EST {row['EST']:+.3f} eV ({row['EST_site']})", flush=True)
    return rows


def main(argv=None) -> int:
    import numpy as np

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("potential", nargs="?", default="default")
    p.add_argument("--quick", action="store_true", help="Cu(111) with O and CO only")
    args = p.parse_args(argv)
    slabs = {"Cu111": SLABS["Cu111"]} if args.quick else SLABS
    adsorbates = ("O", "CO") if args.quick else ADSORBATES
    t0 = time.perf_counter()
    rows = run(args.potential, slabs, adsorbates)
    print("\n| slab | adsorbate | E_ads EMT (eV) | E_ads EST (eV) | EST - EMT (eV) | sites (EMT / EST) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        flag = "" if r["EMT_converged"] and r["EST_converged"] else " (not converged)"
        print(f"| {r['slab']} | {r['adsorbate']} | {r['EMT']:+.3f} | {r['EST']:+.3f} | "
              f"{r['EST'] - r['EMT']:+.3f}{flag} | {r['EMT_site']} / {r['EST_site']} |")
    diff = np.array([r["EST"] - r["EMT"] for r in rows])
    same = sum(r["EMT_site"] == r["EST_site"] for r in rows)
    print(f"\nMAE {np.abs(diff).mean():.3f} eV, max |diff| {np.abs(diff).max():.3f} eV over "
          f"{len(rows)} cases; same best site in {same} of {len(rows)}; "
          f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
