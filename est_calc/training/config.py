"""Training configuration: dataclasses backed by YAML, with ``--set key=value`` overrides.

A config file looks like ``examples/train_small.yaml``::

    output_dir: runs/small
    data:
      train: data/generated/train.h5
      val: data/generated/val.h5
    model:
      preset: small
    train:
      max_steps: 2000
      batch_size: 8

Unknown keys are errors (a typo never silently falls back to a default).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DataConfig",
    "ModelSection",
    "LossConfig",
    "TrainSection",
    "TrainConfig",
    "load_config",
    "apply_overrides",
]


@dataclass
class DataConfig:
    """Where the data is and how to read it.

    Attributes:
        train: path of the training data in any supported format (extxyz(+txt), ASE db,
            .aselmdb, legacy OC20 LMDB file or folder, .h5), or a list of such paths (read one
            after the other).
        val: path of the validation data (optional; without it no metrics are written).
        energy: "total" (raw energies) or "referenced" (energy - reference_energy, the OC20
            S2EF convention for data that carries reference energies).
        bad_frames: "stop" (raise with the counts) or "skip" (drop, counted and reported).
        max_train_frames: use only the first N training frames (None = all).
        max_val_frames: evaluate on the first N validation frames (None = all).
    """

    train: str | list[str] = ""
    val: str | list[str] | None = None
    energy: str = "total"
    bad_frames: str = "stop"
    max_train_frames: int | None = None
    max_val_frames: int | None = None


@dataclass
class ModelSection:
    """The model: a named preset plus field overrides of :class:`est_calc.model.ModelConfig`."""

    preset: str = "small"
    overrides: dict = field(default_factory=dict)


@dataclass
class LossConfig:
    """Loss = w_E * L(E/atom) + w_F * L(F) (+ w_S * L(stress)).

    Attributes:
        kind: "l2" (mean squared error), "l1" or "huber".
        huber_delta: delta of the Huber loss in the loss's own units.
        forces_on_free_atoms: OC20 convention: force loss only on atoms with fixed == 0.
    """

    energy_weight: float = 1.0
    force_weight: float = 10.0
    stress_weight: float = 0.0
    kind: str = "l2"
    huber_delta: float = 0.01
    forces_on_free_atoms: bool = True


@dataclass
class TrainSection:
    """Optimiser, schedule and bookkeeping.

    ``time_budget_s`` fits the run into a wall-clock budget (all resumes together): after a few
    untimed warm-up steps, ``CALIBRATION_STEPS`` steps measure the run's pace and it shortens its
    schedule to the steps that fit (never beyond ``max_steps``), so the cosine decays fully
    within the budget. The pace is watched to the end: a run that slows down shortens its
    schedule again, one that speeds up lengthens it again; should the budget run out anyway, it
    stops there and exports.

    ``init`` starts the run from trained weights instead of a fresh model (fine-tuning, or a
    second stage on more data): a potential (registry name or ``.pt`` path) or a training
    checkpoint of another run (its EMA weights). The optimiser and schedule start afresh; the
    element references and energy scale come with the weights. ``est train --init`` overrides it.
    """

    max_steps: int = 1000
    batch_size: int = 8
    lr: float = 2e-3
    min_lr_ratio: float = 0.02
    warmup_steps: int = 50
    weight_decay: float = 1e-4
    grad_clip: float = 10.0
    ema_decay: float = 0.995
    eval_every: int = 100
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    neighbor_backend: str = "auto"
    progress: bool = True
    init: str | None = None
    time_budget_s: float | None = None


@dataclass
class TrainConfig:
    """The whole run."""

    output_dir: str = "runs/est"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return _build(cls, d, "")

    def validate(self) -> None:
        if not self.data.train:
            raise ValueError("data.train is required (a path to training data, or a list of paths)")
        for key in ("train", "val"):
            value = getattr(self.data, key)
            paths = value if isinstance(value, list) else [value]
            if value is not None and not all(isinstance(p, str) and p for p in paths):
                raise ValueError(f"data.{key} must be a path or a list of paths, got {value!r}")
        if self.data.energy not in ("total", "referenced"):
            raise ValueError(f"data.energy must be 'total' or 'referenced', got {self.data.energy!r}")
        if self.data.bad_frames not in ("stop", "skip"):
            raise ValueError(f"data.bad_frames must be 'stop' or 'skip', got {self.data.bad_frames!r}")
        if self.loss.kind not in ("l1", "l2", "huber"):
            raise ValueError(f"loss.kind must be l1, l2 or huber, got {self.loss.kind!r}")
        if self.train.max_steps < 1 or self.train.batch_size < 1:
            raise ValueError("train.max_steps and train.batch_size must be positive")
        budget = self.train.time_budget_s
        if budget is not None and not (float(budget) > 0):
            raise ValueError(f"train.time_budget_s must be a positive number of seconds, got {budget!r}")


def _build(cls, d: Any, prefix: str):
    if not isinstance(d, dict):
        raise ValueError(f"config section {prefix or '<root>'} must be a mapping, got {d!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        where = prefix or "the top level"
        raise ValueError(f"unknown config keys at {where}: {unknown}; known: {sorted(known)}")
    kwargs = {}
    for name, value in d.items():
        f = known[name]
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            kwargs[name] = _build(sub, value, f"{prefix}{name}.")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = _parse_value(value)
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config, apply overrides, validate."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        raw = yaml.safe_load(p.read_text()) or {}
    raw = apply_overrides(raw, overrides or [])
    cfg = TrainConfig.from_dict(raw)
    cfg.validate()
    return cfg
