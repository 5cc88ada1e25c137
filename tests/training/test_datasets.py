"""Tests of the OC20-style data readers and writers (est_calc.training.datasets)."""

from __future__ import annotations

import os
import pickle
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from est_calc.training.datasets import (
    Frame, HDF5Dataset, LegacyLMDBDataset, UnsafePickleError, convert, frame_from_atoms,
    open_dataset, safe_loads, validate_frames, write_ase_db, write_extxyz_with_sidecar,
    write_hdf5,
)
from est_calc.training.datasets.legacy_lmdb import write_legacy_lmdb

# The shared/ folder lies beside the repository (CI clones it elsewhere with shared/ beside it).
SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "data" / "oc20_format"
if not SAMPLES.is_dir():  # the shared samples live beside the repo in CI checkouts
    SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "oc20_format"
EXTXYZ = SAMPLES / "toy_c3h8_relax_s2ef.extxyz"
LEGACY = SAMPLES / "toy_c3h8_legacy_s2ef.lmdb"
needs_samples = pytest.mark.skipif(not EXTXYZ.is_file(), reason="shared OC20 samples missing")

FLOAT_FIELDS = ("positions", "cell", "forces", "stress")


def assert_same_frame(a: Frame, b: Frame, atol: float = 0.0):
    """Every label of two frames agrees (floats to ``atol``, everything else exactly)."""
    for key in ("numbers", "pbc", "tags", "fixed"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)
    for key in FLOAT_FIELDS:
        va, vb = getattr(a, key), getattr(b, key)
        assert (va is None) == (vb is None), key
        if va is not None:
            np.testing.assert_allclose(va, vb, rtol=0, atol=atol, err_msg=key)
    for key in ("energy", "reference_energy"):
        va, vb = getattr(a, key), getattr(b, key)
        assert (va is None) == (vb is None), key
        if va is not None:
            assert abs(va - vb) <= atol, (key, va, vb)
    assert a.sid == b.sid and a.fid == b.fid


def emt_frames() -> list[Frame]:
    """Rattled Cu(100) slabs with FixAtoms on the bottom layers, tags, EMT labels; one bulk frame
    with stress; string and integer sids."""
    from ase.build import add_adsorbate, bulk, fcc100
    from ase.calculators.emt import EMT
    from ase.constraints import FixAtoms

    frames = []
    rng = np.random.default_rng(0)
    for i in range(3):
        slab = fcc100("Cu", size=(2, 2, 3), vacuum=6.0)
        add_adsorbate(slab, "Cu", 1.8, "hollow")
        slab.set_tags([0] * 8 + [1] * 4 + [2])
        slab.set_constraint(FixAtoms(mask=slab.get_tags() == 0))
        slab.positions += rng.normal(scale=0.05, size=slab.positions.shape)
        slab.calc = EMT()
        slab.get_potential_energy()
        frames.append(frame_from_atoms(slab, sid=100 + i, fid=i, reference_energy=-0.5 * i))
    cu = bulk("Cu", cubic=True).repeat((2, 1, 1))
    cu.rattle(0.03, seed=2)
    cu.set_cell(cu.cell * 1.02, scale_atoms=True)
    cu.calc = EMT()
    cu.get_potential_energy()
    cu.get_stress()
    frames.append(frame_from_atoms(cu, sid="bulk-a", fid=7))
    return frames


# --------------------------------------------------------------------------- shared samples


@needs_samples
def test_sample_extxyz_keeps_raw_forces_on_fixed_atoms():
    import ase.io

    data = open_dataset(EXTXYZ)
    assert len(data) == 101
    frame = data[0]
    ref = ase.io.read(EXTXYZ, 0)
    assert frame.fixed.sum() == 18 and set(np.unique(frame.tags)) == {0, 1, 2}
    np.testing.assert_array_equal(frame.fixed, frame.tags == 0)  # OC20: subsurface is fixed
    raw = ref.get_forces(apply_constraint=False)
    np.testing.assert_array_equal(frame.forces, raw)
    assert np.abs(frame.forces[frame.fixed]).max() > 1e-3  # ASE's default would zero these
    assert np.all(ref.get_forces()[frame.fixed] == 0)
    assert frame.energy == pytest.approx(ref.get_potential_energy(), abs=0)
    # random access agrees with a sequential pass, negative indices too
    frames = list(data)
    assert_same_frame(data[57], frames[57])
    assert_same_frame(data[-1], frames[100])
    with pytest.raises(IndexError):
        data[101]


