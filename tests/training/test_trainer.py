"""Training loop: metrics, config, loss, exact resume, data parallel, export, bad frames."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import add_adsorbate, bulk, fcc100
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms

from est_calc.training.checkpoint import load_checkpoint
from est_calc.training.config import TrainConfig, load_config
from est_calc.training.datasets import frame_from_atoms, open_dataset, write_hdf5
from est_calc.training.metrics import S2EFMetrics

TINY = {"preset": "tiny", "overrides": {"cutoff_A": 4.0}}


def _emt_frames(n: int, seed: int):
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        if k % 3 == 2:
            atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
            atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        else:
            atoms = fcc100("Cu", (2, 2, 2), vacuum=5.0)
            add_adsorbate(atoms, "O", 1.6, "hollow")
            atoms.set_constraint(FixAtoms(indices=[a.index for a in atoms if a.tag == 2]))
            atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        atoms.calc = EMT()
        atoms.get_potential_energy()
        atoms.get_stress()
        frames.append(frame_from_atoms(atoms, sid=k, fid=0))
    return frames


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_data")
    write_hdf5(_emt_frames(8, 0), d / "train.h5")
    write_hdf5(_emt_frames(3, 1), d / "val.h5")
    return d


def _config(data_dir, out, **train):
    t = {"max_steps": 6, "batch_size": 4, "eval_every": 3, "checkpoint_every": 3, "log_every": 1,
         "dtype": "float64", "device": "cpu", "progress": False, "warmup_steps": 2, "lr": 5e-3,
         "neighbor_backend": "torch"}
    t.update(train)
    return TrainConfig.from_dict({
        "output_dir": str(out),
        "data": {"train": str(data_dir / "train.h5"), "val": str(data_dir / "val.h5")},
        "model": TINY,
        "train": t,
    })


# ----------------------------------------------------------------------------- metrics
def test_metrics_match_hand_computed_oc20_definitions():
    rng = np.random.default_rng(3)
    e_true = rng.normal(size=4)
    e_pred = e_true + np.array([0.01, -0.05, 0.015, 0.0])
    sidx = np.array([0, 0, 1, 1, 1, 2, 3, 3])
    fixed = np.array([1, 0, 0, 1, 0, 0, 0, 0])
    f_true = rng.normal(size=(8, 3))
    f_pred = f_true + rng.normal(scale=0.02, size=(8, 3))
    f_pred[6] = f_true[6] + 0.5  # ruins EFwT of system 3
    m = S2EFMetrics()
    half = 5  # two update calls (systems 0-1, then 2-3) must accumulate like one
    m.update(torch.tensor(e_pred[:2]), torch.tensor(e_true[:2]), torch.tensor(f_pred[:half]),
             torch.tensor(f_true[:half]), torch.tensor(sidx[:half]), torch.tensor(fixed[:half]))
    m.update(torch.tensor(e_pred[2:]), torch.tensor(e_true[2:]), torch.tensor(f_pred[half:]),
             torch.tensor(f_true[half:]), torch.tensor(sidx[half:] - 2), torch.tensor(fixed[half:]))
    got = m.compute()
    free = fixed == 0
    df = np.abs(f_pred - f_true)[free]
    assert got["energy_mae"] == pytest.approx(np.abs(e_pred - e_true).mean())
    assert got["forces_mae"] == pytest.approx(df.mean())
    cos = [np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)
           for a, b in zip(f_pred[free], f_true[free])]
    assert got["forces_cosine_similarity"] == pytest.approx(np.mean(cos), rel=1e-6)
    de = np.abs(e_pred - e_true)
    assert got["energy_within_threshold"] == pytest.approx(np.mean(de < 0.02))
    efwt = []
    for s in range(4):
        sel = free & (sidx == s)
        maxf = np.abs(f_pred - f_true)[sel].max() if sel.any() else 0.0
        efwt.append(de[s] < 0.02 and maxf < 0.03)
    assert got["energy_forces_within_threshold"] == pytest.approx(np.mean(efwt))


# ----------------------------------------------------------------------------- config
def test_config_rejects_unknown_keys_and_applies_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("output_dir: x\ndata: {train: a.h5}\ntrain: {max_steps: 3}\n")
    cfg = load_config(p, ["train.batch_size=2", "loss.kind=huber"])
    assert cfg.train.batch_size == 2 and cfg.loss.kind == "huber" and cfg.train.max_steps == 3
    p.write_text("data: {train: a.h5, trian: b}\n")
    with pytest.raises(ValueError, match="trian"):
        load_config(p)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")


def test_missing_training_data_is_a_clear_error(tmp_path):
    from est_calc.training.trainer import Trainer

    cfg = TrainConfig.from_dict({"output_dir": str(tmp_path), "data": {"train": str(tmp_path / "none.h5")}})
    with pytest.raises(FileNotFoundError, match="none.h5"):
        Trainer(cfg)


# ----------------------------------------------------------------------------- training
@pytest.mark.slow
def test_resume_reproduces_uninterrupted_run_and_export_loads(data_dir, tmp_path):
    from est_calc.calculator import ESTCalculator
    from est_calc.training.trainer import Trainer, train

    full = train(_config(data_dir, tmp_path / "full"))
    ref = load_checkpoint(tmp_path / "full" / "checkpoint.pt")

    # Interrupt a run after 3 steps: the checkpoint at step 3 is all that survives.
    assert Trainer(_config(data_dir, tmp_path / "cut")).fit(stop_at_step=3) is None
    # Resuming rebuilds the checkpoint's own model, even if the config's model section changed.
    changed = _config(data_dir, tmp_path / "cut")
    changed.model.overrides = {"cutoff_A": 4.0, "channels": 12}
    resumed = Trainer(changed, resume=True)
    assert resumed.step == 3
    assert resumed.potential.config.channels != 12
    resumed.fit()
    got = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    losses_ref = [h["loss"] for h in ref["history"] if "loss" in h]
    losses_got = [h["loss"] for h in got["history"] if "loss" in h]
    assert len(losses_ref) == 6
    np.testing.assert_allclose(losses_got, losses_ref, rtol=1e-10, atol=0)
    for k, v in ref["model"].items():
        torch.testing.assert_close(got["model"][k], v, rtol=1e-10, atol=1e-12)

    assert (tmp_path / "full" / "metrics.csv").exists()
    assert (tmp_path / "full" / "learning_curves.png").exists()
    # Validation metrics were logged, and the exported potential is what the calculator loads.
    rows = [h for h in ref["history"] if "val_forces_mae" in h]
    assert [r["step"] for r in rows] == [3, 6]
    assert all(np.isfinite(r["val_forces_mae"]) for r in rows)
    calc = ESTCalculator(model=str(full), device="cpu", dtype="float64")
    atoms = open_dataset(data_dir / "val.h5")[0].to_atoms()
    atoms.calc = calc
    assert np.isfinite(atoms.get_potential_energy())
    meta = calc.potential.metadata["training"]
    assert meta["steps"] == 6 and meta["n_train_frames"] == 8


@pytest.mark.slow
def test_two_process_data_parallel_equals_one_process(data_dir, tmp_path):
    from est_calc.training.trainer import train

    train(_config(data_dir, tmp_path / "one", max_steps=3, eval_every=100))
    one = load_checkpoint(tmp_path / "one" / "checkpoint.pt")
    cfg = tmp_path / "two.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(_config(data_dir, tmp_path / "two", max_steps=3, eval_every=100).to_dict()))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_port=29571", "-m", "est_calc.cli", "train", str(cfg)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = load_checkpoint(tmp_path / "two" / "checkpoint.pt")
    l1 = [h["loss"] for h in one["history"] if "loss" in h]
    l2 = [h["loss"] for h in two["history"] if "loss" in h]
    np.testing.assert_allclose(l2, l1, rtol=1e-9)
    for k, v in one["model"].items():
        torch.testing.assert_close(two["model"][k], v, rtol=1e-8, atol=1e-10)


def test_bad_frames_are_counted_and_skipped_or_stop(tmp_path):
    from est_calc.training.trainer import Trainer

    frames = _emt_frames(4, 5)
    bad = frames[1]
    object.__setattr__(bad, "positions", np.where(np.arange(bad.positions.size).reshape(bad.positions.shape) == 0,
                                                  np.nan, bad.positions))
    write_hdf5(frames, tmp_path / "bad.h5")
    cfg = TrainConfig.from_dict({"output_dir": str(tmp_path / "o"), "data": {"train": str(tmp_path / "bad.h5")},
                                 "model": TINY, "train": {"device": "cpu", "progress": False}})
    with pytest.raises(ValueError, match="nan"):
        Trainer(cfg)
    cfg.data.bad_frames = "skip"
    t = Trainer(cfg)
    assert len(t.train_frames) == 3
    assert "1" in t.data_report.summary() or "nan" in t.data_report.summary()


class SimClock:
    """Simulated seconds for the trainer's time budget (``trainer.clock``): the steps advance
    it by what the test says they take, so the budget logic is tested the same on a fast and a
    slow machine (evaluation, checkpoints and export take no simulated time)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sim_clock(monkeypatch):
    from est_calc.training import trainer as trainer_mod

    clock = SimClock()
    monkeypatch.setattr(trainer_mod, "clock", clock)
    return clock


