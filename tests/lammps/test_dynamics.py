"""minimize in LAMMPS reaches md_recipes.relax's energy, and NVE in LAMMPS follows the ASE
velocity-Verlet trajectory (same start, same step) and conserves energy as it does."""

from __future__ import annotations

import numpy as np
import pytest
from ase import units
from ase.build import bulk
from lammps_cases import header, lower_triangular, run_lmp, structures, write_data

pytestmark = pytest.mark.lammps


def test_minimize_matches_relax(package, tmp_path):
    from est_calc.calculator import ESTCalculator
    from md_recipes.relax import relax

    # Four atoms: the untrained potential is soft, so minimisers take hundreds of steps.
    atoms = lower_triangular(bulk("Cu", "fcc", a=3.62, cubic=True))
    atoms.numbers[3] = 8
    atoms.rattle(0.03, seed=3)
    write_data(atoms, tmp_path / "data.lmp")
    run_lmp(header(atoms, package, tmp_path / "data.lmp") + """min_style cg
minimize 0.0 1.0e-5 2000 20000
print "RESULT $(pe:%.17g) $(fmax:%.17g)" file result.txt
""", tmp_path)
    energy, fmax = (float(v) for v in (tmp_path / "result.txt").read_text().split()[1:])
    assert fmax < 1e-4

    result = relax(atoms, ESTCalculator(model=str(package), dtype="float64"),
                   fmax_eV_per_A=1e-5, max_steps=2000, optimizer="BFGS")
    assert result.converged
    # Both stop close to the same minimum: the energies agree to O(|F|^2 / k).
    assert energy == pytest.approx(result.energies[-1], abs=1e-7)


def test_nve_follows_ase(package, tmp_path):
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from ase.md.verlet import VelocityVerlet

    from est_calc.calculator import ESTCalculator

    atoms = structures()["triclinic"]
    MaxwellBoltzmannDistribution(atoms, temperature_K=600, rng=np.random.default_rng(7))
    Stationary(atoms)
    steps, dt_fs = 40, 1.0
    write_data(atoms, tmp_path / "data.lmp",
               velocities_A_per_ps=atoms.get_velocities() * 1000 * units.fs)
    run_lmp(header(atoms, package, tmp_path / "data.lmp") + f"""timestep {dt_fs / 1000}
fix nve all nve
fix out all print 1 "$(step) $(pe:%.17g) $(ke:%.17g)" file nve.txt screen no
thermo 10
run {steps}
""", tmp_path)
    lmp = np.loadtxt(tmp_path / "nve.txt", comments="#")
    lmp_total = lmp[:, 1] + lmp[:, 2]

    atoms.calc = ESTCalculator(model=str(package), dtype="float64")
    ase_pe, ase_total = [], []

    def record():
        ase_pe.append(atoms.get_potential_energy())
        ase_total.append(atoms.get_total_energy())

    dyn = VelocityVerlet(atoms, timestep=dt_fs * units.fs)
    dyn.attach(record, interval=1)
    dyn.run(steps)
    ase_pe, ase_total = np.array(ase_pe), np.array(ase_total)

    assert len(lmp) == len(ase_pe) == steps + 1
    # The same trajectory (LAMMPS's and ASE's unit constants differ by ~1e-7 relative).
    np.testing.assert_allclose(lmp[:, 1], ase_pe, rtol=0, atol=1e-5)
    # Energy conserved as in ASE: the fluctuations of the total energy agree.
    ase_drift = np.abs(ase_total - ase_total[0]).max()
    lmp_drift = np.abs(lmp_total - lmp_total[0]).max()
    assert lmp_drift <= 1.5 * ase_drift + 1e-5, (lmp_drift, ase_drift)
    assert lmp_drift < 1e-3 * len(atoms), lmp_drift
