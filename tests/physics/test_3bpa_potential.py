"""The shipped est-3bpa potential (trained on 3BPA DFT data): pinned file and values (golden
test), physics (finite-difference forces, rotation invariance, float32 against float64, the
isolated-atom limit) and its model card's held-out error, recomputed here from the shared data.

The golden values live in ``golden_3bpa_potential.json`` beside this file, written by
``python tests/physics/test_3bpa_potential.py --write`` from the shipped file. A change of the
file, or of any model code that changes what it computes, fails here; if the change is
intended, rerun the command and say why in the commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from golden_checks import assert_golden_values, assert_pinned_file, sha256

GOLDEN = Path(__file__).with_name("golden_3bpa_potential.json")
ROOT = Path(__file__).resolve().parents[2]
NAME = "est-3bpa"
# The real DFT sets lie beside the repository (or inside a CI checkout).
DATA = next((p for p in (ROOT.parent / "shared" / "data" / "real_dft" / "3bpa",
                         ROOT / "shared" / "data" / "real_dft" / "3bpa") if p.is_dir()),
            ROOT.parent / "shared" / "data" / "real_dft" / "3bpa")
needs_data = pytest.mark.skipif(not (DATA / "train_300K.xyz").is_file(),
                                reason="shared 3BPA data missing")


def potential_path() -> Path:
    from est_calc.potential import _resolve

    return Path(_resolve(NAME))


def golden_structures() -> dict:
    """Molecules built by ASE (no data needed): ethanol, pyridine (a ring of 3BPA) and acetamide,
    rattled with a seed."""
    from ase.build import molecule

    out = {}
    for name, seed in (("CH3CH2OH", 1), ("C5H5N", 2), ("CH3CONH2", 3)):
        a = molecule(name)
        a.rattle(0.03, seed=seed)
        out[name] = a
    return out


def evaluate(path: Path) -> dict:
    from est_calc.calculator import ESTCalculator

    calc = ESTCalculator(str(path), device="cpu", dtype="float64")
    values = {}
    for name, atoms in golden_structures().items():
        atoms.calc = calc
        values[name] = {"energy": atoms.get_potential_energy(),
                        "forces": atoms.get_forces().tolist()}
    return values


def write_golden() -> None:
    path = potential_path()
    GOLDEN.write_text(json.dumps({"file": path.name,
                                  "sha256": sha256(path),
                                  "values": evaluate(path)}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def calc64():
    from est_calc.calculator import ESTCalculator

    return ESTCalculator(NAME, device="cpu", dtype="float64")


def _frames(n: int):
    from ase.io import read

    return read(DATA / "train_300K.xyz", index=f":{n}")


def test_shipped_file_is_the_pinned_one(golden):
    assert_pinned_file(potential_path(), golden, Path(__file__), ROOT)


def test_golden_energies_and_forces(golden):
    assert_golden_values(evaluate(potential_path()), golden)


def test_loads_by_name_with_its_card(calc64):
    pot = calc64.potential
    assert sorted(pot.species) == [1, 6, 7, 8]
    assert pot.cutoff_A == 5.0
    meta = pot.metadata
    assert meta["name"] == NAME and "3BPA" in meta["data"]
    assert (ROOT / "potentials" / f"{NAME}.md").is_file()


def test_isolated_atoms_have_the_dft_energies(calc64):
    from ase import Atoms
    from ase.io import read

    for ref in read(DATA / "iso_atoms.xyz", index=":") if DATA.is_dir() else []:
        a = Atoms(ref.numbers, positions=[[0, 0, 0]])
        a.calc = calc64
        assert a.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-3)
        assert np.abs(a.get_forces()).max() == 0.0


@needs_data
def test_forces_are_the_energy_gradient_and_rotation_invariant(calc64):
    atoms = _frames(1)[0]
    atoms.calc = calc64
    f = atoms.get_forces()
    e0 = atoms.get_potential_energy()
    rng = np.random.default_rng(0)
    h = 1e-4
    for i in rng.choice(len(atoms), 4, replace=False):
        for c in range(3):
            p = atoms.copy()
            p.calc = calc64
            p.positions[i, c] += h
            ep = p.get_potential_energy()
            p.positions[i, c] -= 2 * h
            em = p.get_potential_energy()
            assert -(ep - em) / (2 * h) == pytest.approx(f[i, c], abs=2e-6)
    from scipy.spatial.transform import Rotation

    # The update blocks sample features on a fixed 32-point sphere grid, so rotations are exact
    # only up to the grid's error (measured on this molecule over 6 rotations: energy <= 1.4
    # meV, forces 2.2-3.0 meV/Å RMS, <= 9.8 meV/Å max; stated on the model card). Twice that
    # bounds it; an equivariance bug is 100x larger.
    for seed in range(3):
        rot = Rotation.random(random_state=seed).as_matrix()
        r = atoms.copy()
        r.positions = atoms.positions @ rot.T
        r.calc = calc64
        assert abs(r.get_potential_energy() - e0) < 3e-3
        df = r.get_forces() - f @ rot.T
        assert np.sqrt(np.mean(df**2)) < 6e-3 and np.abs(df).max() < 2e-2


@needs_data
def test_float32_equals_float64_to_round_off(calc64):
    from est_calc.calculator import ESTCalculator

    calc32 = ESTCalculator(NAME, device="cpu", dtype="float32")
    for atoms in _frames(3):
        a, b = atoms.copy(), atoms.copy()
        a.calc, b.calc = calc64, calc32
        fa, fb = a.get_forces(), b.get_forces()
        assert np.abs(fa - fb).max() < 1e-3 * max(1.0, np.abs(fa).max())
        # total energies near -17,660 eV: float32 spacing there is 2 meV
        assert abs(a.get_potential_energy() - b.get_potential_energy()) < 0.02


@needs_data
def test_held_out_errors_are_those_of_the_card(calc64):
    """The 50 configurations the benchmark held out (benchmarks/accuracy.py split, seed 0):
    the force and energy RMSE recomputed here equal the numbers stored in the file (and shown
    on the model card), so the shipped file is the one the card describes."""
    from ase.io import read

    frames = read(DATA / "train_300K.xyz", index=":")
    order = np.random.default_rng(0).permutation(len(frames))
    held = [frames[i] for i in order[450:500]]
    de, df = [], []
    for atoms in held:
        a = atoms.copy()
        a.calc = calc64
        de.append(a.get_potential_energy() - atoms.get_potential_energy())
        df.append(a.get_forces() - atoms.get_forces())
    e_rmse = 1000 * float(np.sqrt(np.mean(np.square(de))))
    f_rmse = 1000 * float(np.sqrt(np.mean(np.square(np.concatenate(df)))))
    card = calc64.potential.metadata["errors"]["300 K, 50 held out"]
    assert f_rmse == pytest.approx(card["forces_rmse_meV_A"], rel=0.02)
    assert e_rmse == pytest.approx(card["energy_rmse_meV"], rel=0.05, abs=0.5)


@needs_data
def test_uncertainty_part_ships_and_flags_hotter_frames():
    """ESTCalculator("est-3bpa", uncertainty=True) works out of the box: its part was fitted on
    the benchmark's split (`est fit-uncertainty`, training frames as reference, the 50 held-out
    ones as calibration), so about 5 % of those 50 frames are above its stored largest-std
    threshold, and the same frames rattled by 0.1 Å (far hotter than 300 K) get larger stds."""
    from ase.io import read

    from est_calc.calculator import ESTCalculator

    calc = ESTCalculator(NAME, device="cpu", uncertainty=True)
    thresholds = calc.potential.uncertainty.thresholds
    frames = read(DATA / "train_300K.xyz", index=":")
    order = np.random.default_rng(0).permutation(len(frames))
    held = [frames[i] for i in order[450:500]]
    cool, hot = [], []
    for k, atoms in enumerate(held):
        a = atoms.copy()
        a.calc = calc
        a.get_forces()
        cool.append(float(calc.results["forces_std"].max()))
        a.rattle(0.1, seed=k)
        a.get_forces()
        hot.append(float(calc.results["forces_std"].max()))
    above = np.mean(np.array(cool) > thresholds["max"])
    assert 0.02 <= above <= 0.08
    assert np.median(hot) > 1.5 * np.median(cool) and np.mean(np.array(hot) > thresholds["max"]) > 0.5


if __name__ == "__main__":
    if "--write" in sys.argv:
        write_golden()