def _schedule_only_step(trainer) -> dict:
    """What ``Trainer.train_step`` does to the schedule and the step count, without the model:
    the learning rate of this step, then one scheduler step."""
    lr = trainer.scheduler.get_last_lr()[0]
    trainer.scheduler.step()
    trainer.step += 1
    return {"step": trainer.step, "loss": 1.0, "lr": lr}


def _budget_trainer(data_dir, out, budget_s, **train):
    from est_calc.training.trainer import Trainer

    cfg = _config(data_dir, out, max_steps=100_000, eval_every=10_000, checkpoint_every=10_000,
                  log_every=1, time_budget_s=budget_s, **train)
    return cfg, Trainer(cfg)


def _fit_with_pace(trainer, sim_clock, seconds_of_step) -> None:
    """Fit with steps that take ``seconds_of_step(k)`` simulated seconds (k counts from 0): the
    first is the model's real step (so the optimiser has stepped), the rest only move the
    schedule. Checks the run ended on its schedule with the learning rate fully decayed."""
    real_step = trainer.train_step

    def step():
        sim_clock.now += seconds_of_step(trainer.step)
        return real_step() if trainer.step == 0 else _schedule_only_step(trainer)

    trainer.train_step = step
    assert trainer.fit() is not None
    assert trainer.step == trainer.max_steps
    lrs = [h["lr"] for h in trainer.history if "lr" in h]
    assert lrs[-1] < 0.05 * max(lrs)


