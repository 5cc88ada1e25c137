"""No silent wrong answers in training and evaluation: unknown elements, occupied output
folders, bad config values, file modes and temporary files, unreadable or malicious input."""

from __future__ import annotations

import os
import pickle
import stat

import numpy as np
import pytest
import torch
import yaml
from ase.build import bulk
from ase.calculators.emt import EMT

from est_calc.cli import main
from est_calc.potential import Potential, save_potential
from est_calc.training.config import load_config
from est_calc.training.datasets import frame_from_atoms, write_extxyz_with_sidecar, write_hdf5

TRAIN = {"max_steps": 1, "batch_size": 2, "eval_every": 1, "checkpoint_every": 1, "log_every": 1,
         "device": "cpu", "dtype": "float64", "progress": False, "neighbor_backend": "torch",
         "warmup_steps": 0}


def _frames(elements, seed=0):
    """One rattled 4-atom fcc cell per entry; an entry "CuNi" swaps the last atom for Ni."""
    out = []
    for k, name in enumerate(elements):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        if name == "CuNi":
            atoms.numbers[-1] = 28
        atoms.rattle(0.05, seed=seed * 100 + k)
        atoms.calc = EMT()
        atoms.get_potential_energy()
        out.append(frame_from_atoms(atoms, sid=k, fid=0))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("refusals")
    write_extxyz_with_sidecar(_frames(["Cu"] * 4, 1), d / "cu.extxyz")
    write_extxyz_with_sidecar(_frames(["Cu", "Cu", "CuNi", "Cu"], 2), d / "with_ni.extxyz")
    write_hdf5(_frames(["Cu", "CuNi"], 3), d / "with_ni.h5")
    save_potential(Potential.from_config("tiny", species=[29]), d / "cu_only.pt")
    return d


def _config(tmp_path, folder, **sections) -> dict:
    cfg = {"output_dir": str(tmp_path / "run"),
           "data": {"train": str(folder / "cu.extxyz"), "val": str(folder / "cu.extxyz")},
           "model": {"preset": "tiny"}, "train": dict(TRAIN)}
    for key, value in sections.items():
        cfg[key].update(value) if isinstance(value, dict) else cfg.__setitem__(key, value)
    return cfg