@needs_samples
def test_legacy_lmdb_sample_matches_extxyz():
    import lmdb

    env = lmdb.open(str(LEGACY), subdir=False, readonly=True, lock=False)
    assert env.stat()["entries"] == 102  # the `length` key is one more entry
    env.close()
    legacy = open_dataset(LEGACY)
    again = open_dataset(LEGACY)  # LMDB allows one env per file and process: it is shared
    xyz = open_dataset(EXTXYZ)
    assert_same_frame(again[7], legacy[7])
    assert isinstance(legacy, LegacyLMDBDataset) and len(legacy) == len(xyz) == 101
    for i in (0, 33, 100):
        a, b = legacy[i], xyz[i]
        assert a.fid == i and a.sid == 0
        np.testing.assert_array_equal(a.numbers, b.numbers)
        np.testing.assert_array_equal(a.tags, b.tags)
        np.testing.assert_array_equal(a.fixed, b.fixed)
        assert a.energy == pytest.approx(b.energy, abs=1e-6)
        np.testing.assert_allclose(a.forces, b.forces, atol=1e-5)  # float32 in the LMDB
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-5)
        np.testing.assert_allclose(a.cell, b.cell, atol=1e-5)
    assert "torch_geometric" not in sys.modules


@needs_samples
@pytest.mark.parametrize("suffix", [".extxyz", ".extxyz.xz", ".db", ".json", ".aselmdb", ".h5"])
def test_round_trip_sample_frames(tmp_path, suffix):
    source = open_dataset(EXTXYZ)
    frames = [replace(source[i], sid=5, fid=i, reference_energy=-1.25 * i)
              for i in range(0, 101, 20)]
    out = tmp_path / f"sample{suffix}"
    n = convert_frames(frames, out)
    back = open_dataset(out)
    assert n == len(back) == len(frames)
    for a, b in zip(frames, back):
        assert_same_frame(a, b)


def convert_frames(frames, out: Path) -> int:
    if out.name.endswith((".extxyz", ".extxyz.xz")):
        return write_extxyz_with_sidecar(frames, out)
    if out.suffix == ".h5":
        return write_hdf5(frames, out)
    return write_ase_db(frames, out)


@pytest.mark.parametrize("suffix", [".extxyz", ".db", ".json", ".aselmdb", ".h5"])
def test_round_trip_emt_frames(tmp_path, suffix):
    frames = emt_frames()
    assert frames[-1].stress is not None and frames[0].fixed.sum() == 8
    out = tmp_path / f"emt{suffix}"
    convert_frames(frames, out)
    back = list(open_dataset(out))
    # extxyz prints positions with 8 decimals; every other format is bit-exact
    atol = 1e-8 if suffix == ".extxyz" else 0.0
    for a, b in zip(frames, back, strict=True):
        assert_same_frame(a, b, atol=atol)
        if b.fixed.any():  # raw forces on fixed atoms survive
            assert np.abs(b.forces[b.fixed]).max() > 1e-3


def test_to_atoms_carries_constraints_tags_ids_and_raw_forces():
    from ase.constraints import FixAtoms

    frame = emt_frames()[0]
    atoms = frame.to_atoms()
    assert isinstance(atoms.constraints[0], FixAtoms)
    np.testing.assert_array_equal(sorted(atoms.constraints[0].get_indices()),
                                  np.flatnonzero(frame.fixed))
    np.testing.assert_array_equal(atoms.get_tags(), frame.tags)
    assert atoms.info["sid"] == frame.sid and atoms.info["fid"] == frame.fid
    np.testing.assert_array_equal(atoms.get_forces(apply_constraint=False), frame.forces)
    assert np.all(atoms.get_forces()[frame.fixed] == 0)
    assert atoms.get_potential_energy() == frame.energy
    assert_same_frame(frame_from_atoms(atoms), frame)


# --------------------------------------------------------------------------- extxyz sidecar