def test_time_budget_fits_the_schedule_into_the_budget_and_resumes_with_it(data_dir, tmp_path,
                                                                           sim_clock):
    """Real training steps, each taking 0.1 simulated s, and a 5 s budget."""
    from est_calc.potential import load_potential
    from est_calc.training.trainer import CALIBRATION_STEPS, CALIBRATION_WARMUP_STEPS, Trainer

    cfg, trainer = _budget_trainer(data_dir, tmp_path / "budget", 5.0)
    real_step = trainer.train_step

    def step():
        sim_clock.now += 0.1
        return real_step()

    trainer.train_step = step
    path = trainer.fit()
    # A plan was made after the calibration steps: 90 % of the 5 s left after the 25 calibration
    # steps' 2.5 s at 0.1 s a step, so 25 + 22 steps; a schedule that decayed completely, and a
    # run that ended inside its budget.
    planned = CALIBRATION_WARMUP_STEPS + CALIBRATION_STEPS
    assert trainer.budget_planned and trainer.step == trainer.max_steps == planned + 22
    lrs = [h["lr"] for h in trainer.history if "lr" in h]
    assert lrs[-1] < 0.05 * max(lrs)
    assert trainer.elapsed_s <= 5.0
    meta = load_potential(path).metadata["training"]
    assert meta["steps"] == trainer.step and meta["time_budget_s"] == 5.0

    # The plan is part of the checkpoint: a resumed run keeps it instead of planning anew.
    state = load_checkpoint(tmp_path / "budget" / "checkpoint.pt")
    assert state["max_steps"] == trainer.step and state["budget_planned"]
    again = Trainer(cfg, resume=True)
    assert again.max_steps == trainer.max_steps and again.fit() is not None
    assert again.step == trainer.step


def _replans(data_dir, out, sim_clock, caplog, seconds_of_step, what: str) -> None:
    """A 10 s budget with steps of ``seconds_of_step(k)``: the run set its schedule, then made
    it again (``what``: "shortened" or "lengthened"), never used the budget up, and ended with
    80-100 % of it spent."""
    caplog.set_level(logging.INFO, logger="est_calc.training.trainer")
    _, trainer = _budget_trainer(data_dir, out, 10.0)
    _fit_with_pace(trainer, sim_clock, seconds_of_step)
    assert "schedule set" in caplog.text and f"schedule {what}" in caplog.text
    assert "used up" not in caplog.text
    assert 0.8 * 10.0 < trainer.elapsed_s <= 10.0


