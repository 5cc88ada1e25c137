"""pair_style est stops with one clear error for a missing file, a file that is not an est_calc
package, a package of another format version or compiled by another torch, an element that is not one or that the model does
not know, and newton_pair off."""

from __future__ import annotations

import fnmatch
import json
import zipfile

import pytest
from ase import Atoms
from lammps_cases import PLUGIN, SYMBOLS, run_lmp, single_error, write_data

LIMIT = 1_000_000_000  # bytes of address space: loads the model, but not a 16,384-atom graph

pytestmark = pytest.mark.lammps


ALL = " ".join(SYMBOLS)


def _error(folder, model, elements=ALL, newton="on"):
    atoms = Atoms("Cu2", positions=[[1, 1, 1], [3, 1, 1]], cell=[6, 6, 6], pbc=True)
    folder.mkdir(parents=True, exist_ok=True)
    write_data(atoms, folder / "data.lmp")
    script = f"""units metal
atom_style atomic
newton {newton}
read_data data.lmp
plugin load {PLUGIN}
pair_style est
pair_coeff * * {model} {elements}
run 0
"""
    return single_error(run_lmp(script, folder, check=False, timeout=120))


def test_missing_file(plugin, tmp_path):
    assert "no model file" in _error(tmp_path, tmp_path / "nowhere.pt2")


def test_foreign_files(plugin, tmp_path):
    junk = tmp_path / "junk.pt2"
    junk.write_text("not a model\n")
    assert "is not an est_calc model" in _error(tmp_path / "junk", junk)
    other = tmp_path / "other.pt2"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("other/data/something.txt", "a zip archive, but no package")
    assert "is not an est_calc model" in _error(tmp_path / "zip", other)


def _edited(package, path, **changes):
    """A copy of ``package`` with some of its metadata changed."""
    with zipfile.ZipFile(package) as src, zipfile.ZipFile(path, "w") as out:
        for item in src.infolist():
            data = src.read(item)
            if fnmatch.fnmatch(item.filename, "*/data/aotinductor/*/*_metadata.json"):
                meta = json.loads(data)
                meta.update(changes)
                data = json.dumps(meta).encode()
            out.writestr(item, data)
    return path


def test_version_mismatches(plugin, package, tmp_path):
    line = _error(tmp_path / "format", _edited(package, tmp_path / "older.pt2",
                                               est_format_version="1"))
    assert "model format version 1" in line and "runs version 2" in line
    line = _error(tmp_path / "torch", _edited(package, tmp_path / "torch.pt2",
                                              torch_version="2.99.0"))
    assert "was compiled by torch 2.99.0" in line


def test_elements(plugin, package, tmp_path):
    assert "is not a chemical element" in _error(tmp_path / "xx", package, "H C O Xx")
    line = _error(tmp_path / "fe", package, "H C Fe Cu")
    assert "element Fe (type 3) is unknown to the model" in line and "H C O Cu" in line


def test_newton_off(plugin, package, tmp_path):
    assert "requires newton_pair on" in _error(tmp_path, package, newton="off")


def test_out_of_memory_stops_the_run(plugin, package, tmp_path):
    def script(cells):
        return f"""units metal
lattice fcc 3.61
region box block 0 {cells} 0 {cells} 0 {cells}
create_box 1 box
create_atoms 1 box
mass 1 63.546
plugin load {PLUGIN}
pair_style est
pair_coeff * * {package} Cu
velocity all create 300 1
fix nve all nve
run 5
print "finished"
"""

    small = run_lmp(script(1), tmp_path / "small", check=False, memory_limit_bytes=LIMIT)
    if small.returncode != 0:
        pytest.skip(f"lmp and libtorch do not load within {LIMIT} bytes of address space here")
    big = run_lmp(script(16), tmp_path / "big", check=False, memory_limit_bytes=LIMIT)
    assert "finished" not in big.stdout
    assert "out of memory on the CPU" in single_error(big), big.stdout[-2000:]
