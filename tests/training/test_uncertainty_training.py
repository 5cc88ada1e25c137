"""`est train --committee K` and `est train --uncertainty`: one command trains either form of the
uncertainty, and the config section is checked like every other."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import read

from est_calc.calculator import ESTCalculator
from est_calc.cli import main
from est_calc.training.config import load_config
from est_calc.training.datasets import frame_from_atoms, write_extxyz_with_sidecar
from est_calc.uncertainty import frame_statistics


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    d = tmp_path_factory.mktemp("unc-train")
    frames = []
    for k in range(4):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.rattle(0.05, seed=k)
        atoms.calc = EMT()
        atoms.get_potential_energy()
        frames.append(frame_from_atoms(atoms, sid=k, fid=0))
    write_extxyz_with_sidecar(frames, d / "train.extxyz")

    def make(tmp_path, **extra):
        cfg = {"output_dir": str(tmp_path / "run"),
               "data": {"train": str(d / "train.extxyz"), "val": str(d / "train.extxyz")},
               "model": {"preset": "tiny"},
               "train": {"max_steps": 1, "batch_size": 2, "eval_every": 1,
                         "checkpoint_every": 1, "device": "cpu", "progress": False}, **extra}
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return make


def _forces_std(calc) -> np.ndarray:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 1, 1)
    atoms.rattle(0.05, seed=7)
    atoms.calc = calc
    atoms.get_forces()
    return calc.results["forces_std"]


def test_train_committee_in_one_command(config, tmp_path, capsys):
    assert main(["train", str(config(tmp_path)), "--committee", "2"]) == 0
    out = capsys.readouterr().out
    paths = [tmp_path / "run" / f"member{k}" / "potential.pt" for k in range(2)]
    assert all(p.exists() for p in paths) and "committee: ESTCalculator(model=[" in out
    std = _forces_std(ESTCalculator([str(p) for p in paths], device="cpu", uncertainty=True))
    assert std.shape == (8,) and np.all(std > 0)  # different seeds, different members
    # The committee's flag thresholds, fitted on data.val: the 95th percentiles over its frames
    # of each frame's largest and RMS forces_std, as the calculator gives them one by one.
    assert "committee: 95 % in-distribution flag thresholds" in out
    assert (paths[0].parent / "potential.committee").is_file()
    calc = ESTCalculator([str(p) for p in reversed(paths)], device="cpu", uncertainty=True)
    val = read(yaml.safe_load(config(tmp_path).read_text())["data"]["val"], ":")
    largest, rms = [], []
    for atoms in val:
        atoms.calc = calc
        atoms.get_forces()
        (m,), (r,) = frame_statistics(calc.results["forces_std"])
        largest.append(m)
        rms.append(r)
    assert calc.committee_thresholds == pytest.approx(
        {"max": np.quantile(largest, 0.95), "rms": np.quantile(rms, 0.95)}, rel=1e-4)


def test_train_latent_uncertainty_in_one_command(config, tmp_path, capsys):
    assert main(["train", str(config(tmp_path)), "--uncertainty"]) == 0
    out = capsys.readouterr().out
    assert "uncertainty: latent distance fitted" in out and "the recipes' 'auto'" in out
    run = tmp_path / "run"
    assert (run / "potential.uncertainty").exists()
    calc = ESTCalculator(str(run / "potential.pt"), device="cpu", uncertainty=True)
    part = calc.potential.uncertainty
    assert part.pool_radius == calc.potential.cutoff_A and part.self_weight == 4.0
    # The flag thresholds are the 95th percentiles, over the calibration frames (here data.val),
    # of each frame's largest forces_std and of its RMS: what the calculator gives on them.
    from ase.io import read

    stds = []
    cfg = yaml.safe_load((tmp_path / "c.yaml").read_text())
    for atoms in read(cfg["data"]["val"], ":"):
        atoms.calc = calc
        atoms.get_forces()
        stds.append(np.asarray(calc.results["forces_std"], dtype=float))
    want_max = np.quantile([s.max() for s in stds], 0.95)
    want_rms = np.quantile([np.sqrt(np.mean(s ** 2)) for s in stds], 0.95)
    assert part.thresholds["max"] == pytest.approx(want_max, rel=1e-4)
    assert part.thresholds["rms"] == pytest.approx(want_rms, rel=1e-4)


def test_latent_pooling_from_the_config(config, tmp_path, capsys):
    path = config(tmp_path)
    assert main(["train", str(path), "--uncertainty", "--set", "uncertainty.pool_radius=2.5",
                 "--set", "uncertainty.self_weight=2"]) == 0
    calc = ESTCalculator(str(tmp_path / "run" / "potential.pt"), device="cpu", uncertainty=True)
    part = calc.potential.uncertainty
    assert (part.pool_radius, part.self_weight) == (2.5, 2.0)
    std = _forces_std(calc)
    assert std.shape == (8,) and np.all(np.isfinite(std))


@pytest.mark.parametrize("override, match", [
    ("uncertainty.kind=bayes", "uncertainty.kind"),
    ("uncertainty.committee_size=1", "uncertainty.committee_size"),
    ("uncertainty.n_reference=0", "uncertainty.n_reference"),
    ("uncertainty.typo=1", "unknown config keys at uncertainty"),
    ("uncertainty.pool_radius=-1", "uncertainty.pool_radius"),
    ("uncertainty.self_weight=0", "uncertainty.self_weight"),
])
def test_bad_uncertainty_config(config, tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        load_config(config(tmp_path), [override]).validate()


def test_latent_needs_calibration_frames(config, tmp_path, capsys):
    path = config(tmp_path)
    raw = yaml.safe_load(path.read_text())
    del raw["data"]["val"]
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path), "--uncertainty"]) == 2
    assert "needs held-out frames to calibrate on" in capsys.readouterr().err


def test_spearman_is_nan_where_no_ranking_exists():
    import warnings

    import numpy as np

    from est_calc.training.uncertainty import spearman

    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 9.0])) == 1.0
    assert spearman(np.array([3.0, 2.0, 1.0]), np.array([1.0, 3.0, 9.0])) == -1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConstantInputWarning
        assert np.isnan(spearman(np.ones(4), np.arange(4.0)))
        assert np.isnan(spearman(np.arange(4.0), np.zeros(4)))
        assert np.isnan(spearman(np.ones(1), np.ones(1)))


def test_fit_uncertainty_of_an_existing_potential(config, tmp_path, capsys):
    """`est fit-uncertainty` gives a trained potential file the part `est train --uncertainty`
    would have fitted; it refuses to replace a sidecar without --overwrite and names a missing
    file, each in one line with a non-zero exit."""
    assert main(["train", str(config(tmp_path))]) == 0
    run = tmp_path / "run"
    assert not (run / "potential.uncertainty").exists()
    data = yaml.safe_load((tmp_path / "c.yaml").read_text())["data"]
    argv = ["fit-uncertainty", str(run / "potential.pt"), "--reference", data["train"],
            "--calibration", data["val"]]
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "uncertainty: latent distance fitted" in out and "uncertainty=True" in out
    part = ESTCalculator(str(run / "potential.pt"), device="cpu", uncertainty=True
                         ).potential.uncertainty
    assert set(part.thresholds) == {"max", "rms"}
    assert np.all(_forces_std(ESTCalculator(str(run / "potential.pt"), device="cpu",
                                            uncertainty=True)) > 0)
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass --overwrite" in err[0]
    assert main([*argv, "--overwrite"]) == 0
    assert main(["fit-uncertainty", str(tmp_path / "none.pt"), "--reference", data["train"],
                 "--calibration", data["val"]]) != 0
    assert "not found" in capsys.readouterr().err
    water = bulk("Cu", "fcc", a=3.6, cubic=True)
    water.numbers[0] = 8  # an element the potential was not trained on
    water.calc = EMT()
    water.get_potential_energy()
    write_extxyz_with_sidecar([frame_from_atoms(water, sid=0, fid=0)], tmp_path / "o.extxyz")
    assert main([*argv[:4], "--calibration", str(tmp_path / "o.extxyz"), "--overwrite"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "O" in err[0]


def test_committee_thresholds_are_bound_to_their_members(config, tmp_path, capsys):
    """`est fit-uncertainty A.pt B.pt --calibration` writes a committee's thresholds beside A;
    the calculator uses them for exactly those members (in any order), not for another set,
    a changed member file or an unreadable file; refusals are one line with a non-zero exit."""
    import shutil

    import torch

    from est_calc.potential import load_potential, save_potential
    from est_calc.uncertainty import committee_sidecar_path

    assert main(["train", str(config(tmp_path)), "--committee", "3",
                 "--set", "data.val=null"]) == 0
    run = tmp_path / "run"
    paths = [run / f"member{k}" / "potential.pt" for k in range(3)]
    assert not committee_sidecar_path(paths[0]).exists()   # no calibration data: no thresholds
    val = yaml.safe_load((tmp_path / "c.yaml").read_text())["data"]["train"]
    pair = [str(paths[0]), str(paths[1])]
    capsys.readouterr()
    assert main(["fit-uncertainty", *pair, "--calibration", val]) == 0
    assert "uncertainty=True" in capsys.readouterr().out
    stored = ESTCalculator(pair, device="cpu").committee_thresholds
    assert set(stored) == {"max", "rms"} and all(v > 0 for v in stored.values())
    assert ESTCalculator(pair[::-1], device="cpu").committee_thresholds == stored
    assert ESTCalculator([*pair, str(paths[2])], device="cpu").committee_thresholds == {}
    assert ESTCalculator([load_potential(p) for p in pair], device="cpu"
                         ).committee_thresholds == {}
    # A member file changed after the fit: the thresholds are not used.
    changed = tmp_path / "changed" / "potential.pt"
    changed.parent.mkdir()
    shutil.copyfile(paths[0], changed)
    shutil.copyfile(committee_sidecar_path(paths[0]), committee_sidecar_path(changed))
    assert ESTCalculator([str(changed), pair[1]], device="cpu").committee_thresholds == stored
    pot = load_potential(str(changed))
    with torch.no_grad():
        next(pot.model.parameters()).add_(0.01)
    save_potential(pot, changed)
    assert ESTCalculator([str(changed), pair[1]], device="cpu").committee_thresholds == {}
    committee_sidecar_path(changed).write_text("{not json")
    assert ESTCalculator([str(changed), pair[1]], device="cpu").committee_thresholds == {}
    # Refusals.
    for argv, message in (
            (["fit-uncertainty", *pair, "--calibration", val], "pass --overwrite"),
            (["fit-uncertainty", *pair, "--calibration", val, "--reference", val],
             "--reference is for one potential"),
            (["fit-uncertainty", pair[0], "--calibration", val], "--reference"),
            (["fit-uncertainty", pair[0], str(tmp_path / "none.pt"), "--calibration", val],
             "not found")):
        assert main(argv) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
    assert main(["fit-uncertainty", *pair, "--calibration", val, "--overwrite"]) == 0

    # est md with a committee (--calc A.pt,B.pt) and 'auto' thresholds: the committee's own.
    from ase.io import write

    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    cu.rattle(0.05, seed=3)
    write(tmp_path / "cu.xyz", cu)

    def md(calc, *extra):
        return main(["md", str(tmp_path / "cu.xyz"), "--calc", calc, "--steps", "2",
                     "--no-progress", "--device", "cpu", "-o", str(tmp_path / "md.traj"),
                     "--uncertain-frames", str(tmp_path / "u.extxyz"), *extra])

    capsys.readouterr()
    assert md(",".join(pair), "--uncertainty-threshold", "auto",
              "--uncertainty-rms-threshold", "auto") == 0
    assert (f"above max {stored['max']:g} or RMS {stored['rms']:g} eV/Å"
            in capsys.readouterr().out)
    for calc, message in ((",".join([*pair, str(paths[2])]),
                           "needs the committee's fitted thresholds"),
                          (f"{pair[0]},{tmp_path / 'none.pt'}", "does not exist")):
        assert md(calc, "--uncertainty-threshold", "auto") != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