def test_time_budget_shortens_the_schedule_when_the_run_slows_down(data_dir, tmp_path, sim_clock,
                                                                   caplog):
    """Steps that become three times as slow two steps after the plan (a shared machine): the
    run plans again and still ends with a fully decayed schedule inside its budget instead of
    being cut mid-decay."""
    from est_calc.training.trainer import CALIBRATION_STEPS, CALIBRATION_WARMUP_STEPS

    slow_from = CALIBRATION_WARMUP_STEPS + CALIBRATION_STEPS + 2
    _replans(data_dir, tmp_path / "slow", sim_clock, caplog,
             lambda k: 0.05 if k < slow_from else 0.15, "shortened")


def test_time_budget_lengthens_the_schedule_when_the_run_speeds_up(data_dir, tmp_path, sim_clock,
                                                                   caplog):
    """Steps twice as slow while the plan is made, then plain (another job on the machine that
    ended): the run plans again for the time left instead of finishing far inside its budget,
    and still ends with a fully decayed schedule."""
    from est_calc.training.trainer import CALIBRATION_STEPS, CALIBRATION_WARMUP_STEPS

    slow_until = CALIBRATION_WARMUP_STEPS + CALIBRATION_STEPS + 5
    _replans(data_dir, tmp_path / "fast", sim_clock, caplog,
             lambda k: 0.1 if k < slow_until else 0.05, "lengthened")


def test_time_budget_stops_a_run_that_outlives_it(data_dir, tmp_path, sim_clock):
    """A budget already spent when the run resumes: it stops at once, exports, and says so."""
    from est_calc.training import trainer as trainer_mod

    cfg = _config(data_dir, tmp_path / "late", max_steps=50, checkpoint_every=5)
    first = trainer_mod.Trainer(cfg)
    real_step = first.train_step

    def step():
        sim_clock.now += 1.0
        return real_step()

    first.train_step = step
    assert first.fit(stop_at_step=5) is None  # 5 simulated seconds spent
    cfg.train.time_budget_s = 4.0  # less than what was already spent
    late = trainer_mod.Trainer(cfg, resume=True)
    assert late.elapsed_s == 5.0
    assert late.fit() is not None
    assert late.step == 6 and late.max_steps == 6  # one step, then the budget check ends it


def test_time_budget_and_data_paths_are_checked(tmp_path):
    with pytest.raises(ValueError, match="time_budget_s"):
        TrainConfig.from_dict({"data": {"train": "x.h5"}, "train": {"time_budget_s": 0}}).validate()
    with pytest.raises(ValueError, match="data.train must be a path or a list of paths"):
        TrainConfig.from_dict({"data": {"train": ["a.h5", 3]}}).validate()
    TrainConfig.from_dict({"data": {"train": ["a.h5", "b.h5"], "val": "c.h5"}}).validate()


def test_time_budget_pace_leaves_out_the_slow_first_steps(data_dir, tmp_path, sim_clock):
    """The first steps of a process are slow (CUDA context, allocator growth): the pace that
    plans the schedule is timed after them, or a GPU run would end far inside its budget."""
    from est_calc.training.trainer import CALIBRATION_STEPS, CALIBRATION_WARMUP_STEPS

    _, trainer = _budget_trainer(data_dir, tmp_path / "warm", 3.0)
    _fit_with_pace(trainer, sim_clock, lambda k: 1.0 if k == 0 else 0.01)
    # paced at 0.01 s a step: 25 + 0.9 * (3 - 1.24) / 0.01 = 183 steps; a pace that counted the
    # slow first step (0.06 s a step) would have planned 25 + 26
    assert trainer.budget_planned
    assert trainer.max_steps == CALIBRATION_WARMUP_STEPS + CALIBRATION_STEPS + 158


# ----------------------------------------------------------------------------- data and schedule
def _same_step_batch(a, b) -> None:
    (batch_a, tgt_a, rot_a), (batch_b, tgt_b, rot_b) = a, b
    for name in ("positions", "atomic_numbers", "cell", "pbc", "system_idx"):
        assert torch.equal(getattr(batch_a, name), getattr(batch_b, name)), name
    for name in ("energy", "forces", "stress", "has_stress", "fixed", "n_atoms"):
        assert torch.equal(getattr(tgt_a, name), getattr(tgt_b, name)), name
    assert torch.equal(rot_a, rot_b)


