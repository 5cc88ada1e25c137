"""run_md / relax / est md / est relax with an uncertainty threshold: exactly the frames beyond it
are written, and the run records them or stops, as asked."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk, fcc111
from ase.calculators.emt import EMT
from ase.io import read, write

from est_calc.cli import main
from md_recipes import relax, run_md
from md_recipes.uncertain import UncertainStructure

SCALE = 0.1  # forces_std = SCALE * |F_i|: known, deterministic, and it changes along a run


class StdEMT(EMT):
    """EMT with a stand-in per-atom force std (eV/Å)."""

    implemented_properties = [*EMT.implemented_properties, "forces_std"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        kwargs = {} if system_changes is None else {"system_changes": system_changes}
        super().calculate(atoms, properties, **kwargs)
        self.results["forces_std"] = SCALE * np.linalg.norm(self.results["forces"], axis=1)


def _std(atoms) -> np.ndarray:
    atoms = atoms.copy()
    atoms.calc = EMT()
    return SCALE * np.linalg.norm(atoms.get_forces(apply_constraint=False), axis=1)


def _max_std(atoms) -> float:
    return float(_std(atoms).max())


def _rms_std(atoms) -> float:
    return float(np.sqrt(np.mean(_std(atoms) ** 2)))


def _between(values, k: int) -> float:
    """Halfway between the k-th and (k+1)-th smallest value: a threshold no value is near."""
    v = np.sort(values)
    return float(0.5 * (v[k - 1] + v[k]))


@pytest.fixture
def cu():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
    atoms.rattle(0.08, seed=5)
    return atoms


def test_md_records_exactly_the_frames_beyond_the_threshold(cu, tmp_path):
    traj, frames, log = tmp_path / "md.traj", tmp_path / "unc.extxyz", tmp_path / "md.log"
    run_md(cu, StdEMT(), ensemble="nve", temperature_K=600.0, n_steps=12, log_every=1,
           trajectory=str(traj), progress=False)
    # The threshold is set from the run itself: the median of its per-step largest std.
    stds = [_max_std(a) for a in read(traj, ":")]
    threshold = float(np.median(stds))
    res = run_md(cu, StdEMT(), ensemble="nve", temperature_K=600.0, n_steps=12, log_every=1,
                 trajectory=str(traj), logfile=str(log), progress=False,
                 uncertainty_threshold=threshold, uncertain_frames=str(frames))
    want = [step for step, s in enumerate(stds) if s > threshold]
    assert 0 < len(want) < len(stds)
    assert res.uncertain_steps == want
    written = read(frames, ":")
    assert [a.info["step"] for a in written] == want
    for atoms, step in zip(written, want):
        np.testing.assert_allclose(atoms.positions, read(traj, step).positions, atol=1e-6)
        assert atoms.info["max_force_std"] > threshold
        assert atoms.arrays["forces_std"].shape == (len(cu),)
        assert atoms.calc is None  # no model labels in a file meant for relabelling
    lines = [line for line in log.read_text().splitlines() if not line.startswith("#")]
    assert log.read_text().splitlines()[1].endswith("max_Fstd_eV_per_A  rms_Fstd_eV_per_A")
    np.testing.assert_allclose([float(line.split()[-2]) for line in lines], stds, rtol=1e-4)
    np.testing.assert_allclose([float(line.split()[-1]) for line in lines],
                               [_rms_std(a) for a in read(traj, ":")], rtol=1e-4)


def test_md_rms_threshold_alone_and_with_the_max_one(cu, tmp_path):
    """The frame's RMS std has its own threshold; with both, a frame beyond either is written,
    each frame once."""
    traj = tmp_path / "md.traj"
    run_md(cu, StdEMT(), ensemble="nve", temperature_K=600.0, n_steps=12, log_every=1,
           trajectory=str(traj), progress=False)
    run = read(traj, ":")
    maxes, rmses = [_max_std(a) for a in run], [_rms_std(a) for a in run]
    rms_threshold = _between(rmses, len(rmses) // 2)
    res = run_md(cu, StdEMT(), ensemble="nve", temperature_K=600.0, n_steps=12, log_every=1,
                 progress=False, uncertainty_rms_threshold=rms_threshold,
                 uncertain_frames=str(tmp_path / "rms.extxyz"))
    want = [k for k, r in enumerate(rmses) if r > rms_threshold]
    assert 0 < len(want) < len(run) and res.uncertain_steps == want
    written = read(tmp_path / "rms.extxyz", ":")
    assert [a.info["step"] for a in written] == want
    assert all(a.info["rms_force_std"] > rms_threshold for a in written)
    # a max threshold that picks a step the RMS one does not: the union is written
    max_threshold = 0.999 * max(maxes[k] for k in range(len(run)) if k not in want)
    res = run_md(cu, StdEMT(), ensemble="nve", temperature_K=600.0, n_steps=12, log_every=1,
                 progress=False, uncertainty_threshold=max_threshold,
                 uncertainty_rms_threshold=rms_threshold)
    union = [k for k in range(len(run)) if maxes[k] > max_threshold or rmses[k] > rms_threshold]
    assert res.uncertain_steps == union
    assert set(union) > set(want)
    with pytest.raises(UncertainStructure, match=r"step 0: RMS per-atom force std .* exceeds "
                                                 r"uncertainty_rms_threshold"):
        run_md(cu, StdEMT(), ensemble="nve", n_steps=3, progress=False,
               uncertainty_threshold=10 * maxes[0], uncertainty_rms_threshold=0.5 * rmses[0],
               on_uncertain="stop")


def test_md_stops_at_the_first_uncertain_step(cu, tmp_path):
    frames, log = tmp_path / "unc.extxyz", tmp_path / "md.log"
    start = _max_std(cu)
    with pytest.raises(UncertainStructure, match=r"step 0: largest per-atom force std") as err:
        run_md(cu, StdEMT(), ensemble="nve", n_steps=5, progress=False, logfile=str(log),
               uncertainty_threshold=0.5 * start, on_uncertain="stop",
               uncertain_frames=str(frames))
    assert err.value.step == 0 and err.value.quantity == "force std"
    assert len(read(frames, ":")) == 1
    assert log.read_text().splitlines()[-1].startswith("# MD stopped at step 0")


def test_relax_records_and_stops(tmp_path):
    slab = fcc111("Cu", (2, 2, 3), vacuum=6.0)
    slab.rattle(0.15, seed=2)
    start = _max_std(slab)
    frames, log = tmp_path / "unc.extxyz", tmp_path / "opt.log"
    res = relax(slab, StdEMT(), fmax_eV_per_A=0.1, max_steps=60, logfile=str(log),
                uncertainty_threshold=0.5 * start, uncertain_frames=str(frames))
    assert res.uncertain_steps and res.uncertain_steps[0] == 0
    assert len(res.uncertain_steps) < res.steps + 1  # forces fall as it relaxes
    assert [a.info["step"] for a in read(frames, ":")] == res.uncertain_steps
    assert log.read_text().count("Uncertainty:") == res.steps + 1
    with pytest.raises(UncertainStructure):
        relax(slab, StdEMT(), uncertainty_threshold=0.5 * start, on_uncertain="stop",
              uncertain_frames=str(tmp_path / "stop.extxyz"))
    assert len(read(tmp_path / "stop.extxyz", ":")) == 1


@pytest.mark.parametrize("threshold, on, match", [
    (0.0, "record", "uncertainty_threshold must be a finite number > 0"),
    (-1.0, "record", "uncertainty_threshold must be"),
    (float("nan"), "record", "uncertainty_threshold must be"),
    (0.1, "maybe", "on_uncertain must be one of"),
])
def test_bad_uncertainty_arguments(cu, threshold, on, match):
    with pytest.raises(ValueError, match=match):
        run_md(cu, StdEMT(), n_steps=2, progress=False, uncertainty_threshold=threshold,
               on_uncertain=on)
    with pytest.raises(ValueError, match=match):
        relax(cu, StdEMT(), uncertainty_threshold=threshold, on_uncertain=on)
    if threshold != 0.1:
        rms_match = match.replace("uncertainty_threshold", "uncertainty_rms_threshold")
        with pytest.raises(ValueError, match=rms_match):
            run_md(cu, StdEMT(), n_steps=2, progress=False, uncertainty_rms_threshold=threshold)
        with pytest.raises(ValueError, match=rms_match):
            relax(cu, StdEMT(), uncertainty_rms_threshold=threshold)


def test_auto_thresholds_are_the_potentials_own(cu, tmp_path):
    """'auto' takes the latent part's stored 95 % in-distribution thresholds; a calculator
    without them is refused, naming the argument."""
    from types import SimpleNamespace

    calc = StdEMT()
    calc.potential = SimpleNamespace(uncertainty=SimpleNamespace(
        thresholds={"max": 0.5 * _max_std(cu), "rms": 10 * _rms_std(cu)}))
    res = run_md(cu, calc, n_steps=0, progress=False, uncertainty_threshold="auto",
                 uncertainty_rms_threshold="auto", logfile=str(tmp_path / "md.log"))
    assert res.uncertain_steps == [0]  # beyond the stored max threshold, not the RMS one
    res = run_md(cu, calc, n_steps=0, progress=False, uncertainty_rms_threshold="AUTO")
    assert res.uncertain_steps == []
    with pytest.raises(ValueError, match="uncertainty_rms_threshold='auto' needs a potential"):
        relax(cu, StdEMT(), uncertainty_rms_threshold="auto")
    with pytest.raises(ValueError, match="uncertainty_threshold must be a finite number > 0"):
        run_md(cu, calc, n_steps=0, progress=False, uncertainty_threshold="sometimes")
    # A committee uses its own fitted thresholds (committee_thresholds), never its first
    # member's latent ones, which do not measure the spread.
    calc.committee = [object(), object()]
    with pytest.raises(ValueError, match="uncertainty_threshold='auto' needs the committee's "
                                         "fitted thresholds"):
        run_md(cu, calc, n_steps=0, progress=False, uncertainty_threshold="auto")
    calc.committee_thresholds = {"max": 10 * _max_std(cu), "rms": 0.5 * _rms_std(cu)}
    res = run_md(cu, calc, n_steps=0, progress=False, uncertainty_threshold="auto",
                 uncertainty_rms_threshold="auto")
    assert res.uncertain_steps == [0]  # beyond the committee's RMS threshold only
    res = run_md(cu, calc, n_steps=0, progress=False, uncertainty_threshold="auto")
    assert res.uncertain_steps == []


def test_cli_auto_threshold_of_the_shipped_potential(cu, tmp_path, capsys):
    from est_calc.calculator import ESTCalculator

    path = tmp_path / "cu.xyz"
    write(path, cu)
    stored = ESTCalculator(device="cpu", uncertainty=True).potential.uncertainty.thresholds
    assert main(_md_argv(path, tmp_path, "--uncertainty-threshold", "auto",
                         "--uncertainty-rms-threshold", "auto")) == 0
    out = capsys.readouterr().out
    assert f"above max {stored['max']:g} or RMS {stored['rms']:g} eV/Å" in out
    with pytest.raises(SystemExit) as exc:
        main(_md_argv(path, tmp_path, "--uncertainty-threshold", "often"))
    assert exc.value.code == 2 and "a number (eV/Å) or 'auto'" in capsys.readouterr().err


def test_threshold_needs_a_calculator_with_forces_std(cu):
    with pytest.raises(ValueError, match="forces_std"):
        run_md(cu, EMT(), n_steps=2, progress=False, uncertainty_threshold=0.1)


def _md_argv(path, tmp_path, *extra):
    return ["md", str(path), "--steps", "3", "--log-every", "1", "--no-progress", "--device",
            "cpu", "-o", str(tmp_path / "md.traj"), *extra]


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_cli_stop_exits_non_zero_in_one_line(cu, tmp_path, capsys):
    path = tmp_path / "cu.xyz"
    write(path, cu)
    frames = tmp_path / "u.extxyz"
    code = main(_md_argv(path, tmp_path, "--uncertainty-threshold", "1e-6", "--on-uncertain",
                         "stop", "--uncertain-frames", str(frames)))
    line = _one_error_line(capsys)
    assert code != 0 and line.startswith("est md: error: MD stopped at step 0")
    assert "force std" in line and len(read(frames, ":")) == 1


def test_cli_record_writes_every_step_and_reports(cu, tmp_path, capsys):
    path = tmp_path / "cu.xyz"
    write(path, cu)
    frames = tmp_path / "u.extxyz"
    code = main(_md_argv(path, tmp_path, "--uncertainty-threshold", "1e-6",
                         "--uncertain-frames", str(frames)))
    out = capsys.readouterr().out
    assert code == 0
    assert len(read(frames, ":")) == 4 and "uncertain frames" in out and "4 above" in out
    code = main(["relax", str(path), "--device", "cpu", "--steps", "2", "-o",
                 str(tmp_path / "r.traj"), "--uncertainty-threshold", "1e3",
                 "--uncertain-frames", str(tmp_path / "r.extxyz")])
    assert "0 above max 1000 eV/Å" in capsys.readouterr().out
    assert not (tmp_path / "r.extxyz").exists()
    code = main(_md_argv(path, tmp_path, "--uncertainty-rms-threshold", "1e-6",
                         "--uncertain-frames", str(tmp_path / "rms.extxyz")))
    assert code == 0 and "4 above RMS 1e-06 eV/Å" in capsys.readouterr().out
    assert len(read(tmp_path / "rms.extxyz", ":")) == 4


@pytest.mark.parametrize("extra, match", [
    (["--uncertainty-threshold", "0"], "uncertainty_threshold must be a finite number > 0"),
    (["--uncertainty-threshold", "0.2", "--calc", "emt"], "--calc emt has none"),
    (["--uncertainty-rms-threshold", "-1"], "uncertainty_rms_threshold must be a finite number"),
    (["--uncertainty-rms-threshold", "0.2", "--calc", "emt"], "--calc emt has none"),
])
def test_cli_bad_uncertainty_options(cu, tmp_path, capsys, extra, match):
    path = tmp_path / "cu.xyz"
    write(path, cu)
    assert main(_md_argv(path, tmp_path, *extra)) == 2
    assert match in _one_error_line(capsys)


def test_restart_with_a_watch_repeats_the_column_line(cu, tmp_path):
    """A run restarted with an uncertainty watch appends two std columns to a log whose earlier
    part had none: the column line is repeated where the new part starts (not when the columns
    are the same), and every data line has as many fields as the column line above it."""
    log, ckpt = tmp_path / "md.log", tmp_path / "md.npz"
    kwargs = {"ensemble": "nve", "temperature_K": 600.0, "log_every": 2, "logfile": str(log),
              "restart": str(ckpt), "progress": False}
    run_md(cu, StdEMT(), n_steps=4, **kwargs)
    run_md(cu, StdEMT(), n_steps=8, uncertainty_threshold=10.0, **kwargs)
    run_md(cu, StdEMT(), n_steps=12, uncertainty_threshold=10.0, **kwargs)
    lines = log.read_text().splitlines()
    headers = [k for k, line in enumerate(lines) if line.startswith("# step")]
    assert len(headers) == 2 and lines[headers[1] - 1] == ("# restarted at step 4; columns "
                                                           "from here on:")
    assert lines[headers[1]].endswith("max_Fstd_eV_per_A  rms_Fstd_eV_per_A")
    columns = None
    steps = []
    for line in lines:
        if line.startswith("# step"):
            columns = len(line[1:].split())
        elif not line.startswith("#"):
            assert len(line.split()) == columns
            steps.append(int(line.split()[0]))
    assert steps == [0, 2, 4, 6, 8, 10, 12]
