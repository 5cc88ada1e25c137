"""examples/lammps/in.cu_npt runs (minimize, then fix npt with per-atom computes) on 2 ranks."""

from __future__ import annotations

import shutil

import pytest
from lammps_cases import PLUGIN, REPO, run_lmp

pytestmark = pytest.mark.lammps


def test_example_runs(package, tmp_path):
    script = (REPO / "examples" / "lammps" / "in.cu_npt").read_text()
    shutil.copy(package, tmp_path / "model.pt2")
    script = script.replace("index est-emt-small.pt2", "index model.pt2")
    script = script.replace("index ../../build/lammps-plugin/est_plugin.so", f"index {PLUGIN}")
    script = script.replace("variable steps  index 200", "variable steps  index 6")
    script = script.replace("minimize        0.0 1.0e-4 200 2000", "minimize        0.0 1.0e-4 5 50")
    assert "index 6" in script and "1.0e-4 5 50" in script
    result = run_lmp(script, tmp_path, nprocs=2)
    assert "done: pe" in result.stdout
    assert (tmp_path / "cu_npt.dump").exists()