def test_loader_workers_give_the_same_batches_in_the_same_order(data_dir, tmp_path):
    """The DataLoader with worker processes reads ahead, but yields what reading in the training
    process yields, step by step (across epochs, and after a jump to another step, as on
    resume); both are the frames of the step's global batch with the step's rotations."""
    from est_calc.training.batching import collate, global_batch, step_rotations
    from est_calc.training.trainer import Trainer

    inline = Trainer(_config(data_dir, tmp_path / "w0", num_workers=0))
    ahead = Trainer(_config(data_dir, tmp_path / "w2", num_workers=2))
    rng = torch.get_rng_state()
    try:
        for step in (0, 1, 2, 3, 4, 9, 10, 11):  # 2 steps an epoch; a jump from 4 to 9
            inline.step = ahead.step = step
            got = inline._next_batch()
            _same_step_batch(got, ahead._next_batch())
            assert torch.equal(torch.get_rng_state(), rng)  # the loaders leave it alone
            idx = global_batch(step, 8, 4, 0)
            frames = [inline.train_frames[k] for k in idx]
            _same_step_batch(got, (*collate(frames, "total", "cpu", torch.float64),
                                   step_rotations(step, 4, 0)))
    finally:
        inline._batches = ahead._batches = None


@pytest.mark.slow
def test_training_with_loader_workers_is_bit_identical(data_dir, tmp_path):
    from est_calc.training.trainer import train

    train(_config(data_dir, tmp_path / "w0", max_steps=3, eval_every=100))
    train(_config(data_dir, tmp_path / "w2", max_steps=3, eval_every=100, num_workers=2))
    a = load_checkpoint(tmp_path / "w0" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "w2" / "checkpoint.pt")
    assert [h.get("loss") for h in a["history"]] == [h.get("loss") for h in b["history"]]
    for key in ("model", "ema"):
        for name, value in a[key].items():
            assert torch.equal(b[key][name], value), (key, name)


def test_lr_schedule_is_the_cosine_factor_and_follows_a_new_length(data_dir, tmp_path):
    """LambdaLR gives train.lr * cosine_lr_factor(step, max_steps, ...) at every step, and a
    new schedule length (a time-budget plan) applies from the current step on."""
    from est_calc.training.trainer import Trainer, cosine_lr_factor

    cfg = _config(data_dir, tmp_path / "lr", max_steps=6)
    trainer = Trainer(cfg)
    t = cfg.train
    trainer.fit(stop_at_step=2)
    trainer._set_max_steps(4)  # as _plan_budget does
    trainer.fit()
    expected = [t.lr * cosine_lr_factor(s, 6, t.warmup_steps, t.min_lr_ratio) for s in range(2)]
    expected += [t.lr * cosine_lr_factor(s, 4, t.warmup_steps, t.min_lr_ratio) for s in (2, 3)]
    assert [h["lr"] for h in trainer.history if "lr" in h] == expected


@pytest.mark.slow
def test_checkpoint_without_a_stored_schedule_base_resumes_exactly(data_dir, tmp_path):
    """Checkpoints written before the LambdaLR schedule have no "initial_lr" in the optimizer's
    param groups: they resume exactly as the same checkpoint with it does, bit for bit."""
    import shutil

    from est_calc.training.checkpoint import save_checkpoint
    from est_calc.training.trainer import Trainer

    assert Trainer(_config(data_dir, tmp_path / "new")).fit(stop_at_step=3) is None
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    state = load_checkpoint(tmp_path / "old" / "checkpoint.pt")
    for group in state["optimizer"]["param_groups"]:
        del group["initial_lr"]
    save_checkpoint(tmp_path / "old" / "checkpoint.pt", state)
    for name in ("new", "old"):
        Trainer(_config(data_dir, tmp_path / name), resume=True).fit()
    new = load_checkpoint(tmp_path / "new" / "checkpoint.pt")
    old = load_checkpoint(tmp_path / "old" / "checkpoint.pt")
    assert new["step"] == old["step"] == 6
    assert [h.get("loss") for h in old["history"]] == [h.get("loss") for h in new["history"]]
    for key in ("model", "ema"):
        for name, value in new[key].items():
            assert torch.equal(old[key][name], value), (key, name)
