"""What pair_style est says about itself when it loads a model: the package's kernels (serial
or OpenMP, est_calc/deploy/export.py) and what it did to glibc's malloc (by default it keeps
freed memory for the next step, as `est md` does; est_calc/allocator.py), never where the user
chose otherwise."""

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


RETAIN = "glibc malloc: freed memory kept for the next step (EST_CALC_TUNE_MALLOC=0 turns this off)"
MODERATE = "glibc malloc: thresholds raised (EST_CALC_TUNE_MALLOC=moderate)"
NOTHING = "glibc malloc: left as it is"


@pytest.mark.parametrize("env, said", [
    ({}, RETAIN),
    ({"EST_CALC_TUNE_MALLOC": "Moderate"}, MODERATE),
    ({"EST_CALC_TUNE_MALLOC": "Off"}, NOTHING),
    ({"MALLOC_MMAP_MAX_": "0"}, NOTHING),
])
def test_model_line(plugin, package, tmp_path, env, said):
    line = _log(tmp_path, package, env)
    assert "(float64, serial kernels: one thread per MPI rank)" in line
    assert line.endswith(said), line