def _write(tmp_path, cfg, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _one_line_error(capsys, *fragments):
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return captured


# ----------------------------------------------------------------------------- unknown elements
def test_eval_refuses_elements_the_potential_does_not_know(data, capsys):
    rc = main(["eval", str(data / "cu_only.pt"), str(data / "with_ni.extxyz"),
               "--dtype", "float64"])
    captured = _one_line_error(capsys, "Ni", "frame 2", "with_ni.extxyz")
    assert rc == 2 and "energy MAE" not in captured.out
    # the packed HDF5 reader (whole-array path) names the frame too
    assert main(["eval", str(data / "cu_only.pt"), str(data / "with_ni.h5")]) == 2
    _one_line_error(capsys, "Ni", "frame 1", "with_ni.h5")


def test_evaluate_refuses_unknown_elements(data):
    from est_calc.potential import load_potential
    from est_calc.training.trainer import evaluate

    pot = load_potential(data / "cu_only.pt", dtype=torch.float64)
    frames = _frames(["Cu", "CuNi"])
    with pytest.raises(ValueError, match=r"Ni.*frame 1"):
        evaluate(pot, frames)


def test_training_refuses_validation_elements_absent_from_training(data, tmp_path):
    from est_calc.training.config import TrainConfig
    from est_calc.training.trainer import Trainer

    cfg = TrainConfig.from_dict(_config(tmp_path, data, data={"val": str(data / "with_ni.extxyz")}))
    with pytest.raises(ValueError) as err:
        Trainer(cfg)
    text = str(err.value)
    assert "Ni" in text and "frame 2" in text and "with_ni.extxyz" in text and "validation" in text
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_fine_tuning_refuses_training_data_with_unknown_elements(data, tmp_path):
    from est_calc.training.config import TrainConfig
    from est_calc.training.trainer import Trainer

    with_ni = {"train": str(data / "with_ni.extxyz")}
    cfg = TrainConfig.from_dict(_config(tmp_path, data, data=with_ni))
    with pytest.raises(ValueError) as err:
        Trainer(cfg, init=str(data / "cu_only.pt"))
    text = str(err.value)
    assert "Ni" in text and "frame 2" in text and "with_ni.extxyz" in text
    # an init potential that knows the training elements but not the validation ones
    cfg = TrainConfig.from_dict(_config(tmp_path, data, data={"val": str(data / "with_ni.h5")}))
    with pytest.raises(ValueError, match=r"Ni.*frame 1.*with_ni\.h5"):
        Trainer(cfg, init=str(data / "cu_only.pt"))


def test_resume_refuses_training_data_with_elements_the_checkpoint_does_not_know(data, tmp_path):
    from est_calc.training.config import TrainConfig
    from est_calc.training.trainer import Trainer

    Trainer(TrainConfig.from_dict(_config(tmp_path, data))).fit()
    with_ni = {"train": str(data / "with_ni.extxyz")}
    cfg = TrainConfig.from_dict(_config(tmp_path, data, data=with_ni, train={"max_steps": 2}))
    with pytest.raises(ValueError, match=r"Ni.*frame 2.*with_ni\.extxyz"):
        Trainer(cfg, resume=True)


# ----------------------------------------------------------------------------- output folder
def test_train_refuses_an_output_folder_holding_a_run(data, tmp_path, capsys):
    path = _write(tmp_path, _config(tmp_path, data))
    assert main(["train", str(path)]) == 0
    run = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert {"checkpoint.pt", "potential.pt", "metrics.csv"} <= set(before)
    capsys.readouterr()
    assert main(["train", str(path), "--set", "train.max_steps=2"]) == 2
    _one_line_error(capsys, str(run), "--resume", "--overwrite")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing touched

    # any one of the run's files is enough to refuse
    (run / "checkpoint.pt").unlink()
    (run / "metrics.csv").unlink()
    assert main(["train", str(path)]) == 2
    _one_line_error(capsys, "potential.pt")

    # --overwrite replaces the run's own files and leaves everything else alone
    (run / "notes.txt").write_text("mine")
    (run / "metrics.csv").write_text("stale")
    assert main(["train", str(path), "--overwrite", "--set", "train.max_steps=2"]) == 0
    assert (run / "notes.txt").read_text() == "mine"
    assert (run / "metrics.csv").read_text() != "stale"
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2

    # --resume and --overwrite contradict each other
    with pytest.raises(SystemExit):
        main(["train", str(path), "--resume", "--overwrite"])


def test_overwrite_removes_the_old_runs_files_before_training(data, tmp_path):
    """An overwritten run that stops early leaves no file of the old run beside its own."""
    from est_calc.training.config import TrainConfig
    from est_calc.training.trainer import Trainer

    cfg = TrainConfig.from_dict(_config(tmp_path, data))
    assert Trainer(cfg).fit() is not None
    assert (tmp_path / "run" / "potential.pt").exists()
    again = Trainer(TrainConfig.from_dict(_config(tmp_path, data, train={"max_steps": 3})),
                    overwrite=True)
    assert again.fit(stop_at_step=1) is None
    assert not (tmp_path / "run" / "potential.pt").exists()


# ----------------------------------------------------------------------------- config values
BAD_VALUES = [
    ("train.ema_decay", "2", "[0, 1)"),
    ("train.ema_decay", "-0.1", "[0, 1)"),
    ("train.ema_decay", "1", "[0, 1)"),
    ("train.max_steps", "2.5", "positive integer"),
    ("train.max_steps", "0", "positive integer"),
    ("train.max_steps", "true", "positive integer"),
    ("train.batch_size", "-1", "positive integer"),
    ("train.eval_every", "0", "positive integer"),
    ("train.checkpoint_every", "0", "positive integer"),
    ("train.log_every", "0", "positive integer"),
    ("train.warmup_steps", "-1", "non-negative integer"),
    ("train.seed", "-3", "non-negative integer"),
    ("train.lr", "abc", "number"),
    ("train.lr", "-1e-3", "number"),
    ("train.lr", ".nan", "number"),
    ("train.min_lr_ratio", "1.5", "[0, 1]"),
    ("train.weight_decay", "-0.1", "number"),
    ("train.grad_clip", "0", "positive"),
    ("train.dtype", "float16", "float32"),
    ("train.device", "gpu0", "cpu"),
    ("train.neighbor_backend", "fast", "torch"),
    ("train.progress", "maybe", "true or false"),
    ("train.compile", "fast", "true or false"),
    ("train.init", "3", "path"),
    ("train.time_budget_s", "-5", "positive"),
    ("train.time_budget_s", ".inf", "positive"),
    ("data.energy", "raw", "total"),
    ("data.bad_frames", "ignore", "stop"),
    ("data.max_train_frames", "0", "positive integer"),
    ("data.max_val_frames", "1.5", "positive integer"),
    ("data.val", "[]", "path"),
    ("loss.kind", "l3", "huber"),
    ("loss.energy_weight", "-1", "non-negative"),
    ("loss.force_weight", "abc", "non-negative"),
    ("loss.stress_weight", ".inf", "non-negative"),
    ("loss.huber_delta", "0", "positive"),
    ("loss.forces_on_free_atoms", "2", "true or false"),
    ("model.preset", "huge", "tiny"),
    ("model.overrides", "3", "mapping"),
    ("model.overrides", "{chanels: 8}", "chanels"),
    ("model.overrides", "{channels: -8}", "channels"),
    ("output_dir", "''", "output_dir"),
    ("output_dir", "7", "output_dir"),
]


@pytest.mark.parametrize("key,value,expected", BAD_VALUES)
def test_config_values_are_checked_with_a_one_line_message(tmp_path, key, value, expected):
    path = tmp_path / "c.yaml"
    path.write_text("data: {train: a.h5}\n")
    with pytest.raises(ValueError) as err:
        load_config(path, [f"{key}={value}"])
    text = str(err.value)
    assert len(text.splitlines()) == 1, text
    assert key in text and expected in text, text


def test_all_loss_weights_zero_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {train: a.h5}\nloss: {energy_weight: 0, force_weight: 0}\n")
    with pytest.raises(ValueError, match="loss"):
        load_config(path)


def test_numbers_yaml_reads_as_text_are_taken_as_numbers(tmp_path):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string: a number field takes it as the number."""
    path = tmp_path / "c.yaml"
    path.write_text("data: {train: a.h5}\ntrain: {lr: 1e-3, time_budget_s: 60}\n")
    cfg = load_config(path, ["train.weight_decay=1e-5"])
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == pytest.approx(1e-5)


def test_bad_config_value_on_the_command_line_is_one_line(data, tmp_path, capsys):
    path = _write(tmp_path, _config(tmp_path, data))
    assert main(["train", str(path), "--set", "train.ema_decay=2"]) == 2
    _one_line_error(capsys, "train.ema_decay", "2")
    assert not (tmp_path / "run").exists()


def test_data_and_init_paths_must_exist_before_any_work(data, tmp_path):
    from est_calc.training.config import TrainConfig
    from est_calc.training.trainer import Trainer

    cfg = TrainConfig.from_dict(_config(tmp_path, data, data={"val": str(tmp_path / "nope.h5")}))
    with pytest.raises(FileNotFoundError, match=r"data\.val.*nope\.h5"):
        Trainer(cfg)
    cfg = TrainConfig.from_dict(_config(tmp_path, data, train={"init": str(tmp_path / "gone.pt")}))
    with pytest.raises(FileNotFoundError, match=r"gone\.pt"):
        Trainer(cfg)
    (tmp_path / "file").write_text("x")
    cfg = TrainConfig.from_dict(_config(tmp_path, data, output_dir=str(tmp_path / "file")))
    with pytest.raises(ValueError, match="output_dir"):
        Trainer(cfg)


# ----------------------------------------------------------------------------- files written
@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o644
    os.umask(old)


def test_potentials_and_checkpoints_get_the_umask_mode(tmp_path, umask_022):
    from est_calc.training.checkpoint import save_checkpoint

    save_potential(Potential.from_config("tiny", species=[29]), tmp_path / "p.pt")
    save_checkpoint(tmp_path / "c.pt", {"step": 0})
    for name in ("p.pt", "c.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == umask_022, name
    os.umask(0o077)
    save_checkpoint(tmp_path / "c.pt", {"step": 1})
    assert stat.S_IMODE((tmp_path / "c.pt").stat().st_mode) == 0o600


def test_a_failed_save_leaves_no_temporary_file(tmp_path):
    from est_calc.atomic_io import atomic_torch_save

    (tmp_path / "c.pt").write_bytes(b"old")
    with pytest.raises(Exception):
        atomic_torch_save({"f": lambda: 0}, tmp_path / "c.pt")  # lambdas do not pickle
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
    assert (tmp_path / "c.pt").read_bytes() == b"old"


def test_trainer_removes_stale_temporary_files_of_its_outputs(data, tmp_path):
    from est_calc.training.config import TrainConfig
    from est_calc.training.trainer import Trainer

    run = tmp_path / "run"
    run.mkdir()
    stale = [".checkpoint.pt.k2j3h4.tmp", ".potential.pt.x81.tmp", "metrics.csv.tmp",
             "learning_curves.png.tmp.png"]
    keep = [".notes.txt.abc.tmp", "mine.tmp", ".checkpoint.ptx.tmp"]
    for name in stale + keep:
        (run / name).write_bytes(b"junk")
    Trainer(TrainConfig.from_dict(_config(tmp_path, data)))
    assert sorted(p.name for p in run.iterdir()) == sorted(keep)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated"])
def test_damaged_checkpoint_on_resume_is_a_one_line_error_naming_it(data, tmp_path, capsys,
                                                                   content):
    path = _write(tmp_path, _config(tmp_path, data))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(content)
    assert main(["train", str(path), "--resume"]) == 2
    _one_line_error(capsys, "checkpoint.pt")


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", None])
def test_damaged_potential_is_a_one_line_error_naming_it(data, tmp_path, capsys, content):
    if content is None:
        (tmp_path / "p.pt").mkdir()  # a folder where the potential should be
    else:
        (tmp_path / "p.pt").write_bytes(content)
    assert main(["eval", str(tmp_path / "p.pt"), str(data / "cu.extxyz")]) == 2
    _one_line_error(capsys, "p.pt")


# ----------------------------------------------------------------------------- unreadable input
class _Boom:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


def _evil_lmdb(path, marker, key=b"0"):
    import lmdb

    env = lmdb.open(str(path), subdir=False, map_size=2**24)
    with env.begin(write=True) as txn:
        txn.put(key, pickle.dumps(_Boom(os.system, f"touch {marker}")))
        if key != b"0":
            txn.put(b"0", pickle.dumps(0))
    env.close()
    return path


@pytest.mark.parametrize("key", [b"0", b"length"])
def test_convert_refuses_a_malicious_legacy_lmdb_in_one_line(tmp_path, capsys, key):
    marker = tmp_path / "pwned"
    evil = _evil_lmdb(tmp_path / "evil.lmdb", marker, key)
    assert main(["convert", str(evil), str(tmp_path / "out.h5")]) == 2
    _one_line_error(capsys, "evil.lmdb", "system")
    assert not marker.exists()
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith("-lock"))
    assert left == ["evil.lmdb"]  # no output, no temporary file


def test_eval_and_train_name_the_refused_object_of_a_malicious_lmdb(data, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = _evil_lmdb(tmp_path / "evil.lmdb", marker)
    assert main(["eval", str(data / "cu_only.pt"), str(evil)]) == 2
    _one_line_error(capsys, "evil.lmdb", "system")
    path = _write(tmp_path, _config(tmp_path, data, data={"train": str(evil), "val": None}))
    assert main(["train", str(path)]) == 2
    _one_line_error(capsys, "evil.lmdb", "system")
    assert not marker.exists()


def _bad_paths(tmp_path):
    (tmp_path / "empty.extxyz").write_bytes(b"")
    (tmp_path / "folder.h5").mkdir()
    (tmp_path / "garbage.h5").write_bytes(b"\x00not an hdf5 file" * 10)
    (tmp_path / "garbage.aselmdb").write_bytes(b"\x00not an lmdb" * 10)
    (tmp_path / "garbage.db").write_bytes(b"\x00not sqlite" * 10)
    (tmp_path / "cut.extxyz").write_text("5\nLattice=\"1 0 0 0 1 0 0 0 1\"\nCu 0 0 0\n")
    return ["missing.extxyz", "empty.extxyz", "folder.h5", "garbage.h5", "garbage.aselmdb",
            "garbage.db", "cut.extxyz"]


@pytest.mark.parametrize("command", ["eval", "convert", "train"])
def test_bad_data_paths_are_one_line_errors(data, tmp_path, capsys, command):
    for name in _bad_paths(tmp_path):
        bad = str(tmp_path / name)
        if command == "eval":
            argv = ["eval", str(data / "cu_only.pt"), bad]
        elif command == "convert":
            argv = ["convert", bad, str(tmp_path / "out.h5")]
        else:
            cfg = _config(tmp_path, data, data={"train": bad, "val": None})
            argv = ["train", str(_write(tmp_path, cfg))]
        assert main(argv) == 2, name
        _one_line_error(capsys, name)
    assert not (tmp_path / "out.h5").exists()


def test_unreadable_data_is_a_one_line_error(data, tmp_path, capsys, monkeypatch):
    from est_calc.training import datasets

    def denied(path, **options):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setitem(datasets._READERS, "extxyz", denied)
    assert main(["convert", str(data / "cu.extxyz"), str(tmp_path / "o.h5")]) == 2
    _one_line_error(capsys, "cu.extxyz", "ermission")


@pytest.mark.parametrize("kind", ["missing", "folder", "empty", "bad_yaml", "not_a_mapping"])
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, kind):
    path = tmp_path / "c.yaml"
    if kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.write_text("")
    elif kind == "bad_yaml":
        path.write_text("train: {max_steps: 3\ndata: [\n")
    elif kind == "not_a_mapping":
        path.write_text("- a\n- b\n")
    assert main(["train", str(path)]) == 2
    _one_line_error(capsys, "c.yaml")


def test_convert_into_a_missing_folder_is_a_one_line_error(data, tmp_path, capsys):
    assert main(["convert", str(data / "cu.extxyz"), str(tmp_path / "no" / "such" / "o.h5")]) == 2
    _one_line_error(capsys, "o.h5")


@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--max-frames", "0")])
def test_eval_options_are_checked(data, flag, value):
    with pytest.raises(SystemExit) as err:
        main(["eval", str(data / "cu_only.pt"), str(data / "cu.extxyz"), flag, value])
    assert err.value.code == 2
