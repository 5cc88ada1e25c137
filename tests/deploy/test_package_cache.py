"""ESTCalculator(model, compile="package") (est_calc/deploy/cache.py): the potential runs as its
exported package, compiled once into a cache keyed by the potential file's hash, dtype, device,
torch version and est_calc's sources; a later calculator loads the file without compiling; a
changed potential or a damaged file is exported again; results equal the eager potential's to
float64 round-off. The session's float64 package of the tiny potential stands in for a fresh
export (an export compiles for about a minute; tests/conftest.py makes it once)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from ase.build import molecule

import est_calc.deploy.export as export_module
from est_calc import ESTCalculator
from est_calc.deploy.cache import cache_dir, cached_package, package_key, source_digest


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("EST_CALC_CACHE", str(folder))
    return folder / "packages"


@pytest.fixture()
def exports(tiny_package64, monkeypatch):
    """Records export_potential's calls; each one 'compiles' by copying the session's package."""
    calls = []

    def fake(potential, path, *, dtype, device, overwrite, source=None, openmp=False):
        calls.append((str(potential), str(path), dtype, str(device), openmp))
        shutil.copyfile(tiny_package64[1], path)

    monkeypatch.setattr(export_module, "export_potential", fake)
    return calls


def _ethanol():
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=3)
    return atoms


def test_compiled_once_then_loaded(tiny_package64, cache, exports, capsys):
    source, _ = tiny_package64
    eager = _ethanol()
    eager.calc = ESTCalculator(str(source), dtype="float64", device="cpu")
    first = _ethanol()
    first.calc = ESTCalculator(str(source), compile="package", dtype="float64", device="cpu")
    assert len(exports) == 1
    (_, path, dtype, device, openmp), = exports
    assert (dtype, device, openmp) == ("float64", "cpu", False)  # serial kernels
    assert path == str(cache / package_key(source, "float64", "cpu"))
    assert source_digest() in path and "compiling" in capsys.readouterr().err
    assert first.calc.potential.path == cache / package_key(source, "float64", "cpu")
    assert first.get_potential_energy() == pytest.approx(eager.get_potential_energy(), abs=1e-8)
    assert np.abs(first.get_forces() - eager.get_forces()).max() < 1e-8

    again = _ethanol()
    again.calc = ESTCalculator(str(source), compile="package", dtype="float64", device="cpu")
    assert len(exports) == 1  # loaded from the cache
    assert again.get_potential_energy() == pytest.approx(first.get_potential_energy(), abs=1e-12)


def test_changed_potential_or_damaged_file_is_exported_again(tiny_package64, cache, exports,
                                                             tmp_path):
    source, _ = tiny_package64
    path = cached_package(source, "float64", "cpu", quiet=True)
    assert len(exports) == 1
    path.write_bytes(b"not a zip archive")  # damaged
    assert cached_package(source, "float64", "cpu", quiet=True) == path
    assert len(exports) == 2
    changed = tmp_path / "tiny.pt"
    changed.write_bytes(source.read_bytes() + b"\0")  # other bytes: another key
    assert package_key(changed, "float64", "cpu") != package_key(source, "float64", "cpu")
    assert package_key(source, "float32", "cpu") != package_key(source, "float64", "cpu")
    assert package_key(source, "float64", "cpu", openmp=True) != package_key(source, "float64",
                                                                               "cpu")


def test_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("EST_CALC_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "est_calc" / "packages"
    monkeypatch.setenv("EST_CALC_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine" / "packages"


def test_refusals(tiny_package64, make_potential, cache, exports):
    source, package = tiny_package64
    with pytest.raises(ValueError, match="registry name or a .pt file"):
        ESTCalculator(make_potential("so2", n_layers=1), compile="package", dtype="float64")
    with pytest.raises(ValueError, match="committee"):
        ESTCalculator([str(source), str(source)], compile="package", dtype="float64")
    with pytest.raises(ValueError, match="compile must be False, True"):
        ESTCalculator(str(source), compile="aot", dtype="float64")
    # a package given as it is: nothing to compile
    calc = ESTCalculator(str(package), compile="package", dtype="float64", device="cpu")
    assert calc.potential.path == package and exports == []
