"""Training on molecules (the real-DFT sets): isolated-atom references, the optimiser and
second-stage loss weights, a boxed molecule costing the same as a free one, RMSE metrics and
the progress line."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from est_calc import ESTCalculator
from est_calc.model import ModelConfig
from est_calc.neighbors import build_graph
from est_calc.training.batching import collate
from est_calc.training.config import TrainConfig, isolated_atom_energies
from est_calc.training.datasets import frame_from_atoms
from est_calc.training.metrics import S2EFMetrics
from est_calc.training.trainer import Trainer

# Isolated-atom energies of the 3BPA set's level of theory (eV); any numbers would do.
E0 = {"H": -13.587222780835477, "C": -1029.4889999855063, "O": -2041.9816003861047}


def _ethanol_frames(n: int, seed: int, box: bool = False):
    """Rattled ethanol with made-up DFT-like labels: a harmonic energy around the start plus
    the isolated-atom energies and a binding energy (so the references matter)."""
    rng = np.random.default_rng(seed)
    base = molecule("CH3CH2OH")
    frames = []
    for _ in range(n):
        a = base.copy()
        d = rng.normal(scale=0.05, size=a.positions.shape)
        a.positions += d
        e = sum(E0[s] for s in a.get_chemical_symbols()) - 35.0 + 2.0 * float((d**2).sum())
        if box:
            a.cell = [50.0, 50.0, 50.0]
            a.pbc = False
        a.calc = SinglePointCalculator(a, energy=e, forces=-4.0 * d)
        frames.append(a)
    return frames


@pytest.fixture(scope="module")
def mol_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("molecules")
    write(d / "train.xyz", _ethanol_frames(12, 0))
    write(d / "val.xyz", _ethanol_frames(4, 1))
    iso = []
    for s, e in E0.items():
        a = Atoms(s, positions=[[0, 0, 0]], cell=[50, 50, 50], pbc=False)
        a.calc = SinglePointCalculator(a, energy=e)
        iso.append(a)
    write(d / "iso.xyz", iso)
    return d


def _cfg(d: Path, out: Path, *, data=None, loss=None, **train) -> TrainConfig:
    t = {"max_steps": 8, "batch_size": 4, "eval_every": 4, "checkpoint_every": 4,
         "log_every": 1, "dtype": "float64", "device": "cpu", "progress": False,
         "warmup_steps": 1, "lr": 5e-3, "neighbor_backend": "torch"}
    t.update(train)
    return TrainConfig.from_dict({
        "output_dir": str(out),
        "data": {"train": str(d / "train.xyz"), "val": str(d / "val.xyz"),
                 "isolated_atoms": str(d / "iso.xyz"), **(data or {})},
        "model": {"preset": "tiny", "overrides": {"cutoff_A": 5.0}},
        "loss": loss or {},
        "train": t,
    })


def test_isolated_atom_energies_from_file_and_mapping(mol_data):
    from ase.data import atomic_numbers

    from_file = isolated_atom_energies(str(mol_data / "iso.xyz"))
    assert from_file == {atomic_numbers[s]: e for s, e in E0.items()}
    assert isolated_atom_energies({"H": -1.0, 8: -2.0}) == {1: -1.0, 8: -2.0}
    for bad, words in (({"Xx": 1.0}, "not an element"), ({"H": float("nan")}, "finite"),
                       ({"H": "many"}, "finite")):
        with pytest.raises(ValueError, match=words):
            isolated_atom_energies(bad)


def test_isolated_atoms_are_the_references_and_the_dissociation_limit(mol_data, tmp_path):
    """With data.isolated_atoms, element_reference holds those energies exactly, so a lone
    atom of the trained potential has its DFT isolated energy and zero force."""
    trainer = Trainer(_cfg(mol_data, tmp_path / "run"))
    path = trainer.fit()
    ref = trainer.potential.model.element_reference
    for s, e in E0.items():
        from ase.data import atomic_numbers

        assert float(ref[atomic_numbers[s]]) == pytest.approx(e, abs=1e-9)
    calc = ESTCalculator(model=str(path), dtype="float64", device="cpu")
    for s, e in E0.items():
        a = Atoms(s, positions=[[0, 0, 0]])
        a.calc = calc
        # trained in float64, exported in float64: the reference exactly
        assert a.get_potential_energy() == pytest.approx(e, abs=1e-9)
        assert np.abs(a.get_forces()).max() == 0.0
    # An O-H pair pulled apart beyond the cutoff ends at the sum of the isolated energies.
    oh = Atoms("OH", positions=[[0, 0, 0], [0, 0, 5.5]])
    oh.calc = calc
    assert oh.get_potential_energy() == pytest.approx(E0["O"] + E0["H"], abs=1e-9)


def test_least_squares_references_without_isolated_atoms(mol_data, tmp_path):
    cfg = _cfg(mol_data, tmp_path / "run", data={"isolated_atoms": None})
    trainer = Trainer(cfg)
    ref = trainer.potential.model.element_reference
    # Every frame has 2 C, 6 H, 1 O: least squares spreads the mean energy, not the E0s.
    assert abs(float(ref[6]) - E0["C"]) > 1.0


def test_missing_isolated_atom_is_refused(mol_data, tmp_path):
    cfg = _cfg(mol_data, tmp_path / "run", data={"isolated_atoms": {"H": -13.6, "C": -1029.5}})
    with pytest.raises(ValueError, match=r"no energy for \['O'\]"):
        Trainer(cfg)


@pytest.mark.parametrize("key,value,words", [
    ("loss.stage_two_start", 1.5, "loss.stage_two_start must be a number in"),
    ("loss.stage_two_energy_weight", -1, "loss.stage_two_energy_weight must be"),
    ("train.optimizer", "sgd", "train.optimizer must be one of"),
    ("train.amsgrad", "yes", "train.amsgrad must be true or false"),
    ("data.isolated_atoms", {"Qq": 1.0}, "not an element"),
])
def test_bad_molecule_training_values(mol_data, tmp_path, key, value, words):
    raw = _cfg(mol_data, tmp_path / "run").to_dict()
    section, name = key.split(".")
    raw[section][name] = value
    with pytest.raises(ValueError, match=words):
        TrainConfig.from_dict(raw).validate()


def test_isolated_atoms_file_must_exist(mol_data, tmp_path):
    cfg = _cfg(mol_data, tmp_path / "run", data={"isolated_atoms": str(tmp_path / "none.xyz")})
    with pytest.raises(FileNotFoundError, match="data.isolated_atoms: no such file"):
        Trainer(cfg)


def test_amsgrad_and_second_stage_weights(mol_data, tmp_path):
    cfg = _cfg(mol_data, tmp_path / "run", optimizer="adam", amsgrad=True, max_steps=8,
               loss={"energy_weight": 1.0, "force_weight": 1000.0, "stage_two_start": 0.75,
                     "stage_two_energy_weight": 1000.0, "stage_two_force_weight": 100.0})
    trainer = Trainer(cfg)
    assert isinstance(trainer.optimizer, torch.optim.Adam)
    assert not isinstance(trainer.optimizer, torch.optim.AdamW)
    assert trainer.optimizer.param_groups[0]["amsgrad"] is True
    seen = []
    while trainer.step < 8:
        seen.append(trainer.loss_weights())
        trainer.train_step()
    # steps 0-5 (< 0.75 * 8) in stage one, 6 and 7 in stage two
    assert seen == [(1.0, 1000.0)] * 6 + [(1000.0, 100.0)] * 2


def test_boxed_molecule_costs_what_a_free_one_does(make_potential):
    """A molecule in a 50 Å box with pbc False gives the same graph (the same edges, all
    shifts zero: no periodic image is looked at) and the same energy and forces as the free
    molecule, so the box costs nothing."""
    from est_calc.forces import energy_forces_stress

    free = _ethanol_frames(3, 2)
    boxed = _ethanol_frames(3, 2, box=True)
    assert boxed[0].cell.volume == pytest.approx(125000.0) and not boxed[0].pbc.any()
    fb, _ = collate([frame_from_atoms(a) for a in free], "total", "cpu", torch.float64)
    bb, _ = collate([frame_from_atoms(a) for a in boxed], "total", "cpu", torch.float64)
    pot = make_potential(message="so2", cutoff_A=5.0)
    for backend in ("torch", "auto"):
        g_free = build_graph(fb, 5.0, backend=backend, paired=True)
        g_box = build_graph(bb, 5.0, backend=backend, paired=True)
        assert torch.equal(g_free.edge_index, g_box.edge_index)
        assert not g_box.shifts.any()
        p_free = energy_forces_stress(pot, fb, g_free)
        p_box = energy_forces_stress(pot, bb, g_box)
        torch.testing.assert_close(p_box.energy, p_free.energy, rtol=0, atol=1e-12)
        torch.testing.assert_close(p_box.forces, p_free.forces, rtol=0, atol=1e-12)


def test_rmse_metrics():
    m = S2EFMetrics(free_atoms_only=False)
    ep, et = torch.tensor([1.0, 2.0]), torch.tensor([1.5, 1.0])
    fp = torch.tensor([[0.0, 0.0, 3.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    ft = torch.zeros(3, 3)
    m.update(ep, et, fp, ft, torch.tensor([0, 0, 1]), None, torch.tensor([2, 1]))
    got = m.compute()
    assert got["energy_rmse"] == pytest.approx(np.sqrt((0.25 + 1.0) / 2))
    assert got["energy_per_atom_rmse"] == pytest.approx(np.sqrt((0.0625 + 1.0) / 2))
    assert got["forces_rmse"] == pytest.approx(np.sqrt(10.0 / 9))


def test_progress_line_has_rate_and_rmse(mol_data, tmp_path, caplog):
    trainer = Trainer(_cfg(mol_data, tmp_path / "run"))
    with caplog.at_level(logging.INFO, logger="est_calc.training.trainer"):
        trainer.fit()
    lines = [r.getMessage() for r in caplog.records if "steps/s" in r.getMessage()]
    assert len(lines) == 2  # steps 4 and 8
    assert "val energy RMSE" in lines[-1] and "force RMSE" in lines[-1]
    rows = [h for h in trainer.history if "val_forces_rmse" in h]
    assert [r["step"] for r in rows] == [4, 8]
    assert 0 < rows[0]["elapsed_s"] <= rows[1]["elapsed_s"]


def test_molecule_preset():
    cfg = ModelConfig.preset("molecule")
    assert cfg.cutoff_A == 5.0 and cfg.n_layers == 2