def test_sidecar_ids_reference_and_count_mismatch(tmp_path):
    frames = emt_frames()[:3]
    path = tmp_path / "0.extxyz"
    write_extxyz_with_sidecar(frames, path)
    lines = (tmp_path / "0.txt").read_text().splitlines()
    assert lines[1] == f"random101,frame1,{-0.5!r}"
    total = open_dataset(path)
    referenced = open_dataset(path, subtract_reference=True)
    for i, frame in enumerate(frames):
        assert total[i].sid == 100 + i and total[i].fid == i
        assert referenced[i].energy == pytest.approx(frame.energy - frame.reference_energy,
                                                     abs=1e-12)
    (tmp_path / "0.txt").write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(ValueError, match="2 lines but .* 3 frames"):
        open_dataset(path)
    (tmp_path / "0.txt").unlink()  # without a sidecar, ids come from the extxyz header
    plain = open_dataset(path)
    assert [(f.sid, f.fid, f.reference_energy) for f in plain] == [(100, 0, None), (101, 1, None),
                                                                   (102, 2, None)]


def test_folder_of_shards_concatenates_in_sorted_order(tmp_path, monkeypatch):
    from est_calc.training.datasets import extxyz

    monkeypatch.setattr(extxyz, "XZ_CACHE_SHARDS", 1)  # every shard switch decompresses again
    frames = emt_frames()
    write_extxyz_with_sidecar(frames[2:], tmp_path / "1.extxyz.xz")
    write_extxyz_with_sidecar(frames[:2], tmp_path / "0.extxyz.xz")
    assert (tmp_path / "0.txt.xz").is_file()
    data = open_dataset(tmp_path)
    assert len(data) == len(frames)
    assert [f.fid for f in data] == [f.fid for f in frames]
    for i in (3, 0, 2, 1):
        assert_same_frame(data[i], frames[i], atol=1e-8)
    assert len(extxyz._XZ_CACHE) == 1


def test_a_list_of_paths_in_different_formats_reads_in_list_order(tmp_path):
    frames = emt_frames()
    write_hdf5(frames[:2], tmp_path / "b.h5")
    write_extxyz_with_sidecar(frames[2:], tmp_path / "a.extxyz")
    data = open_dataset([tmp_path / "b.h5", str(tmp_path / "a.extxyz")])  # list order, not names
    assert len(data) == len(frames)
    for i in range(len(frames)):
        assert_same_frame(data[i], frames[i], atol=1e-6)
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        open_dataset([tmp_path / "b.h5", tmp_path / "missing.h5"])
    with pytest.raises(ValueError, match="empty list"):
        open_dataset([])


# --------------------------------------------------------------------------- legacy LMDB


def _record(frame: Frame, names: str) -> dict:
    rec = {"pos": frame.positions.astype(np.float32),
           "cell": frame.cell[None].astype(np.float32),
           "atomic_numbers": frame.numbers.astype(np.float32), "natoms": frame.n_atoms,
           "tags": frame.tags, "fixed": frame.fixed.astype(np.float32),
           "sid": frame.sid, "fid": frame.fid}
    if names == "legacy":
        rec.update(y=frame.energy, force=frame.forces.astype(np.float32))
    else:
        rec.update(energy=np.float64(frame.energy), forces=frame.forces.astype(np.float32))
    return rec


@pytest.mark.parametrize("layout,names,length_key", [("pyg1", "legacy", True),
                                                     ("pyg2", "new", False)])
def test_legacy_lmdb_layouts_and_folder(tmp_path, layout, names, length_key):
    frames = emt_frames()[:3]
    write_legacy_lmdb([_record(f, names) for f in frames[:2]], tmp_path / "data.0000.lmdb",
                      layout=layout, write_length=length_key)
    write_legacy_lmdb([_record(frames[2], names)], tmp_path / "data.0001.lmdb",
                      layout=layout, write_length=length_key)
    data = open_dataset(tmp_path)
    assert len(data) == 3
    for a, b in zip(frames, data, strict=True):
        np.testing.assert_array_equal(a.numbers, b.numbers)
        np.testing.assert_array_equal(a.fixed, b.fixed)
        np.testing.assert_array_equal(a.tags, b.tags)
        np.testing.assert_allclose(a.forces, b.forces, atol=1e-5)
        assert b.energy == pytest.approx(a.energy, abs=1e-12)
        assert (b.sid, b.fid) == (a.sid, a.fid)
    assert "torch_geometric" not in sys.modules


