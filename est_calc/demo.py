"""`est demo` / `make demo`: relax a CO/Cu(111) slab and run a short MD on it.

With a shipped default potential, the demo uses it. Without one, it says so plainly and runs the
same job with an untrained "small" EST model, which exercises the whole pipeline (neighbour list,
model, autograd forces, ASE optimiser and integrator) but predicts nothing physical.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

__all__ = ["build_co_cu111", "run_demo"]


def build_co_cu111():
    """fcc111 Cu 4x4x4 with 10 Å vacuum, CO on top (66 atoms), bottom two layers fixed."""
    from ase import Atoms
    from ase.build import add_adsorbate, fcc111
    from ase.constraints import FixAtoms

    slab = fcc111("Cu", size=(4, 4, 4), vacuum=10.0)
    co = Atoms("CO", positions=[(0, 0, 0), (0, 0, 1.15)])
    add_adsorbate(slab, co, height=1.9, position="ontop")
    tags = slab.get_tags()
    # fcc111 tags layers 1 (top) .. 4 (bottom); adsorbate atoms come with tag 0.
    fixed = [i for i, t in enumerate(tags) if t >= 3]
    slab.set_constraint(FixAtoms(indices=fixed))
    return slab


def _calculator(device: str):
    from est_calc.calculator import ESTCalculator
    from est_calc.potential import DefaultPotentialMissing, Potential

    try:
        calc = ESTCalculator(device=device, skin=1.0)
        name = calc.potential.metadata.get("name", "default")
        return calc, f"the shipped default potential ({name}, trained on EMT labels)"
    except DefaultPotentialMissing:
        potential = Potential.from_config("small", species=[1, 6, 7, 8, 29])
        return (
            ESTCalculator(potential, device=device, skin=1.0),
            "an UNTRAINED 'small' EST model (no default potential ships yet): the numbers "
            "below exercise the pipeline and mean nothing physically",
        )


def _compare_with_teacher(atoms, calc) -> None:
    """Print EST against its teacher (ASE's EMT) on the relaxed structure, when it was EMT."""
    if "emt" not in str(calc.potential.metadata.get("teacher", "")).lower():
        return
    from ase.calculators.emt import EMT

    probe = atoms.copy()
    probe.calc = EMT()
    e_emt, f_emt = probe.get_potential_energy(), probe.get_forces()
    probe.calc = calc
    e_est, f_est = probe.get_potential_energy(), probe.get_forces()
    print(
        f"check against the teacher (EMT) at the relaxed geometry: E_EST - E_EMT = "
        f"{1000 * (e_est - e_emt) / len(atoms):+.1f} meV/atom, force MAE "
        f"{1000 * np.abs(f_est - f_emt).mean():.0f} meV/Å"
    )


def run_demo(md_steps: int = 100, device: str = "auto", out_dir: str | Path = "demo_output") -> int:
    """Relax CO/Cu(111), then run NVT Langevin MD at 300 K; write files to ``out_dir``."""
    from md_recipes import relax, run_md

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    calc, what = _calculator(device)
    atoms = build_co_cu111()
    atoms.calc = calc
    print(f"est demo: CO/Cu(111), {len(atoms)} atoms, with {what}")
    print(f"device {calc.device}, dtype {calc.dtype}, cutoff {calc.cutoff_A:.2f} Å")

    t0 = time.perf_counter()
    result = relax(
        atoms,
        calc,
        fmax_eV_per_A=0.05,
        max_steps=200,
        optimizer="FIRE",
        trajectory=str(out / "relax.traj"),
        logfile=str(out / "relax.log"),
    )
    t_relax = time.perf_counter() - t0
    status = "converged" if result.converged else "NOT converged"
    print(
        f"relaxation: {status} in {result.steps} steps, E = {result.energies[-1]:.4f} eV "
        f"({t_relax:.1f} s)"
    )

    _compare_with_teacher(result.atoms, calc)

    t0 = time.perf_counter()
    md = run_md(
        result.atoms,
        calc,
        ensemble="nvt-langevin",
        temperature_K=300.0,
        timestep_fs=1.0,
        n_steps=md_steps,
        seed=0,
        trajectory=str(out / "md.traj"),
        logfile=str(out / "md.log"),
        log_every=10,
        plot=str(out / "md.png"),
    )
    t_md = time.perf_counter() - t0
    temps = np.asarray(md.temperature)
    print(
        f"MD: {md_steps} steps of NVT Langevin at 300 K in {t_md:.1f} s "
        f"({md_steps / t_md:.1f} steps/s); mean T over the last half "
        f"{temps[len(temps) // 2 :].mean():.0f} K"
    )
    print(f"files: {out}/relax.traj, relax.log, md.traj, md.log, md.png")
    return 0
