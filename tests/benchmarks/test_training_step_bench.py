"""benchmarks/training_step.py at toy size: both trainers run and the table comes out."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import training_step

needs_data = pytest.mark.skipif(not training_step.DEFAULT_DATA.is_file(),
                                reason="needs ../shared/data/real_dft/3bpa")


@needs_data
def test_quick_run_prints_both_steps_and_their_ratio(capsys):
    assert training_step.main(["--quick", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| eager |" in out and "| train.compile |" in out
    assert "compiled / eager speed" in out and "27 atoms" in out


def test_missing_data_is_one_line_and_exit_2(tmp_path, capsys):
    assert training_step.main(["--quick", "--data", str(tmp_path / "none.xyz")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