def test_is2re_fields_go_to_extra(tmp_path):
    frame = emt_frames()[0]
    rec = _record(frame, "legacy")
    del rec["y"], rec["force"]
    rec.update(y_init=1.5, y_relaxed=-0.25, pos_relaxed=frame.positions.astype(np.float32))
    write_legacy_lmdb([rec], tmp_path / "data.lmdb")
    got = open_dataset(tmp_path / "data.lmdb")[0]
    assert got.energy == 1.5 and got.forces is None
    assert got.extra["y_relaxed"] == -0.25
    np.testing.assert_allclose(got.extra["pos_relaxed"], frame.positions, atol=1e-5)


class _Boom:
    """Pickles as a call of ``func(arg)``: what a malicious data file would do."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "nested_storage"])
def test_malicious_pickles_are_refused(tmp_path, kind):
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    if kind == "os.system":
        blob = pickle.dumps(_Boom(os.system, command))
    elif kind == "builtins.eval":
        blob = pickle.dumps(_Boom(eval, f"open({str(marker)!r}, 'w').close()"))
        pickle.loads(blob)  # control: the plain unpickler does run the payload
        assert marker.exists()
        marker.unlink()
    else:  # an evil blob handed to torch.storage._load_from_bytes must meet weights_only
        import torch.storage

        inner = pickle.dumps(_Boom(os.system, command), protocol=2)
        blob = pickle.dumps(_Boom(torch.storage._load_from_bytes, inner))
    with pytest.raises(pickle.UnpicklingError) as err:
        safe_loads(blob)
    if kind != "nested_storage":
        assert isinstance(err.value, UnsafePickleError)
        assert kind.replace("posix", "os") in str(err.value).replace("posix", "os")
    assert not marker.exists()
    # the same payload inside an LMDB: reading refuses it, validation counts it
    import lmdb

    env = lmdb.open(str(tmp_path / "evil.lmdb"), subdir=False, map_size=2**24)
    with env.begin(write=True) as txn:
        txn.put(b"0", blob)
    env.close()
    data = open_dataset(tmp_path / "evil.lmdb")
    with pytest.raises(pickle.UnpicklingError):
        data[0]
    good, report = validate_frames(data, policy="skip")
    assert good == [] and report.counts["unreadable"] == 1
    assert not marker.exists()


# --------------------------------------------------------------------------- HDF5 and convert


@needs_samples
def test_convert_legacy_lmdb_to_hdf5(tmp_path):
    out = tmp_path / "toy.h5"
    assert convert(LEGACY, out) == 101
    packed, legacy = HDF5Dataset(out), open_dataset(LEGACY)
    meta = packed.metadata
    assert meta["format"] == "est_calc-frames" and meta["n_frames"] == 101
    assert meta["n_atoms"] == sum(f.n_atoms for f in legacy)
    assert meta["source"] == str(LEGACY)
    for i in (0, 50, 100):
        assert_same_frame(packed[i], legacy[i])
    assert not list(tmp_path.glob("*.tmp"))


def test_hdf5_streams_in_chunks_and_is_atomic(tmp_path):
    frames = emt_frames() * 3
    frames[1] = replace(frames[1], energy=None, forces=None)
    out = tmp_path / "x.h5"
    assert write_hdf5(iter(frames), out, metadata={"note": "chunked"}, chunk_frames=5) == 12
    back = HDF5Dataset(out)
    assert back.metadata["metadata"] == {"note": "chunked"}
    for a, b in zip(frames, back, strict=True):
        assert_same_frame(a, b)

    def failing():
        yield frames[0]
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError):
        write_hdf5(failing(), out)
    assert len(HDF5Dataset(out)) == 12  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.h5"]


# --------------------------------------------------------------------------- validation, errors


def test_validate_frames_counts_every_problem():
    good = emt_frames()[0]
    n = good.n_atoms
    bad = [
        replace(good, energy=float("nan")),
        replace(good, forces=np.where(np.eye(n, 3) > 0, np.nan, good.forces)),
        replace(good, forces=None),
        replace(good, numbers=np.r_[good.numbers[:-1], 0]),
        replace(good, numbers=np.r_[good.numbers[:-1], 200]),
        replace(good, numbers=good.numbers[:-1]),
        replace(good, numbers=np.r_[good.numbers[:-1], 8]),  # O: not in allowed_species
    ]
    data = [good, *bad, good]
    with pytest.raises(ValueError, match="missing_forces=1") as err:
        validate_frames(data, policy="stop", allowed_species=[29])
    assert "kept 2 of 9" in str(err.value)
    kept, report = validate_frames(data, policy="skip", allowed_species=[29])
    assert kept == [0, 8]
    assert dict(report.counts) == {"nan_energy": 1, "nan_forces": 1, "missing_forces": 1,
                                   "unknown_element": 2, "length_mismatch": 1,
                                   "species_not_allowed": 1}
    assert report.n_dropped == 7
    kept, _ = validate_frames(data, policy="skip")  # O allowed without a species list
    assert kept == [0, 7, 8]


def test_hdf5_whole_array_validation_matches_frame_by_frame(tmp_path):
    good = emt_frames()[0]
    frames = [good, replace(good, energy=float("nan")), replace(good, forces=None),
              replace(good, energy=None),
              replace(good, positions=np.where(np.eye(good.n_atoms, 3) > 0, np.inf,
                                               good.positions)),
              replace(good, numbers=np.r_[good.numbers[:-1], 0]),
              replace(good, numbers=np.r_[good.numbers[:-1], 8]),
              replace(good, stress=np.full((3, 3), np.nan)), good]
    write_hdf5(frames, tmp_path / "bad.h5", chunk_frames=4)
    packed = HDF5Dataset(tmp_path / "bad.h5")
    for options in ({}, {"allowed_species": [29]}, {"require_energy": False}):
        fast = validate_frames(packed, policy="skip", **options)
        slow = validate_frames(list(packed), policy="skip", **options)
        assert fast[0] == slow[0] and fast[1].counts == slow[1].counts, options
    assert validate_frames(packed, policy="skip")[0] == [0, 6, 8]


def test_degenerate_periodic_cells_are_a_problem_kind(tmp_path):
    """A frame whose periodic lattice vectors are zero or linearly dependent is refused when
    the data are checked (frame by frame and on whole HDF5 arrays alike), by the same test the
    neighbour list applies; a zero vector along a non-periodic axis is fine."""
    from est_calc.neighbors import cell_problem

    good = emt_frames()[0]
    assert good.pbc.tolist() == [True, True, False]
    dependent = good.cell.copy()
    dependent[1] = 2 * dependent[0]
    open_z = good.cell.copy()
    open_z[2] = 0.0
    frames = [good, replace(good, cell=np.zeros((3, 3))), replace(good, cell=dependent),
              replace(good, cell=open_z)]
    kept, report = validate_frames(frames, policy="skip")
    assert kept == [0, 3] and dict(report.counts) == {"degenerate_cell": 2}
    write_hdf5(frames, tmp_path / "cells.h5")
    fast = validate_frames(HDF5Dataset(tmp_path / "cells.h5"), policy="skip")
    assert fast[0] == kept and fast[1].counts == report.counts
    assert [cell_problem(f.cell, f.pbc, 6.0) is None for f in frames] == [True, False, False,
                                                                          True]


def test_datasets_pickle_for_worker_processes(tmp_path):
    frames = emt_frames()
    for name in ("w.h5", "w.aselmdb", "w.db"):
        convert_frames(frames, tmp_path / name)
        data = open_dataset(tmp_path / name)
        data[0]  # open the handle, then make sure it is not what gets pickled
        clone = pickle.loads(pickle.dumps(data))
        assert_same_frame(clone[3], frames[3])


def test_missing_and_empty_paths_are_clear_errors(tmp_path):
    missing = tmp_path / "nope.extxyz"
    with pytest.raises(FileNotFoundError, match="nope.extxyz"):
        open_dataset(missing)
    with pytest.raises(ValueError, match="no data files"):
        open_dataset(tmp_path)
    (tmp_path / "empty.h5").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        open_dataset(tmp_path / "empty.h5")
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match="cannot tell the data format"):
        open_dataset(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="policy"):
        validate_frames([], policy="maybe")


def test_model_core_never_imports_training():
    root = Path(__file__).resolve().parents[2] / "est_calc"
    # the CLI sits above both and may wire training in; the model modules may not
    core = [p for p in root.rglob("*.py")
            if "training" not in p.relative_to(root).parts and p.name != "cli.py"]
    offenders = [p for p in core if "est_calc.training" in p.read_text()]
    assert offenders == []
