"""benchmarks/accuracy.py at toy size (EST side; CI has no MACE env): the split keeps the
held-out frames out of training, every evaluation set gets energy and force errors that agree
with a direct evaluation, the scans and the learning curve are written."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import accuracy  # noqa: E402

needs_data = pytest.mark.skipif(not (accuracy.DEFAULT_DATA / "ethanol").is_dir(),
                                reason="shared real-DFT data missing")


@needs_data
def test_accuracy_quick_ethanol(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(accuracy, "have_mace", lambda: False)
    out = tmp_path / "acc"
    assert accuracy.main(["--quick", "--dataset", "ethanol", "--out", str(out), "--export"]) == 0
    text = capsys.readouterr().out
    assert "MACE peer env unavailable" in text
    split = json.loads((out / "split.json").read_text())
    assert split["n_train"] == 20 and split["n_val"] == 6
    from ase.io import read

    train_e = {round(a.get_potential_energy(), 6) for a in read(out / "train.xyz", ":")}
    for label, s in split["evals"].items():
        frames = read(out / s["file"], ":")
        assert len(frames) == s["n"]
        assert not any(a.pbc.any() for a in frames)
        assert not train_e & {round(a.get_potential_energy(), 6) for a in frames}
    report = json.loads((out / "report.json").read_text())
    assert set(report["sets"]) == set(split["evals"])
    assert "forces_rmse_meV_A" not in report["sets"]["H removal (energies)"]["EST"]
    assert report["sets"]["MD test (rMD17)"]["EST"]["forces_rmse_meV_A"] > 0
    # The table's numbers are those of a direct evaluation.
    rows = accuracy._est_predict(str(out / "est" / "potential.pt"),
                                 str(out / split["evals"]["50 held out"]["file"]), "float32")
    de = np.array([p - r for r, _, p, _, _ in rows])
    assert report["sets"]["50 held out"]["EST"]["energy_rmse_meV"] == pytest.approx(
        1000 * np.sqrt(np.mean(de**2)))
    assert (out / "learning_curve.png").stat().st_size > 0
    assert (out / "scans.png").stat().st_size > 0
    assert report["curves"]["EST"] and report["models"]["EST"]["ms_box"] > 0
    assert "| EST |" in (out / "report.md").read_text()
    # The exported package is timed beside the eager potential and computes the same thing.
    pkg = report["models"]["EST .pt2"]
    assert pkg["ms_molecule"] > 0 and pkg["ms_box"] > 0 and pkg["params"] == \
        report["models"]["EST"]["params"]
    assert pkg["export"]["max_deviation"] < 1e-4
    direct = accuracy._est_predict(pkg["export"]["path"],
                                   str(out / split["evals"]["50 held out"]["file"]), "float32")
    for (_, _, e1, f1, _), (_, _, e2, f2, _) in zip(rows, direct):
        assert e2 == pytest.approx(e1, abs=1e-4) and np.abs(f2 - f1).max() < 1e-4
    assert "| EST .pt2 |" in (out / "report.md").read_text()
    # The uncertainty stage: a latent part fitted for a copy of the potential, flag shares and
    # rank correlations on every evaluation set.
    unc = json.loads((out / "uncertainty.json").read_text())
    assert set(unc["thresholds"]) == {"max", "rms"}
    assert set(split["evals"]) <= set(unc["sets"])
    for row in unc["sets"].values():
        assert 0.0 <= row["flagged_max"] <= row["flagged_either"] <= 1.0
    assert (out / "est_uncertainty" / "potential.uncertainty").is_file()
    assert "## EST's latent uncertainty" in text


def test_report_table_has_both_ratios_to_mace():
    models = {"EST": {"params": 10, "training_minutes": 1.0, "ms_molecule": 10.0, "ms_box": 100.0},
              "EST .pt2": {"params": 10, "training_minutes": 1.0, "ms_molecule": 4.0,
                           "ms_box": 150.0},
              "MACE": {"params": 20, "training_minutes": 1.0, "ms_molecule": 30.0,
                       "ms_box": 900.0}}
    sets = {"held out": {"EST": {"n": 5, "energy_rmse_meV": 1.0, "energy_mae_meV": 0.5,
                                 "forces_rmse_meV_A": 10.0, "forces_mae_meV_A": 8.0},
                         "MACE": {"n": 5, "energy_rmse_meV": 2.0, "energy_mae_meV": 1.5,
                                  "forces_rmse_meV_A": 20.0, "forces_mae_meV_A": 18.0}}}
    text = accuracy.format_report({"dataset": "x", "budget_min": 1, "cores": None, "share": 1,
                                   "threads": 1, "dtype": "float32", "sets": sets,
                                   "models": models, "molecule_atoms": 9, "box_atoms": 999})
    # the package has no error columns (its errors are EST's), only its speed row
    assert "| held out | 5 | 1.0 / 0.5 | 10.0 / 8.0 | 2.0 / 1.5 | 20.0 / 18.0 |" in text
    assert "EST .pt2 E RMSE" not in text
    assert "| MACE / EST |  |  | 3.00x | 9.00x |" in text
    assert "| MACE / EST .pt2 |  |  | 7.50x | 6.00x |" in text


def test_molecule_box_has_no_close_contacts():
    from ase.build import molecule
    from ase.neighborlist import neighbor_list

    mol = molecule("CH3CH2OH")
    box = accuracy.molecule_box(mol, n_atoms=180, density_g_cm3=0.6)
    assert len(box) == 180 and box.pbc.all()
    i, j, d = neighbor_list("ijd", box, 2.0)
    # only bonds within one molecule are shorter than 2 Å
    assert (i // len(mol) == j // len(mol)).all()


@needs_data
def test_molecule_example_config_trains_on_the_benchmark_split(tmp_path, monkeypatch, capsys):
    """examples/train_molecule.yaml points at the files the benchmark's split writes and trains
    as documented (the isolated-atom file where this checkout's shared data lies)."""
    from est_calc.cli import main as est

    monkeypatch.chdir(tmp_path)
    assert accuracy.main(["--quick", "--dataset", "3bpa", "--stage", "split",
                          "--out", "runs/accuracy/3bpa"]) == 0
    iso = accuracy.DEFAULT_DATA / "3bpa" / "iso_atoms.xyz"
    assert est(["train", str(ROOT / "examples" / "train_molecule.yaml"),
                "--set", "train.max_steps=2", "--set", "train.eval_every=1",
                "--set", "model.preset=tiny", "--set", f"data.isolated_atoms={iso}",
                # compiling takes minutes (tests/training/test_compiled_step.py checks it)
                "--set", "train.compile=false",
                "--set", f"output_dir={tmp_path / 'run'}"]) == 0
    assert (tmp_path / "run" / "potential.pt").is_file()
    assert "steps/s" in capsys.readouterr().out


def test_stale_package_is_exported_again(tmp_path, monkeypatch):
    """A package newer than the potential is reused only when this est_calc reads it: one of an
    older format version (or not a package at all) is exported again, not loaded and refused
    in the middle of the report."""
    from est_calc import deploy

    potential = tmp_path / "potential.pt"
    potential.write_bytes(b"x")
    stale = tmp_path / "est.pt2"
    stale.write_bytes(b"not a package")
    os.utime(potential, (0, 0))  # the package is the newer file
    calls = []

    class Result:
        trace_s, compile_s, max_deviation = 1.0, 2.0, 0.0

    def fake_export(source, path, **kwargs):
        calls.append((source, Path(path)))
        return Result()

    monkeypatch.setattr(deploy, "export_potential", fake_export)
    got = accuracy._export_package(potential, tmp_path)
    assert calls == [(str(potential), stale)] and "reused" not in got
