"""Langevin NVT of bulk Cu, continued from its checkpoint, with a log, trajectory and plot.

Run:  python examples/run_md.py [--calc est|emt|PATH] [--steps 400]

The first call runs half the steps and stops; the second continues from ``md_restart.npz``
exactly as if it had never stopped (delete the file to start over).
"""

import argparse

import numpy as np
from ase.build import bulk

from md_recipes import run_md

try:
    from relax_slab import pick_calculator
except ImportError:  # run from elsewhere
    from examples.relax_slab import pick_calculator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calc", default="est")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("-T", "--temperature", type=float, default=500.0)
    args = parser.parse_args()
    calc = pick_calculator(args.calc)

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (3, 3, 3)
    common = dict(ensemble="nvt-langevin", temperature_K=args.temperature, timestep_fs=2.0,
                  friction_per_fs=0.02, seed=1, log_every=10, restart="md_restart.npz",
                  trajectory="md.traj", logfile="md.log")
    run_md(atoms, calc, n_steps=args.steps // 2, **common)  # "interrupted" here
    res = run_md(atoms, calc, n_steps=args.steps, plot="md.png", **common)  # continued
    half = res.temperature[len(res.temperature) // 2:]
    print(f"<T> over the last quarter: {np.mean(half):.1f} K (target {args.temperature} K)")
    print("wrote md.traj, md.log, md.png and md_restart.npz")


if __name__ == "__main__":
    main()
