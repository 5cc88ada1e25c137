"""Potential: species checks, save/load round trip, atomic writes, refusing bad files, registry."""

from __future__ import annotations

import os
import pickle
import zipfile

import pytest
import torch

from est_calc import potential as potmod
from est_calc.batch import AtomsBatch
from est_calc.potential import Potential, list_potentials, load_potential, save_potential
from est_calc.testing import predict


@pytest.fixture(scope="module")
def pot():
    torch.manual_seed(0)
    p = Potential.from_config("tiny", species=[29, 8, 6], metadata={"data": "unit test"})
    with torch.no_grad():
        p.model.element_reference[[6, 8, 29]] = torch.tensor([-1.5, -2.5, -3.5])
    return p.eval()


@pytest.fixture
def saved(pot, tmp_path):
    return save_potential(pot, tmp_path / "tiny.pt")


def test_from_config_and_metadata(pot):
    assert pot.species == (6, 8, 29)
    assert pot.cutoff_A == pot.config.cutoff_A
    assert pot.metadata["units"] == "eV/Å"
    assert pot.metadata["data"] == "unit test"
    with pytest.raises(ValueError, match="metadata"):
        Potential(pot.model, pot.config, [29], metadata={"bad": object()})
    with pytest.raises(ValueError, match="1..118"):
        Potential(pot.model, pot.config, [0, 29])


def test_check_species_names_unknown_elements(pot):
    pot.check_species([29, 6, 29])
    pot.check_species(torch.tensor([8, 8]))
    with pytest.raises(ValueError, match=r"Au.*H.*supports C, O, Cu|H.*Au.*supports C, O, Cu"):
        pot.check_species([29, 79, 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_save_load_gives_identical_outputs(pot, saved, cu_slab_co, dtype):
    loaded = load_potential(saved, dtype=dtype)
    assert loaded.dtype == dtype
    assert loaded.species == pot.species and loaded.config == pot.config
    assert loaded.metadata["data"] == "unit test"
    ref = pot.to(dtype)
    try:
        batch = AtomsBatch.from_atoms(cu_slab_co, dtype=dtype)
        a, b = predict(ref, batch), predict(loaded, batch)
    finally:
        pot.to(torch.float32)
    assert torch.equal(a.energy, b.energy) and torch.equal(a.forces, b.forces)
    raw = torch.load(saved, weights_only=True)
    assert raw["format"] == "est_calc.potential" and raw["format_version"] == 1
    assert raw["species"] == [6, 8, 29]
    assert torch.equal(raw["state_dict"]["element_reference"][[6, 8, 29]],
                       torch.tensor([-1.5, -2.5, -3.5]))


def test_save_is_atomic_when_writing_fails(pot, tmp_path, monkeypatch):
    path = save_potential(pot, tmp_path / "p.pt")
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kw):
        f.write(b"PK\x03\x04 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(potmod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_potential(pot, path)
    with pytest.raises(OSError, match="disk full"):
        save_potential(pot, tmp_path / "new.pt")
    assert path.read_bytes() == before  # old file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.pt"]  # no partial or temp files


def _rewrite(saved, tmp_path, **changes):
    payload = torch.load(saved, weights_only=True)
    for k, v in changes.items():
        if v is None:
            del payload[k]
        else:
            payload[k] = v
    path = tmp_path / "edited.pt"
    torch.save(payload, path)
    return path


def test_bad_contents_are_refused(saved, tmp_path):
    with pytest.raises(ValueError, match="newer est_calc"):
        load_potential(_rewrite(saved, tmp_path, format_version=2))
    with pytest.raises(ValueError, match="missing key"):
        load_potential(_rewrite(saved, tmp_path, state_dict=None))
    with pytest.raises(ValueError, match="not an est_calc potential"):
        load_potential(_rewrite(saved, tmp_path, format="something else"))
    state = torch.load(saved, weights_only=True)["state_dict"]
    state.pop(next(iter(state)))
    with pytest.raises(ValueError, match="do not fit"):
        load_potential(_rewrite(saved, tmp_path, state_dict=state))


def test_truncated_corrupted_and_foreign_files_are_refused(saved, tmp_path):
    data = saved.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    for k in range(100, len(flipped), 97):
        flipped[k] ^= 0xFF
    corrupted = tmp_path / "corrupted.pt"
    corrupted.write_bytes(bytes(flipped))
    foreign_zip = tmp_path / "foreign.pt"
    with zipfile.ZipFile(foreign_zip, "w") as z:
        z.writestr("hello.txt", "not a potential")
    text = tmp_path / "text.pt"
    text.write_text("just text\n")
    for path in (truncated, corrupted, foreign_zip, text):
        with pytest.raises(ValueError, match="not .*est_calc potential"):
            load_potential(path)


class _WritesAFile:
    """Unpickling this would create a file (if anything ever executed code from a potential)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_pickle_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = {"format": "est_calc.potential", "format_version": 1, "config": {},
               "species": [1], "state_dict": {}, "metadata": _WritesAFile(str(marker))}
    zipped = tmp_path / "evil.pt"
    torch.save(payload, zipped)  # torch's zip container with a hostile pickle inside
    legacy = tmp_path / "evil_legacy.pt"
    legacy.write_bytes(pickle.dumps(payload))  # a bare pickle stream
    assert not marker.exists()
    for path in (zipped, legacy):
        with pytest.raises(ValueError, match="not a readable est_calc potential"):
            load_potential(path)
        assert not marker.exists()


def test_registry_names_default_and_missing(pot, tmp_path, monkeypatch):
    monkeypatch.setattr(potmod, "potential_dirs", lambda: [tmp_path / "a", tmp_path / "b"])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert list_potentials() == []
    with pytest.raises(FileNotFoundError, match="no default potential ships"):
        load_potential("default")
    with pytest.raises(FileNotFoundError, match="unknown potential 'nope'"):
        load_potential("nope")
    with pytest.raises(FileNotFoundError, match="no potential file"):
        load_potential(str(tmp_path / "missing.pt"))
    save_potential(pot, tmp_path / "b" / "cu-tiny.pt")
    assert list_potentials() == ["cu-tiny"]
    assert load_potential("cu-tiny").species == pot.species
    (tmp_path / "a" / "DEFAULT").write_text("cu-tiny\n")
    with pytest.raises(FileNotFoundError, match="DEFAULT"):
        load_potential("default")  # the marker in a/ points to a file that is not in a/
    (tmp_path / "a" / "DEFAULT").unlink()
    (tmp_path / "b" / "DEFAULT").write_text("cu-tiny\n")
    assert load_potential("default").species == pot.species


def test_real_registry_is_consistent():
    # Every listed name loads by name; an empty registry is allowed until a potential ships.
    for name in list_potentials():
        assert isinstance(load_potential(name), Potential)
    assert os.path.basename(str(potmod.potential_dirs()[0])) == "potentials"


def test_a_retired_name_says_why_and_what_to_use():
    from est_calc.potential import load_potential

    with pytest.raises(FileNotFoundError, match="no longer shipped.*float32.*est-emt-small"):
        load_potential("est-emt-small-v6")
