"""`est relax`, `est md`, `est adsorb`: each failure is one line on stderr, exit code != 0."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.io import read, write

from est_calc.cli import main


@pytest.fixture
def cu(tmp_path):
    path = tmp_path / "cu.xyz"
    write(path, bulk("Cu", "fcc", a=3.59, cubic=True) * (2, 2, 2))
    return path


def _error(capsys):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _md(cu, tmp_path, *extra):
    return ["md", str(cu), "--steps", "4", "--log-every", "2", "--calc", "emt", "--no-progress",
            "-o", str(tmp_path / "md.traj"), *extra]


@pytest.mark.parametrize("command", ["relax", "md"])
@pytest.mark.parametrize("kind", ["empty", "directory", "garbage", "missing"])
def test_unreadable_structure_file(tmp_path, capsys, command, kind):
    path = tmp_path / "in.xyz"
    if kind == "empty":
        path.write_text("")
    elif kind == "directory":
        path.mkdir()
    elif kind == "garbage":
        path.write_text("this is not\nan xyz file\n")
    argv = [command, str(path), "--calc", "emt", "-o", str(tmp_path / "out.traj")]
    code = main(argv + (["--steps", "2"] if command == "md" else []))
    line = _error(capsys)
    assert code != 0
    assert line.startswith(f"est {command}: error: ") and "in.xyz" in line
    assert not (tmp_path / "out.traj").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files without read permission")
def test_structure_file_without_permission(cu, tmp_path, capsys):
    cu.chmod(0)
    assert main(["relax", str(cu), "--calc", "emt"]) != 0
    assert "cu.xyz" in _error(capsys)


def test_bogus_device(cu, tmp_path, capsys):
    assert main(["md", str(cu), "--steps", "2", "--device", "bogus"]) != 0
    line = _error(capsys)
    assert line.startswith("est md: error: ") and "bogus" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda(cu, capsys):
    assert main(["relax", str(cu), "--device", "cuda"]) != 0
    assert "CUDA is not available" in _error(capsys)


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_damaged_restart_file(cu, tmp_path, capsys, damage):
    ck = tmp_path / "ck.npz"
    assert main(_md(cu, tmp_path, "--restart", str(ck))) == 0
    data = ck.read_bytes()
    ck.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    capsys.readouterr()
    assert main(_md(cu, tmp_path, "--restart", str(ck), "--steps", "8")) != 0
    line = _error(capsys)
    assert "ck.npz" in line and ("corrupt" in line or "unreadable" in line)


@pytest.mark.parametrize("flag, value, name", [
    ("-T", "nan", "temperature"), ("-T", "inf", "temperature"), ("-T", "-5", "temperature"),
    ("--timestep", "nan", "timestep"), ("--timestep", "0", "timestep"),
    ("--steps", "-3", "steps"), ("--log-every", "0", "log"), ("--friction", "nan", "friction"),
])
def test_bad_md_numbers(cu, tmp_path, capsys, flag, value, name):
    argv = _md(cu, tmp_path, "--ensemble", "nvt-langevin")
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    assert main(argv) != 0
    line = _error(capsys)
    assert name in line and "positions" not in line
    assert not (tmp_path / "md.traj").exists()


def test_plot_into_missing_folder_is_refused_before_md(cu, tmp_path, capsys):
    assert main(_md(cu, tmp_path, "--plot", str(tmp_path / "nowhere" / "md.png"))) != 0
    assert "nowhere" in _error(capsys)
    assert not (tmp_path / "md.traj").exists()  # the MD never started


def test_output_into_missing_folder_is_refused_before_relax(cu, tmp_path, capsys):
    log = tmp_path / "relax.log"
    assert main(["relax", str(cu), "--calc", "emt", "--log", str(log),
                 "-o", str(tmp_path / "absent_dir" / "r.traj")]) != 0
    assert "absent_dir" in _error(capsys)
    assert not log.exists()  # the relaxation never started


def test_unstable_md_exits_non_zero_with_the_step(cu, tmp_path, capsys):
    log = tmp_path / "md.log"
    code = main(_md(cu, tmp_path, "--timestep", "1e4", "--log", str(log), "--log-every", "1"))
    line = _error(capsys)
    assert code != 0
    assert line.startswith("est md: error: ") and "step 1" in line
    assert len(read(tmp_path / "md.traj", ":")) == 1  # step 0 kept


def test_md_bounds_can_be_disabled_on_the_command_line(cu, tmp_path, capsys):
    code = main(_md(cu, tmp_path, "--timestep", "1e4", "--max-force", "none",
                    "--max-energy-drift", "none"))
    assert code == 0, capsys.readouterr().err


def test_rerun_of_finished_md_is_reported_and_changes_nothing(cu, tmp_path, capsys):
    log, ck = tmp_path / "md.log", tmp_path / "ck.npz"
    argv = _md(cu, tmp_path, "--restart", str(ck), "--log", str(log))
    assert main(argv) == 0
    before = [p.read_bytes() for p in (tmp_path / "md.traj", log, ck)]
    capsys.readouterr()
    assert main(argv) == 0
    assert "already" in capsys.readouterr().out
    assert [p.read_bytes() for p in (tmp_path / "md.traj", log, ck)] == before


def test_programming_errors_keep_their_traceback(cu, monkeypatch):
    import md_recipes.cli

    def broken(args):
        raise TypeError("a bug")

    monkeypatch.setattr(md_recipes.cli, "_run_md", broken)
    with pytest.raises(TypeError, match="a bug"):
        main(["md", str(cu), "--steps", "1"])


def test_relax_output_mode_follows_umask(cu, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        assert main(["relax", str(cu), "--calc", "emt", "-o", str(tmp_path / "r.traj"),
                     "--steps", "3"]) in (0, 1)
    finally:
        os.umask(old)
    assert (tmp_path / "r.traj").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cu.xyz", "r.traj"]


def test_subprocess_error_is_one_line(cu, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "est_calc.cli", "md", str(cu), "--steps", "3", "--calc", "emt",
         "--timestep", "1e4", "--no-progress", "-o", str(tmp_path / "md.traj")],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("est md: error: step 1") or "step 1" in lines[0]
    np.testing.assert_equal(len(read(tmp_path / "md.traj", ":")), 1)


def test_every_command_reports_an_unstable_run_in_one_line(capsys):
    import argparse

    from est_calc.cli import run_command
    from md_recipes import SimulationUnstable

    def unstable(args):
        raise SimulationUnstable("MD stopped at step 7: temperature\n 1e6 K", step=7,
                                 quantity="temperature")

    assert run_command(argparse.Namespace(command="demo", func=unstable)) == 2
    assert _error(capsys) == "est demo: error: MD stopped at step 7: temperature 1e6 K"


@pytest.mark.parametrize("extra, message", [
    (["--calc", "emt", "--max-atoms", "10"], "--calc emt has neither"),
    (["--calc", "emt", "--package"], "--calc emt has neither"),
    (["--compile", "--package"], "choose one"),
    (["--max-atoms", "0"], "max_atoms must be a positive number"),
])
def test_bad_calculator_options(cu, tmp_path, capsys, extra, message):
    assert main(["relax", str(cu), "--steps", "1", *extra]) != 0
    assert message in _error(capsys)


def test_relax_in_groups_of_atoms_equals_one_evaluation(cu, tmp_path, capsys):
    """--max-atoms 8 on 32 rattled atoms: the relaxation follows the same path (float32
    round-off)."""
    start = read(cu)
    start.rattle(0.1, seed=4)
    write(tmp_path / "rattled.xyz", start)
    out, codes = {}, set()
    for tag, extra in (("whole", []), ("groups", ["--max-atoms", "8"])):
        path = tmp_path / f"{tag}.xyz"
        # exit 1: not converged in 3 steps (the same for both)
        codes.add(main(["relax", str(tmp_path / "rattled.xyz"), "--steps", "3", "--device",
                        "cpu", "-o", str(path), *extra]))
        out[tag] = read(path)
    assert len(codes) == 1
    moved = np.abs(out["whole"].positions - start.positions).max()
    assert moved > 1e-3  # it relaxed
    assert np.abs(out["groups"].positions - out["whole"].positions).max() < 1e-4 * moved / 1e-2
