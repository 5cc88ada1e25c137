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

Unknown keys are errors (a typo never silently falls back to a default), and every value is
checked (type, range, choice) by :meth:`TrainConfig.validate` before any work starts, ``--set``
overrides included; an invalid value is a one-line ValueError naming the key, the value and
what is expected.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DataConfig",
    "ModelSection",
    "LossConfig",
    "TrainSection",
    "UncertaintySection",
    "TrainConfig",
    "load_config",
    "apply_overrides",
    "isolated_atom_energies",
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
        isolated_atoms: the energies of isolated atoms at the data's level of theory, as the
            element references (the energy each atom has with no neighbour inside the cutoff,
            so dissociation ends at the right energy): a file of single-atom frames with
            energies (extended XYZ such as ``iso_atoms.xyz``) or a mapping from element symbol
            or atomic number to eV. None: references fitted by least squares to the training
            energies. Every element of the training data needs one.
    """

    train: str | list[str] = ""
    val: str | list[str] | None = None
    energy: str = "total"
    bad_frames: str = "stop"
    max_train_frames: int | None = None
    max_val_frames: int | None = None
    isolated_atoms: str | dict | None = None


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
        stage_two_start: from this fraction of the schedule on (e.g. 0.75), the energy and
            force weights become ``stage_two_energy_weight`` and ``stage_two_force_weight``
            (the late energy up-weighting of MACE's second stage); None: one stage.
    """

    energy_weight: float = 1.0
    force_weight: float = 10.0
    stress_weight: float = 0.0
    kind: str = "l2"
    huber_delta: float = 0.01
    forces_on_free_atoms: bool = True
    stage_two_start: float | None = None
    stage_two_energy_weight: float = 1000.0
    stage_two_force_weight: float = 100.0


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

    ``threads``: intra-op threads of every step; None chooses per step from its graph
    (:func:`est_calc.threads.choose_threads`).

    ``optimizer``: "adamw" (decoupled weight decay) or "adam" (L2-free Adam); ``amsgrad`` uses
    the AMSGrad variant of either (the molecular literature's choice: MACE trains 3BPA with
    AMSGrad at lr 0.01, batch 5).

    ``num_workers``: ``torch.utils.data.DataLoader`` worker processes that read and collate the
    next steps' frames while a step runs (0, the default: read in the training process). The
    batches, their order and so the results are the same for any number.

    ``compile``: run each step's loss and parameter gradients (forward, forces and the second
    derivative) as one traced and compiled graph (:mod:`est_calc.training.compiled`): the same
    results to round-off (its first steps are checked against the eager step), faster per step,
    at the price of tracing and compiling when the run starts (minutes the first time, cached on
    disk after). Threads stay fixed at ``threads`` (or torch's setting) for the whole run.
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
    threads: int | None = None
    num_workers: int = 0
    optimizer: str = "adamw"
    amsgrad: bool = False
    compile: bool = False


@dataclass
class UncertaintySection:
    """The uncertainty estimate trained with the potential (:mod:`est_calc.uncertainty`).

    ``kind``: "none"; "latent" (after training, fit the latent-distance estimate of the exported
    potential: reference features from up to ``max_reference_frames`` training frames,
    ``n_reference`` atoms kept per element, calibration on ``calibration`` frames, default
    ``data.val``; written as ``potential.uncertainty`` beside ``potential.pt``); or "committee"
    (train ``committee_size`` potentials with seeds ``train.seed + k`` into
    ``output_dir/member<k>``, for ``ESTCalculator(model=[...], uncertainty=True)``; with
    ``calibration`` or ``data.val``, the committee's 95 % flag thresholds are then fitted and
    written as ``member0/potential.committee``, the recipes' "auto").
    ``pool_radius`` (Å, at most the model's cutoff; None: the cutoff; 0: no pooling) and
    ``self_weight`` set the latent distance's pooling over neighbours
    (:class:`est_calc.uncertainty.LatentDistance`).
    """

    kind: str = "none"
    committee_size: int = 3
    calibration: str | list[str] | None = None
    n_reference: int = 2048
    max_reference_frames: int | None = 2000
    pool_radius: float | None = None
    #: An atom's own distance weighs as four neighbours at distance 0 (benchmarks/RESULTS.md,
    #: "Uncertainty": chosen on the model card's sets).
    self_weight: float = 4.0


@dataclass
class TrainConfig:
    """The whole run."""

    output_dir: str = "runs/est"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainSection = field(default_factory=TrainSection)
    uncertainty: UncertaintySection = field(default_factory=UncertaintySection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return _build(cls, d, "")

    def validate(self) -> None:
        """Check every value (types, ranges, choices) before any work starts.

        Raises ValueError naming the key, the value and what is expected. Numbers that YAML
        reads as text (YAML 1.1 reads ``1e-3``, without a dot, as a string) are accepted in
        number fields and converted in place; nothing else is coerced (``2.5`` is not an
        integer, ``"yes"`` is not a boolean).

        Rules: ``max_steps``, ``batch_size``, ``eval_every``, ``checkpoint_every``,
        ``log_every``, ``max_train_frames``, ``max_val_frames`` and ``threads`` are positive
        integers (the last three may be None); ``warmup_steps``, ``seed`` and ``num_workers``
        non-negative integers;
        ``lr``, ``weight_decay`` and the loss weights finite numbers >= 0 (at least one loss
        weight > 0); ``grad_clip``, ``huber_delta`` and ``time_budget_s`` finite numbers > 0;
        ``min_lr_ratio`` in [0, 1]; ``ema_decay`` in [0, 1) (1 would never move the averaged
        weights); the choices ``energy``, ``bad_frames``, ``kind``, ``dtype``,
        ``neighbor_backend``, ``device`` (:func:`est_calc.devices.parse_device`: "auto", "cpu",
        "cuda", "cuda:N" or "mps") and ``preset``;
        ``model.overrides`` must make a valid ``ModelConfig`` with the preset. Whether paths
        exist is checked by :meth:`check_paths`.
        """
        _check_text("output_dir", self.output_dir, "a folder path")
        d = self.data
        if d.train in ("", None, []):
            raise ValueError("data.train is required (a path to training data, or a list of paths)")
        _check_paths_value("data.train", d.train)
        if d.val is not None:
            _check_paths_value("data.val", d.val)
        _check_choice("data.energy", d.energy, ("total", "referenced"))
        _check_choice("data.bad_frames", d.bad_frames, ("stop", "skip"))
        for key in ("max_train_frames", "max_val_frames"):
            if getattr(d, key) is not None:
                _check_int(f"data.{key}", getattr(d, key), 1)
        if d.isolated_atoms is not None:
            if isinstance(d.isolated_atoms, dict):
                isolated_atom_energies(d.isolated_atoms)  # raises on a bad entry
            else:
                _check_text("data.isolated_atoms", d.isolated_atoms,
                            "a path or a mapping of element to energy (eV)")

        m = self.model
        from est_calc.model import PRESETS, ModelConfig

        _check_choice("model.preset", m.preset, tuple(sorted(PRESETS)))
        if not isinstance(m.overrides, dict):
            raise ValueError(f"model.overrides must be a mapping of ModelConfig fields, "
                             f"got {m.overrides!r}")
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(str(k) for k in set(m.overrides) - known)
        if unknown:
            raise ValueError(f"model.overrides has unknown ModelConfig field(s) {unknown}; "
                             f"known: {sorted(known)}")
        try:
            ModelConfig.preset(m.preset, **m.overrides)
        except (TypeError, ValueError) as err:
            raise ValueError(f"model.overrides {m.overrides!r} do not make a valid model with "
                             f"preset {m.preset!r}: {_first_line(err)}") from None

        loss = self.loss
        for key in ("energy_weight", "force_weight", "stress_weight"):
            setattr(loss, key, _check_number(f"loss.{key}", getattr(loss, key), 0.0, None,
                                             "a finite non-negative number"))
        if not (loss.energy_weight > 0 or loss.force_weight > 0 or loss.stress_weight > 0):
            raise ValueError("loss.energy_weight, loss.force_weight and loss.stress_weight are "
                             "all 0: at least one must be positive")
        _check_choice("loss.kind", loss.kind, ("l1", "l2", "huber"))
        loss.huber_delta = _check_number("loss.huber_delta", loss.huber_delta, 0.0, None,
                                         "a finite positive number", low_open=True)
        _check_bool("loss.forces_on_free_atoms", loss.forces_on_free_atoms)
        if loss.stage_two_start is not None:
            loss.stage_two_start = _check_number("loss.stage_two_start", loss.stage_two_start,
                                                 0.0, 1.0, "a number in [0, 1) or null",
                                                 high_open=True)
        for key in ("stage_two_energy_weight", "stage_two_force_weight"):
            setattr(loss, key, _check_number(f"loss.{key}", getattr(loss, key), 0.0, None,
                                             "a finite non-negative number"))

        t = self.train
        for key in ("max_steps", "batch_size", "eval_every", "checkpoint_every", "log_every"):
            _check_int(f"train.{key}", getattr(t, key), 1)
        for key in ("warmup_steps", "seed", "num_workers"):
            _check_int(f"train.{key}", getattr(t, key), 0)
        t.lr = _check_number("train.lr", t.lr, 0.0, None, "a finite non-negative number")
        t.min_lr_ratio = _check_number("train.min_lr_ratio", t.min_lr_ratio, 0.0, 1.0,
                                       "a number in [0, 1]")
        t.weight_decay = _check_number("train.weight_decay", t.weight_decay, 0.0, None,
                                       "a finite non-negative number")
        t.grad_clip = _check_number("train.grad_clip", t.grad_clip, 0.0, None,
                                    "a finite positive number", low_open=True)
        t.ema_decay = _check_number("train.ema_decay", t.ema_decay, 0.0, 1.0,
                                    "a number in [0, 1)", high_open=True)
        from est_calc.devices import parse_device

        parse_device(t.device, what="train.device")  # spelling only: the run may be elsewhere
        _check_choice("train.dtype", t.dtype, ("float32", "float64"))
        from est_calc.neighbors import BACKENDS

        _check_choice("train.neighbor_backend", t.neighbor_backend, tuple(BACKENDS))
        _check_bool("train.progress", t.progress)
        _check_choice("train.optimizer", t.optimizer, ("adamw", "adam"))
        _check_bool("train.amsgrad", t.amsgrad)
        _check_bool("train.compile", t.compile)
        if t.init is not None:
            _check_text("train.init", t.init,
                        "a path or registry name of a potential, or a checkpoint path")
        if t.threads is not None:
            _check_int("train.threads", t.threads, 1)
        if t.time_budget_s is not None:
            t.time_budget_s = _check_number("train.time_budget_s", t.time_budget_s, 0.0, None,
                                            "a finite positive number of seconds",
                                            low_open=True)
        u = self.uncertainty
        _check_choice("uncertainty.kind", u.kind, ("none", "latent", "committee"))
        _check_int("uncertainty.committee_size", u.committee_size, 2)
        _check_int("uncertainty.n_reference", u.n_reference, 1)
        if u.max_reference_frames is not None:
            _check_int("uncertainty.max_reference_frames", u.max_reference_frames, 1)
        if u.calibration is not None:
            _check_paths_value("uncertainty.calibration", u.calibration)
        if u.pool_radius is not None:
            u.pool_radius = _check_number("uncertainty.pool_radius", u.pool_radius, 0.0, None,
                                          "a finite non-negative radius in Å (0: no pooling)")
        u.self_weight = _check_number("uncertainty.self_weight", u.self_weight, 0.0, None,
                                      "a finite positive number", low_open=True)
        if u.kind == "latent" and u.calibration is None and d.val is None:
            raise ValueError("uncertainty.kind=latent needs held-out frames to calibrate on: set "
                             "uncertainty.calibration or data.val")

    def check_paths(self, init: str | None = None) -> None:
        """Check that the data (and an ``init`` given as a path) exist and that ``output_dir``
        is not a file.

        Args:
            init: the effective init (``est train --init`` or ``train.init``); a registry name
                (no ``/``, no ``.pt`` suffix) is not checked here.

        Raises:
            FileNotFoundError: a data path or an init path that does not exist (names the key).
            ValueError: ``output_dir`` exists and is not a folder.
        """
        for key, value in (("data.train", self.data.train), ("data.val", self.data.val),
                           ("uncertainty.calibration", self.uncertainty.calibration)):
            for p in ([] if value is None else value if isinstance(value, list) else [value]):
                if not Path(p).exists():
                    raise FileNotFoundError(f"{key}: no such file or folder: {p}")
        iso = self.data.isolated_atoms
        if isinstance(iso, str) and not Path(iso).is_file():
            raise FileNotFoundError(f"data.isolated_atoms: no such file: {iso}")
        init = self.train.init if init is None else init
        if init is not None:
            looks_like_path = "/" in init or os.sep in init or init.endswith(".pt")
            if looks_like_path and not Path(init).expanduser().exists():
                raise FileNotFoundError(f"train.init: no such file: {init}")
        out = Path(self.output_dir)
        if out.exists() and not out.is_dir():
            raise ValueError(f"output_dir {out} exists and is not a folder")


def isolated_atom_energies(source: str | dict) -> dict[int, float]:
    """Atomic number -> isolated-atom energy (eV) from ``data.isolated_atoms``.

    Args:
        source: a mapping (element symbol or atomic number -> eV) or the path of a file of
            single-atom frames with energies, read with ``ase.io.read`` (extended XYZ:
            ``energy=`` in the comment line).

    Raises:
        ValueError: an unknown element, a non-finite energy, a frame of more than one atom or
            without an energy, or the same element twice with different energies (one line
            naming the entry).
    """
    from ase.data import atomic_numbers

    out: dict[int, float] = {}

    def add(key, value, where):
        if isinstance(key, str) and key in atomic_numbers:
            z = atomic_numbers[key]
        elif isinstance(key, int) and not isinstance(key, bool) and 0 < key < 119:
            z = key
        else:
            raise ValueError(f"data.isolated_atoms{where}: {key!r} is not an element")
        e = _check_number(f"data.isolated_atoms{where}", value, -math.inf, None,
                          "a finite energy in eV")
        if z in out and abs(out[z] - e) > 1e-9:
            raise ValueError(f"data.isolated_atoms{where}: element {key} given twice with "
                             f"different energies ({out[z]} and {e} eV)")
        out[z] = e

    if isinstance(source, dict):
        for key, value in source.items():
            add(key, value, f"[{key!r}]")
        return out
    from ase.io import read

    try:
        frames = read(source, index=":")
    except Exception as err:  # noqa: BLE001 - any reader failure is one line naming the file
        raise ValueError(f"data.isolated_atoms: cannot read {source}: {_first_line(err)}") from None
    for k, atoms in enumerate(frames):
        where = f" ({source}, frame {k})"
        if len(atoms) != 1:
            raise ValueError(f"data.isolated_atoms{where}: {len(atoms)} atoms; an isolated "
                             f"atom frame has one")
        energy = atoms.info.get("energy")
        if energy is None and atoms.calc is not None:
            energy = atoms.calc.results.get("energy")
        if energy is None:
            raise ValueError(f"data.isolated_atoms{where}: no energy")
        add(int(atoms.numbers[0]), energy, where)
    return out


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_int(key: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else "a non-negative integer"
        raise ValueError(f"{key} must be {what}, got {value!r}")


def _check_number(key: str, value: Any, low: float, high: float | None, what: str, *,
                  low_open: bool = False, high_open: bool = False) -> float:
    """The value as a float if it is a finite number within the bounds, else ValueError."""
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    ok = number is not None and math.isfinite(number)
    if ok:
        ok = (number > low if low_open else number >= low)
        if high is not None:
            ok = ok and (number < high if high_open else number <= high)
    if not ok:
        raise ValueError(f"{key} must be {what}, got {value!r}")
    return number


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(repr(c) for c in choices)}; "
                         f"got {value!r}")


def _check_bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")


def _check_text(key: str, value: Any, what: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key} must be {what}, got {value!r}")


def _check_paths_value(key: str, value: Any) -> None:
    paths = value if isinstance(value, list) else [value]
    if not paths or not all(isinstance(p, str) and p.strip() for p in paths):
        raise ValueError(f"{key} must be a path or a list of paths, got {value!r}")


def _build(cls, d: Any, prefix: str):
    if d is None:  # an empty section (``train:`` with nothing under it): the defaults
        d = {}
    if not isinstance(d, dict):
        where = f"config section {prefix.rstrip('.')}" if prefix else "the config"
        raise ValueError(f"{where} must be a mapping of keys to values, got {d!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(d) - set(known))
    if unknown:
        where = prefix.rstrip(".") if prefix else "the top level"
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


def _parse_value(text: str, item: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"override {item!r}: the value is not valid YAML "
                         f"({getattr(err, 'problem', None) or _first_line(err)})") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ValueError(f"override {item!r} has an empty key")
        node = raw
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = _parse_value(value, item)
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config, apply overrides, validate.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a folder, an unreadable or empty file, invalid YAML, a file that is not a
            mapping, unknown keys or invalid values (one line each, naming the file or key).
    """
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ValueError(f"config {p} is a folder, not a YAML file")
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read config file {p}: {_first_line(err)}") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or _first_line(err)
            raise ValueError(f"config file {p} is not valid YAML: {problem}{where}") from None
        if raw is None:
            raise ValueError(f"config file {p} is empty")
        if not isinstance(raw, dict):
            raise ValueError(f"config file {p} must hold a mapping of sections (output_dir, "
                             f"data, model, loss, train), got a {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    cfg = TrainConfig.from_dict(raw)
    cfg.validate()
    return cfg
