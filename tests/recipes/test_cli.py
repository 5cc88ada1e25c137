"""Command-line front ends with --calc emt: outputs written, summaries printed, bad input."""

import numpy as np
import pytest
from ase.build import bulk
from ase.io import read, write

from md_recipes.cli import main_adsorb, main_md, main_relax, make_calculator


@pytest.mark.slow
def test_relax_cli_cell(tmp_path, capsys):
    src, out = tmp_path / "in.xyz", tmp_path / "out.traj"
    write(src, bulk("Cu", "fcc", a=3.70))
    code = main_relax([str(src), "-o", str(out), "--cell", "--optimizer", "bfgs",
                       "--fmax", "0.001", "--calc", "emt"])
    text = capsys.readouterr().out
    assert code == 0 and "converged" in text and "cell" in text
    relaxed = read(out)
    assert relaxed.get_volume() < bulk("Cu", "fcc", a=3.70).get_volume()


def test_md_cli_writes_trajectory_log_and_restart(tmp_path, capsys):
    src = tmp_path / "in.xyz"
    write(src, bulk("Cu", "fcc", a=3.59, cubic=True) * (2, 2, 2))
    args = [str(src), "--ensemble", "nvt-langevin", "-T", "500", "--steps", "10",
            "-o", str(tmp_path / "md.traj"), "--log", str(tmp_path / "md.log"),
            "--restart", str(tmp_path / "ck.npz"), "--log-every", "5", "--calc", "emt",
            "--no-progress"]
    assert main_md(args) == 0
    assert "<T> second half" in capsys.readouterr().out
    assert len(read(tmp_path / "md.traj", ":")) == 3
    assert (tmp_path / "ck.npz").exists()
    args[args.index("10")] = "20"  # continue the same run to 20 steps
    assert main_md(args) == 0
    frames = read(tmp_path / "md.traj", ":")
    assert len(frames) == 5  # appended, the checkpoint frame not written twice
    assert not np.allclose(frames[-1].positions, frames[2].positions)


def test_adsorb_cli(tmp_path, capsys):
    code = main_adsorb(["--slab", "Cu100", "--adsorbate", "H", "--sites", "hollow,ontop",
                        "--calc", "emt", "-o", str(tmp_path / "sites.traj")])
    text = capsys.readouterr().out
    assert code == 0 and "hollow" in text and "ontop" in text and "most stable" in text
    assert len(read(tmp_path / "sites.traj", ":")) == 2


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    assert main_relax([str(tmp_path / "missing.xyz"), "--calc", "emt"]) == 2
    assert "no such structure file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--calc"):
        make_calculator("not-a-calculator")
    assert main_adsorb(["--slab", "Cu111", "--adsorbate", "O", "--sites", "hollow",
                        "--calc", "emt"]) == 2
    assert "unknown site" in capsys.readouterr().err


def test_compile_flag_reaches_the_calculator():
    import argparse

    from md_recipes.cli import add_md_parser

    sub = argparse.ArgumentParser().add_subparsers()
    add_md_parser(sub)
    args = sub.choices["md"].parse_args(["in.xyz", "--steps", "1", "--compile", "--device", "cpu"])
    calc = make_calculator(args.calc, args.device, args.skin, args.compile)
    assert args.compile and calc.potential.model.is_compiled  # compiles lazily, at the first call
    assert not make_calculator("est", "cpu").potential.model.is_compiled
