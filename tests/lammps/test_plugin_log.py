"""What pair_style est says about itself when it loads a model: the package's kernels (serial
or OpenMP, est_calc/deploy/export.py) and whether it raised glibc's malloc thresholds, under the
same rules as est_calc in Python (est_calc/allocator.py): not where the user chose otherwise."""

from __future__ import annotations

import pytest
from ase import Atoms
from lammps_cases import header, run_lmp, write_data

pytestmark = pytest.mark.lammps


def _log(folder, package, env=None) -> str:
    atoms = Atoms("Cu2", positions=[[1, 1, 1], [3, 1, 1]], cell=[6, 6, 6], pbc=True)
    folder.mkdir(parents=True, exist_ok=True)
    write_data(atoms, folder / "data.lmp")
    run_lmp(header(atoms, package, folder / "data.lmp") + "run 0\n", folder, env=env,
            timeout=120)
    lines = [ln for ln in (folder / "log.lammps").read_text().splitlines()
             if ln.startswith(f"pair_style est: {package}")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("env, raised", [
    ({}, True),
    ({"EST_CALC_TUNE_MALLOC": "0"}, False),
    ({"EST_CALC_TUNE_MALLOC": "Off"}, False),
    ({"MALLOC_MMAP_THRESHOLD_": "131072"}, False),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, False),
])
def test_model_line(plugin, package, tmp_path, env, raised):
    line = _log(tmp_path, package, env)
    assert "(float64, serial kernels: one thread per MPI rank)" in line
    assert line.endswith("glibc malloc thresholds raised (EST_CALC_TUNE_MALLOC=0 turns this off)"
                         if raised else "glibc malloc thresholds left as they are"), line
