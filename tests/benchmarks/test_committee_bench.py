"""benchmarks/committee.py on a toy split: the committee mean's errors are those of the members'
mean prediction, the flag thresholds are the validation frames' 95 % values, sets that mix
molecules get a row per formula, and bad arguments exit non-zero with one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _labelled(name: str, seed: int):
    atoms = molecule(name)
    atoms.center(vacuum=6.0)
    atoms.rattle(0.05, seed=seed)
    atoms.calc = EMT()
    e, f = atoms.get_potential_energy(), atoms.get_forces()
    atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f)
    return atoms


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from est_calc.model import ModelConfig
    from est_calc.potential import Potential, save_potential

    root = tmp_path_factory.mktemp("committee")
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        pot = Potential.from_config(ModelConfig.preset("tiny"), species=(1, 6, 8)).eval()
        members.append(save_potential(pot, root / f"member{seed}.pt"))
    write(root / "train.xyz", [_labelled("CH3CH2OH", s) for s in range(12)])
    write(root / "valid.xyz", [_labelled("CH3CH2OH", s) for s in range(100, 110)])
    write(root / "eval_mixed.xyz", [_labelled(n, s) for s in range(200, 204)
                                    for n in ("CH3CH2OH", "CH3OH")])
    energy_only = [_labelled("CH3OH", s) for s in range(300, 304)]
    for atoms in energy_only:
        atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy())
    write(root / "eval_energies.xyz", energy_only)
    (root / "split.json").write_text(json.dumps({"evals": {
        "mixed": {"file": "eval_mixed.xyz"}, "energies": {"file": "eval_energies.xyz"}}}))
    return root, members


def test_committee_report_matches_its_members(work, tmp_path):
    import committee

    from est_calc import ESTCalculator
    from est_calc.training.uncertainty import flag_thresholds

    root, members = work
    report = tmp_path / "committee.md"
    assert committee.main(["--work", str(root), "--members", *map(str, members), "--latent",
                           "--report", str(report)]) == 0
    result = json.loads(report.with_suffix(".json").read_text())
    text = report.read_text()
    for row in ("| mixed |", "| mixed: C2H6O |", "| mixed: CH4O |", "| energies |"):
        assert row in text, row
    assert "latent (member 1)" in text and "committee" in text

    # The committee mean's force RMSE is that of the members' mean forces.
    from ase.io import read

    frames = read(root / "eval_mixed.xyz", ":")
    singles = [ESTCalculator(model=str(m), device="cpu") for m in members]
    diffs = []
    for atoms in frames:
        mean = np.mean([_forces(atoms, c) for c in singles], axis=0)
        diffs.append(mean - atoms.get_forces())
    expected = 1000 * np.sqrt(np.mean(np.concatenate(diffs) ** 2))
    assert result["sets"]["mixed"]["committee mean"][1] == pytest.approx(expected, rel=1e-4)
    assert len(result["sets"]["mixed"]["members"]) == 3
    # Committees of two: the mean over the three pairs of their mean's RMSE.
    per_member = [[_forces(atoms, c) - atoms.get_forces() for atoms in frames] for c in singles]
    pairs = [1000 * np.sqrt(np.mean(np.concatenate(
        [(a + b) / 2 for a, b in zip(per_member[i], per_member[j])]) ** 2))
        for i, j in ((0, 1), (0, 2), (1, 2))]
    assert result["sets"]["mixed"]["subsets"]["2"][1] == pytest.approx(np.mean(pairs), rel=1e-4)
    assert "committees of 2 (mean)" in text

    # Thresholds: the committee's stds on the validation frames, 95 % under each.
    calc = ESTCalculator(model=[str(m) for m in members], device="cpu", uncertainty=True)
    stds = [_std(atoms, calc) for atoms in read(root / "valid.xyz", ":")]
    frame = np.repeat(np.arange(len(stds)), [len(s) for s in stds])
    th = flag_thresholds(np.concatenate(stds), frame)
    assert result["thresholds"]["committee"] == pytest.approx(th, rel=1e-5)
    for name, entry in result["sets"].items():
        for est in ("committee", "latent (member 1)"):
            assert 0.0 <= entry[est]["flagged_max"] <= entry[est]["flagged_either"] <= 100.0
            assert entry[est]["flagged_rms"] <= entry[est]["flagged_either"], name


def _forces(atoms, calc):
    work = atoms.copy()
    work.calc = calc
    return work.get_forces()


def _std(atoms, calc):
    work = atoms.copy()
    work.calc = calc
    work.get_forces()
    return np.asarray(calc.results["forces_std"])


@pytest.mark.parametrize("args, message", [
    (["--members", "a.pt", "b.pt"], "missing"),
    (["--members", "ONE"], "at least two"),
])
def test_committee_refuses_missing_files_and_a_committee_of_one(work, args, message):
    root, members = work
    args = [str(members[0]) if a == "ONE" else a for a in args]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "committee.py"), "--work",
                           str(root), *args], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
