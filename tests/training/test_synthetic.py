"""Tests for the EMT synthetic OC20-style generator (est_calc.training.synthetic)."""

from __future__ import annotations

import argparse
import json

import ase.data
import ase.io
import numpy as np
import pytest
from ase.build import fcc100, fcc110, fcc111, molecule
from ase.calculators.emt import EMT
from ase.optimize import BFGS, FIRE

from est_calc.training import synthetic
from est_calc.training._synthetic_structures import DEFAULT_ADSORBATES_PATH, surface_site

pytestmark = pytest.mark.skipif(not DEFAULT_ADSORBATES_PATH.is_file(),
                                reason="OC20 adsorbate file not available")

SMALL = dict(n_systems=2, frames_per_system=4, progress=False)
HCNO = {"H", "C", "N", "O"}
METALS = set(synthetic.DEFAULT_METALS)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One small data set (seed 0) shared by the read-back tests."""
    out = tmp_path_factory.mktemp("syn_a")
    summary = synthetic.generate(out, seed=0, **SMALL)
    return out, summary


def _frames(out):
    return ase.io.read(out / "synthetic.extxyz", ":")


def _sidecar(out):
    rows = [line.strip().split(",") for line in (out / "synthetic.txt").read_text().splitlines()]
    return [(int(a[len("random"):]), int(b[len("frame"):]), float(c)) for a, b, c in rows]


def _kind(atoms) -> str:
    tags = atoms.get_tags()
    if not atoms.pbc.any():
        return "gas"
    return "adslab" if (tags == 0).any() else "bulk"


def test_same_seed_gives_identical_files_and_other_seed_differs(run, tmp_path):
    out_a, summary_a = run
    out_b = tmp_path / "b"
    summary_b = synthetic.generate(out_b, seed=0, **SMALL)
    for name in ("synthetic.extxyz", "synthetic.txt", "summary.json"):
        assert (out_a / name).read_bytes() == (out_b / name).read_bytes(), name
    from est_calc.training.datasets import open_dataset

    h5_a, h5_b = open_dataset(out_a / "synthetic.h5"), open_dataset(out_b / "synthetic.h5")
    assert len(h5_a) == len(h5_b) == summary_a["n_frames"] == summary_b["n_frames"]
    for fa, fb in zip(h5_a, h5_b):
        for key in ("positions", "numbers", "cell", "forces", "tags", "fixed"):
            assert getattr(fa, key).tobytes() == getattr(fb, key).tobytes(), key
        assert (fa.energy, fa.sid, fa.fid) == (fb.energy, fb.sid, fb.fid)

    out_c = tmp_path / "c"
    synthetic.generate(out_c, seed=1, include_bulk=False, include_gas=False, **SMALL)
    pos_a = [a.positions for a in _frames(out_a) if _kind(a) == "adslab"]
    pos_c = [a.positions for a in _frames(out_c)]
    assert not any(p.shape == q.shape and np.allclose(p, q) for p, q in zip(pos_a, pos_c))
    assert {s for s, _, _ in _sidecar(out_a)}.isdisjoint({s for s, _, _ in _sidecar(out_c)})


def test_tags_constraints_and_adsorbate_elements(run):
    out, _ = run
    n_adslab = 0
    for atoms in _frames(out):
        tags, symbols = atoms.get_tags(), np.array(atoms.get_chemical_symbols())
        fixed = np.zeros(len(atoms), bool)
        for c in atoms.constraints:
            fixed[c.get_indices()] = True
        kind = _kind(atoms)
        if kind == "adslab":
            n_adslab += 1
            assert np.array_equal(fixed, tags == 0)
            assert set(symbols[tags == 2]) <= HCNO and (tags == 2).any()
            assert set(symbols[tags != 2]) <= METALS
            # tag 1 is the top metal layer: above every subsurface atom
            z = atoms.positions[:, 2]
            assert z[tags == 1].min() > z[tags == 0].max() + 0.5
        elif kind == "bulk":
            assert not fixed.any() and set(tags) == {1} and set(symbols) <= METALS
        else:
            assert not fixed.any() and set(tags) == {2} and set(symbols) <= HCNO
    assert n_adslab == SMALL["n_systems"] * SMALL["frames_per_system"]


def test_labels_equal_emt_recomputed_on_written_structures(run):
    out, _ = run
    for atoms in _frames(out):
        energy = atoms.get_potential_energy()
        forces = atoms.calc.results["forces"]  # raw, fixed atoms included
        fresh = atoms.copy()
        fresh.calc = EMT()
        assert abs(fresh.get_potential_energy() - energy) < 1e-6
        np.testing.assert_allclose(fresh.get_forces(apply_constraint=False), forces, atol=1e-6)
        if _kind(atoms) == "bulk":
            stress = atoms.get_stress(voigt=False)
            assert np.abs(stress).max() > 1e-4  # strained cells are not at equilibrium
            np.testing.assert_allclose(fresh.get_stress(voigt=False), stress, atol=1e-6)
        else:
            assert "stress" not in atoms.calc.results


def test_force_filter_counts_dropped_frames(tmp_path):
    summary = synthetic.generate(tmp_path, seed=3, n_systems=2, frames_per_system=5,
                                 include_bulk=False, include_gas=False, formats=("extxyz",),
                                 max_force_eV_per_A=1.0, progress=False)
    assert summary["n_filtered"] > 0
    assert summary["n_frames"] + summary["n_filtered"] == 2 * 5
    assert sum(summary["filtered_by_kind"].values()) == summary["n_filtered"]
    written = _frames(tmp_path) if summary["n_frames"] else []
    assert len(written) == summary["n_frames"]
    for atoms in written:
        assert np.linalg.norm(atoms.calc.results["forces"], axis=1).max() <= 1.0


def test_default_threshold_and_summary(run):
    out, summary = run
    frames = _frames(out)
    for atoms in frames:
        assert np.linalg.norm(atoms.calc.results["forces"], axis=1).max() <= 50.0
    assert summary["n_frames"] == len(frames) == sum(summary["frames_by_kind"].values())
    n_expected = SMALL["n_systems"] * 4 + 1 * 4 + 8 * 2  # adslab, one bulk system, 8 gas systems
    assert summary["n_frames"] + summary["n_filtered"] == n_expected
    assert json.loads((out / "summary.json").read_text())["n_frames"] == summary["n_frames"]
    counts = {}
    for atoms in frames:
        for s in atoms.get_chemical_symbols():
            counts[s] = counts.get(s, 0) + 1
    assert counts == summary["elements"]


def test_gas_frames_and_references(run):
    out, summary = run
    gas = [a for a in _frames(out) if _kind(a) == "gas"]
    formulas = {a.get_chemical_formula() for a in gas}
    assert {"H2", "H2O", "CO", "N2"} <= formulas
    e = {}
    for name in ("H2", "H2O", "CO", "N2"):
        mol = molecule(name)
        mol.calc = EMT()
        BFGS(mol, logfile=None).run(fmax=1e-4, steps=500)
        e[name] = mol.get_potential_energy()
        # the first frame of each reference molecule is the relaxed one
        first = next(a for a in gas if a.get_chemical_formula() == name)
        assert first.get_potential_energy() == pytest.approx(e[name], abs=1e-5)
        assert summary["gas_energies_eV"][name] == pytest.approx(e[name], abs=1e-5)
    mu = summary["gas_references_eV"]
    assert mu["H"] == pytest.approx(e["H2"] / 2, abs=1e-5)
    assert mu["O"] == pytest.approx(e["H2O"] - e["H2"], abs=1e-5)
    assert mu["C"] == pytest.approx(e["CO"] - e["H2O"] + e["H2"], abs=1e-5)
    assert mu["N"] == pytest.approx(e["N2"] / 2, abs=1e-5)


def test_reference_energy_is_relaxed_clean_slab_plus_gas_references(run):
    out, summary = run
    mu = summary["gas_references_eV"]
    rows = _sidecar(out)
    seen = set()
    for atoms, (sid, fid, ref) in zip(_frames(out), rows):
        if _kind(atoms) != "adslab":
            assert ref == 0.0
            continue
        if sid in seen:
            continue
        seen.add(sid)
        tags = atoms.get_tags()
        slab = atoms[tags != 2]
        slab.calc = EMT()
        FIRE(slab, logfile=None).run(fmax=0.02, steps=300)
        gas = sum(mu[s] for s in np.array(atoms.get_chemical_symbols())[tags == 2])
        # the clean slab relaxed again from the adsorbate-perturbed geometry: same basin
        assert ref - gas == pytest.approx(slab.get_potential_energy(), abs=0.1)
    assert len(seen) == SMALL["n_systems"]


def test_open_dataset_reads_every_format_with_ids(run):
    from est_calc.training.datasets import open_dataset

    out, summary = run
    rows = _sidecar(out)
    for name in ("synthetic.extxyz", "synthetic.aselmdb", "synthetic.h5"):
        data = open_dataset(out / name)
        assert len(data) == summary["n_frames"]
        for frame, (sid, fid, ref) in zip(data, rows):
            assert (frame.sid, frame.fid) == (sid, fid)
            assert frame.reference_energy == pytest.approx(ref, abs=1e-9)
    sids = [r[0] for r in rows]
    assert len(set(sids)) == summary["n_systems"]  # one id per system, fids restart per system


def test_holdout_options_restrict_metals_facet_and_adsorbates(tmp_path):
    summary = synthetic.generate(tmp_path, seed=5, n_systems=2, frames_per_system=3,
                                 metals=("Cu", "Pd"), alloys_only=True, facets=("110",),
                                 adsorbates=["*CO", "*OH"], include_bulk=False,
                                 include_gas=False, formats=("hdf5",), progress=False)
    from est_calc.training.datasets import open_dataset

    data = open_dataset(tmp_path / "synthetic.h5")
    assert len(data) == summary["n_frames"] > 0
    for frame in data:
        symbols = set(np.array(ase.data.chemical_symbols)[frame.numbers[frame.tags != 2]])
        assert symbols == {"Cu", "Pd"}  # every slab is a Cu-Pd alloy
        ads = sorted(np.array(ase.data.chemical_symbols)[frame.numbers[frame.tags == 2]])
        assert ads in (["C", "O"], ["H", "O"])
        a, b = np.linalg.norm(frame.cell[:2], axis=1)
        assert a / b == pytest.approx(np.sqrt(2), rel=1e-6)  # fcc(110): [001] x [1-10] cell
        assert frame.extra["facet"] == "110"


def test_ternary_alloys_hold_three_metals_and_bad_counts_raise(tmp_path):
    summary = synthetic.generate(tmp_path, seed=6, n_systems=2, frames_per_system=2,
                                 alloys_only=True, alloy_components=3, include_gas=False,
                                 include_bulk=True, formats=("hdf5",), progress=False)
    from est_calc.training.datasets import open_dataset

    data = open_dataset(tmp_path / "synthetic.h5")
    assert len(data) == summary["n_frames"] > 0
    metals = set(synthetic.DEFAULT_METALS)
    for frame in data:
        present = set(np.array(ase.data.chemical_symbols)[frame.numbers]) & metals
        assert len(present) == 3, present  # every slab and bulk cell is a ternary alloy
    with pytest.raises(ValueError, match="alloy_components"):
        synthetic.generate(tmp_path / "x", seed=0, n_systems=1, alloy_components=4,
                           progress=False)
    with pytest.raises(ValueError, match="three metals"):
        synthetic.generate(tmp_path / "y", seed=0, n_systems=1, alloy_components=3,
                           metals=("Cu", "Pd"), progress=False)


@pytest.mark.parametrize("builder, n_hollow_neighbours", [(fcc111, 3), (fcc100, 4), (fcc110, 4)])
def test_surface_sites_have_the_right_coordination(builder, n_hollow_neighbours):
    slab = builder("Cu", size=(3, 3, 3), a=3.6, vacuum=8.0, periodic=True)
    slab.set_tags(np.where(slab.get_tags() == 1, 1, 0))
    top = slab.positions[slab.get_tags() == 1]
    shifts = np.array([(p, q, 0) for p in (-1, 0, 1) for q in (-1, 0, 1)]) @ slab.cell.array
    images = (top[None] + shifts[:, None]).reshape(-1, 3)[:, :2]
    d_nn = 3.6 / np.sqrt(2)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(60):
        kind, xy = surface_site(slab, rng)
        seen.add(kind)
        dist = np.sort(np.linalg.norm(images - xy, axis=1))
        if kind == "ontop":
            assert dist[0] < 1e-9
        elif kind == "bridge":
            assert dist[:2] == pytest.approx([d_nn / 2] * 2, rel=1e-6)
        else:
            assert dist[0] > 0.5 * d_nn
            # equidistant from its 3 (triangle) or 4 (rectangle) corners
            n = n_hollow_neighbours
            assert dist[n - 1] - dist[0] < 1e-6 or builder is fcc110
    assert seen == {"ontop", "bridge", "hollow"}


def test_bad_inputs_raise(tmp_path):
    with pytest.raises(ValueError, match="metals"):
        synthetic.generate(tmp_path, n_systems=1, seed=0, metals=("Fe",), progress=False)
    with pytest.raises(ValueError, match="facets"):
        synthetic.generate(tmp_path, n_systems=1, seed=0, facets=("211",), progress=False)
    with pytest.raises(ValueError, match="alloys_only"):
        synthetic.generate(tmp_path, n_systems=1, seed=0, metals=("Cu",), alloys_only=True)
    with pytest.raises(ValueError, match="unknown adsorbates"):
        synthetic.generate(tmp_path, n_systems=1, seed=0, adsorbates=["*XYZ"])
    with pytest.raises(ValueError, match="formats"):
        synthetic.generate(tmp_path, n_systems=1, seed=0, formats=("cif",))
    with pytest.raises(FileNotFoundError, match="adsorbate"):
        synthetic.generate(tmp_path, n_systems=1, seed=0, adsorbates_path=tmp_path / "none")


def test_cli_prints_summary_table(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="est")
    synthetic.add_generate_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["generate", str(tmp_path / "cli"), "--n-systems", "1", "--seed", "2",
                              "--frames-per-system", "2", "--formats", "extxyz", "--no-bulk",
                              "--no-gas", "--facets", "100", "--quiet"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "frames kept" in text and "filtered" in text and "synthetic.extxyz" in text
    assert (tmp_path / "cli" / "synthetic.txt").is_file()


@pytest.mark.parametrize("metal", ["Cu", "Pt", "Al"])
def test_emt_lattice_constant_is_the_emt_equilibrium(metal):
    from ase.build import bulk

    a = synthetic.emt_lattice_constant(metal)
    energies = []
    for scale in (0.99, 1.0, 1.01):
        cell = bulk(metal, "fcc", a=a * scale)
        cell.calc = EMT()
        energies.append(cell.get_potential_energy())
        if scale == 1.0:
            assert np.abs(cell.get_stress()[:3]).max() < 1e-6  # zero pressure, eV/A^3
    assert energies[1] < min(energies[0], energies[2])
