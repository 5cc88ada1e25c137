"""The shipped default potential: pinned file and values (golden test), and agreement with its
teacher on EMT frames it never saw.

The golden values live in ``golden_default_potential.json`` beside this file, written by
``python tests/physics/test_default_potential.py --write`` from the shipped file: its sha256 and,
for a few fixed structures, float64 energies, forces and stress. A change of the file, or of any
model code that changes what the file computes, fails here; if the change is intended, rerun the
command above and say why in the commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from golden_checks import assert_golden_values, assert_pinned_file, sha256

GOLDEN = Path(__file__).with_name("golden_default_potential.json")
ROOT = Path(__file__).resolve().parents[2]


def golden_structures() -> dict:
    """Fixed, seeded structures: a CO/Cu(111) slab, strained Pt bulk, an Au-Pd(100) slab with OH,
    and a gas-phase H2O."""
    from ase import Atoms
    from ase.build import add_adsorbate, bulk, fcc100, fcc111, molecule

    out = {}
    slab = fcc111("Cu", (2, 2, 3), vacuum=6.0)
    add_adsorbate(slab, Atoms("CO", positions=[[0, 0, 0], [0, 0, 1.15]]), 1.9, "ontop")  # C down
    slab.rattle(0.05, seed=1)
    out["CO/Cu(111)"] = slab
    pt = bulk("Pt", "fcc", a=3.95, cubic=True)
    pt.set_cell(pt.cell.array @ np.array([[1.0, 0.02, 0.0], [0.0, 0.99, 0.01], [0.0, 0.0, 1.01]]),
                scale_atoms=True)
    pt.rattle(0.05, seed=2)
    out["Pt bulk, strained"] = pt
    alloy = fcc100("Au", (2, 2, 3), vacuum=6.0, a=4.0)
    alloy.numbers[[1, 2, 6, 9]] = 46
    add_adsorbate(alloy, Atoms("OH", positions=[[0, 0, 0], [0, 0, 0.97]]), 1.5, "hollow")
    alloy.rattle(0.05, seed=3)
    out["OH/AuPd(100)"] = alloy
    out["H2O"] = molecule("H2O")
    return out


def default_path() -> Path:
    from est_calc.potential import _resolve

    return Path(_resolve("default"))


def evaluate(path: Path) -> dict:
    from est_calc.calculator import ESTCalculator

    calc = ESTCalculator(str(path), device="cpu", dtype="float64")
    values = {}
    for name, atoms in golden_structures().items():
        atoms.calc = calc
        entry = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces().tolist()}
        if atoms.pbc.any():
            entry["stress"] = atoms.get_stress().tolist()
        values[name] = entry
    return values


def write_golden() -> None:
    path = default_path()
    GOLDEN.write_text(json.dumps({"file": path.name, "sha256": sha256(path),
                                  "values": evaluate(path)}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


def test_shipped_file_is_the_pinned_one(golden):
    assert_pinned_file(default_path(), golden, Path(__file__), ROOT)


def test_golden_energies_forces_and_stress(golden):
    assert_golden_values(evaluate(default_path()), golden)


def test_calculator_without_arguments_loads_the_default():
    from est_calc.calculator import ESTCalculator
    from est_calc.potential import load_potential

    calc = ESTCalculator(device="cpu")
    ref = load_potential(str(default_path()))
    assert calc.potential.config == ref.config
    assert calc.potential.species == ref.species
    meta = calc.potential.metadata
    assert "EMT" in meta.get("teacher", ""), "the card and metadata must name the teacher"


def test_default_potential_replaces_emt_on_unseen_frames(tmp_path):
    """Fresh EMT frames (a seed no data set of the card used): the potential's force and energy
    errors stay within twice what its model card reports for the validation set. An untrained
    or broken model is ~10x further off."""
    from ase.calculators.emt import EMT

    from est_calc.calculator import ESTCalculator
    from est_calc.training.datasets import open_dataset
    from est_calc.training.synthetic import generate

    calc = ESTCalculator(device="cpu", dtype="float64")
    val = calc.potential.metadata["val_metrics"]
    generate(tmp_path, n_systems=3, seed=2024, frames_per_system=4, include_bulk=False,
             include_gas=False, formats=("hdf5",), progress=False)
    frames = open_dataset(tmp_path / "synthetic.h5")
    f_err, e_err = [], []
    for k in range(len(frames)):
        frame = frames[k]
        atoms = frame.to_atoms()
        ref = atoms.copy()
        ref.calc = EMT()
        atoms.calc = calc
        free = ~np.asarray(frame.fixed, dtype=bool)  # OC20 convention: forces of free atoms
        f_err.append(np.abs(atoms.get_forces() - ref.get_forces())[free].ravel())
        e_err.append(abs(atoms.get_potential_energy() - ref.get_potential_energy()) / len(atoms))
    force_mae, energy_mae = float(np.concatenate(f_err).mean()), float(np.mean(e_err))
    print(f"unseen EMT frames: force MAE {force_mae:.4f} eV/Å, energy MAE {energy_mae:.4f} eV/atom")
    assert force_mae < 2.0 * val["forces_mae"] + 0.01
    assert energy_mae < 2.0 * val["energy_per_atom_mae"] + 0.005


@pytest.mark.slow
def test_default_potential_nve_conserves_energy():
    """0.5 ps NVE (float64, 1 fs) of a relaxed CO/Cu(111) slab started at 300 K with the trained
    potential: the total energy is conserved while energy really flows between kinetic and
    potential. (No chemistry is asserted: the teacher, EMT, does not hold CO together on
    Cu(111) - started unrelaxed at 600 K it dissociates CO and heats to ~8000 K - and the
    potential follows its teacher.)"""
    from ase import Atoms
    from ase.build import add_adsorbate, fcc111
    from ase.constraints import FixAtoms

    from est_calc.calculator import ESTCalculator
    from md_recipes import relax, run_md

    slab = fcc111("Cu", size=(3, 3, 3), vacuum=8.0)
    add_adsorbate(slab, Atoms("CO", positions=[[0, 0, 0], [0, 0, 1.15]]), 1.9, "ontop")  # C down
    slab.set_constraint(FixAtoms(indices=[a.index for a in slab if a.tag == 3]))
    calc = ESTCalculator(device="cpu", dtype="float64", skin=1.0)
    slab = relax(slab, calc, fmax_eV_per_A=0.05, max_steps=300).atoms
    res = run_md(slab, calc, ensemble="nve", temperature_K=300.0, timestep_fs=1.0, n_steps=500,
                 seed=2, log_every=5, progress=False)
    etot, n = np.asarray(res.etot), len(slab)
    spread = (etot.max() - etot.min()) / n
    ekin_range = (np.max(res.ekin) - np.min(res.ekin)) / n
    print(f"default potential NVE: Etot spread {1e3 * spread:.4f} meV/atom, Ekin range "
          f"{1e3 * ekin_range:.2f} meV/atom")
    assert np.isfinite(etot).all()
    assert spread < 1e-3 and ekin_range > 10 * spread


if __name__ == "__main__":
    if "--write" in sys.argv:
        write_golden()
    else:
        print(__doc__)
