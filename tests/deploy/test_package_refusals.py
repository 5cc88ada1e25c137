"""A missing, foreign or mismatched package, and input a package cannot take, are refused with a
one-line error naming the problem, before any of the file's compiled code is loaded."""

from __future__ import annotations

import fnmatch
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from ase import Atoms
from deploy_cases import POTENTIAL

from est_calc.calculator import ESTCalculator
from est_calc.deploy import load_package, read_metadata
from est_calc.potential import potential_dirs


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.pt2"
    with pytest.raises(FileNotFoundError) as err:
        ESTCalculator(model=str(path))
    assert "nowhere.pt2" in _one_line(err)


@pytest.mark.parametrize("kind", ["text", "potential", "empty"])
def test_foreign_file(tmp_path, kind):
    path = tmp_path / "foreign.pt2"
    if kind == "text":
        path.write_text("not a package\n")
    elif kind == "empty":
        path.write_bytes(b"")
    else:  # a zip archive of another kind: torch.save's format
        shutil.copy(next(d / f"{POTENTIAL}.pt" for d in potential_dirs()
                         if (d / f"{POTENTIAL}.pt").is_file()), path)
    with pytest.raises(ValueError, match="not an est_calc deployment package") as err:
        ESTCalculator(model=str(path))
    assert "foreign.pt2" in _one_line(err)


def test_options_a_package_cannot_honour(tmp_path):
    with pytest.raises(ValueError, match="compile=True") as err:
        ESTCalculator(model=str(tmp_path / "any.pt2"), compile=True)
    _one_line(err)


def _with_metadata(src: Path, dst: Path, **changes) -> Path:
    """A copy of the package ``src`` whose est_calc metadata has ``changes`` (None deletes)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if fnmatch.fnmatch(item.filename, "*/data/aotinductor/*/*_metadata.json"):
                meta = json.loads(data)
                for key, value in changes.items():
                    if value is None:
                        meta.pop(key, None)
                    else:
                        meta[key] = value
                data = json.dumps(meta).encode()
            zout.writestr(item, data)
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("changes, match", [
    ({"est_format": None}, "not an est_calc deployment package"),
    ({"est_format": "other.format"}, "not an est_calc deployment package"),
    ({"est_format_version": "1"}, "package format version 1"),  # both directions per pair
    ({"est_format_version": "3"}, "package format version 3"),
    ({"torch_version": "2.1.0"}, "compiled by torch 2.1.0"),
    ({"species": None}, "lacks the metadata"),
])
def test_foreign_or_mismatched_package(package64, tmp_path, changes, match):
    bad = _with_metadata(package64, tmp_path / "bad.pt2", **changes)
    with pytest.raises(ValueError, match=match) as err:
        ESTCalculator(model=str(bad))
    assert "bad.pt2" in _one_line(err)
    with pytest.raises(ValueError, match=match):
        read_metadata(bad)


@pytest.mark.slow
def test_truncated_package(package64, tmp_path):
    bad = tmp_path / "cut.pt2"
    bad.write_bytes(package64.read_bytes()[: package64.stat().st_size // 2])
    with pytest.raises(ValueError, match="not an est_calc deployment package") as err:
        load_package(bad)
    _one_line(err)


@pytest.mark.slow
def test_dtype_or_option_mismatch(package64):
    with pytest.raises(ValueError, match="exported in float64") as err:
        ESTCalculator(model=str(package64))  # the calculator's default dtype is float32
    _one_line(err)
    with pytest.raises(ValueError, match="low_memory") as err:
        ESTCalculator(model=str(package64), dtype="float64", low_memory=True)
    _one_line(err)


@pytest.mark.slow
def test_unknown_element(package64):
    calc = ESTCalculator(model=str(package64), dtype="float64")
    atoms = Atoms("CuU", positions=[[0, 0, 0], [2.4, 0, 0]], cell=[10, 10, 10], pbc=True)
    atoms.calc = calc
    with pytest.raises(ValueError, match="U") as err:
        atoms.get_potential_energy()
    assert "supports H, C, O, Cu" in _one_line(err)


@pytest.mark.slow
def test_no_second_derivatives(package64):
    from est_calc.batch import AtomsBatch
    from est_calc.forces import energy_forces_stress
    from est_calc.neighbors import build_graph

    pot = load_package(package64)
    atoms = Atoms("Cu2", positions=[[0, 0, 0], [2.4, 0, 0]], cell=[10, 10, 10], pbc=True)
    batch = AtomsBatch.from_atoms(atoms, dtype=torch.float64)
    with pytest.raises(ValueError, match="first derivatives only") as err:
        energy_forces_stress(pot, batch, build_graph(batch, pot.cutoff_A), create_graph=True)
    _one_line(err)
