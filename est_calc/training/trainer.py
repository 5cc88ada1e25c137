"""The training loop: AdamW, cosine schedule with warm-up, clipping, EMA, exact resume, DDP.

Design points:

* Data order is a pure function of (seed, epoch) and each step's grid rotations a pure function of
  (seed, step), so a resumed run and a data-parallel run see exactly what the single-process,
  uninterrupted run sees. The batches come from a ``torch.utils.data.DataLoader`` over
  :class:`~est_calc.training.batching.StepBatches` (item = step), read ahead by
  ``train.num_workers`` worker processes; any number of workers gives the same batches in the
  same order.
* The learning rate follows ``torch.optim.lr_scheduler.LambdaLR`` with
  :func:`cosine_lr_factor`; a time-budget plan sets the schedule's length.
* The averaged weights are an exponential moving average kept by hand (:func:`_ema_update`),
  not ``torch.optim.swa_utils.AveragedModel``: that one copies the weights at its first update
  instead of averaging from the initial ones, and its state_dict wraps the module
  ("module."-prefixed keys plus ``n_averaged``), so runs would no longer reproduce, and
  checkpoints would no longer resume, exactly as those written so far; the update itself is
  one ``lerp_`` per parameter, and the EMA stays a plain Potential that exports as it is.
* Loss terms are sums divided by *global* counts and gradients are summed over ranks, so
  ``torchrun --nproc_per_node=2`` with the same global batch gives the single-process result.
* Checkpoints hold tensors and plain values only, are written atomically and read with
  ``weights_only=True``.
"""

from __future__ import annotations

import copy
import csv
import itertools
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

from est_calc.accel import accelerate
from est_calc.atomic_io import temp_files_of
from est_calc.devices import resolve_device
from est_calc.forces import energy_forces_stress
from est_calc.model import ModelConfig
from est_calc.neighbors import build_graph
from est_calc.threads import choose_threads, intra_op_threads
from est_calc.potential import Potential, load_potential, save_potential
from est_calc.training import distributed as dist_utils
from est_calc.training.batching import (StepBatches, collate, fit_element_references,
                                        rotate_batch)
from est_calc.training.checkpoint import load_checkpoint, save_checkpoint
from est_calc.training.config import TrainConfig, isolated_atom_energies
from est_calc.training.datasets import FrameSubset, check_species, species_error
from est_calc.training.loss import loss_counts, loss_terms
from est_calc.training.metrics import S2EFMetrics, format_metrics

__all__ = ["Trainer", "train", "evaluate", "cosine_lr_factor"]

logger = logging.getLogger(__name__)


def cosine_lr_factor(step: int, max_steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``max_steps``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(max_steps - warmup, 1)
    t = min(max(step - warmup, 0) / span, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def _resolve_device(name: str) -> torch.device:
    """``train.device`` on this machine; "auto" with CUDA is this process's local-rank GPU."""
    device = resolve_device(name, what="train.device")
    if name == "auto" and device.type == "cuda":
        return torch.device("cuda", dist_utils.local_rank())
    return device


def _open(path: str, max_frames: int | None, bad_frames: str, label: str):
    from est_calc.training.datasets import open_dataset, validate_frames

    dataset = open_dataset(path)
    good, report = validate_frames(dataset, policy=bad_frames)
    if max_frames is not None:
        good = list(good)[:max_frames]
    return dataset, list(good), report


#: The files a run writes into ``output_dir`` (``--overwrite`` removes these and nothing else).
RUN_FILES = ("checkpoint.pt", "potential.pt", "metrics.csv", "learning_curves.png")
#: Their presence marks a folder as holding a run (finished, interrupted or still running).
_RUN_MARKERS = ("checkpoint.pt", "potential.pt", "metrics.csv")
#: Temporary files of metrics.csv and learning_curves.png that a killed run leaves behind
#: (those of checkpoint.pt and potential.pt are found by ``temp_files_of``).
_TEMP_FILES = ("metrics.csv.tmp", "learning_curves.png.tmp.png")


def _check_output_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an ``output_dir`` that holds a run, unless resuming it or overwriting it.

    A folder holds a run when any of checkpoint.pt, potential.pt or metrics.csv is in it.
    ``resume`` needs its checkpoint.pt (a folder without one is refused only when it holds
    another of the run's files, which a fresh run would replace).
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out} exists and is not a folder")
    if overwrite or not out.is_dir():
        return
    present = [name for name in _RUN_MARKERS if (out / name).exists()]
    if not present or (resume and (out / "checkpoint.pt").is_file()):
        return
    if resume:
        raise ValueError(f"output_dir {out} holds {', '.join(present)} but no checkpoint.pt to "
                         "resume from; pass --overwrite (overwrite=True) to replace that run, "
                         "or choose another output_dir")
    raise ValueError(f"output_dir {out} already holds a run ({', '.join(present)}); pass "
                     "--resume to continue it or --overwrite to replace it (resume=True / "
                     "overwrite=True in Python), or choose another output_dir")


def _prepare_output_dir(out: Path, *, overwrite: bool) -> None:
    """Remove the temporary files killed runs left (and, to overwrite, the old run's files)."""
    if not out.is_dir():
        return
    doomed = [out / name for name in RUN_FILES] if overwrite else []
    doomed += [out / name for name in _TEMP_FILES]
    doomed += temp_files_of(out / "checkpoint.pt") + temp_files_of(out / "potential.pt")
    for path in doomed:
        if path.is_file() or path.is_symlink():
            path.unlink()


def _as_is(item):
    """The DataLoader's collate_fn: a StepBatches item is already a batch."""
    return item


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def evaluate(potential, frames, *, energy_mode="total", batch_size=8, device="cpu",
             neighbor_backend="auto", free_atoms_only=True) -> dict[str, float]:
    """OC20 S2EF metrics of ``potential`` on a sequence of frames.

    Raises:
        ValueError: a frame holds an element the potential does not know (naming the
            elements, the frame and its file where the sequence knows it; checked batch by
            batch, before that batch is evaluated). To refuse such data before any work, call
            :func:`est_calc.training.datasets.check_species` first.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    potential = accelerate(potential, inference=True)  # shares the weights; est_calc.accel
    potential.eval()
    dtype = next(potential.parameters()).dtype
    known = set(potential.species)
    metrics = S2EFMetrics(free_atoms_only=free_atoms_only)
    for start in range(0, len(frames), batch_size):
        chunk = [frames[i] for i in range(start, min(start + batch_size, len(frames)))]
        found = {start + j: tuple(sorted(set(np.unique(f.numbers).tolist()) - known))
                 for j, f in enumerate(chunk)}
        found = {k: v for k, v in found.items() if v}
        if found:
            raise species_error(frames, found, known, what="evaluation data",
                                owner="the potential", complete=False)
        batch, tgt = collate(chunk, energy_mode, device, dtype)
        graph = build_graph(batch, potential.cutoff_A, backend=neighbor_backend, paired=True)
        pred = energy_forces_stress(potential, batch, graph)
        metrics.update(pred.energy.detach(), tgt.energy, pred.forces.detach(), tgt.forces,
                       batch.system_idx, tgt.fixed, tgt.n_atoms)
    return metrics.compute()


CALIBRATION_STEPS = 20  # steps timed before a time budget sets the schedule's length
# steps run before that timing starts: the first steps of a process pay one-off costs (CUDA
# context, cuBLAS handles, allocator growth, kernel selection) that would make the pace look
# slower than it is and the schedule end well inside the budget
CALIBRATION_WARMUP_STEPS = 5
# a planned schedule is made again when its rest would leave more than this share of the whole
# time budget unused (or would overrun it)
REPLAN_SLACK = 0.2
# The clock that times the run for ``train.time_budget_s`` (seconds, monotonic). A module
# attribute so that tests can run the budget logic on simulated time, whatever the machine's pace.
clock = time.perf_counter


def _load_init(init: str):
    """Weights to start from: a training checkpoint (its EMA model) or a potential."""
    path = Path(init)
    if path.is_file():
        try:
            state = load_checkpoint(path)
        except ValueError:
            state = None  # not a checkpoint: read it as a potential below
        if state is not None:
            potential = Potential.from_config(ModelConfig.from_dict(state["model_config"]),
                                              species=state["species"])
            potential.load_state_dict(state["ema"])
            potential.metadata = {"training": {"checkpoint": str(path), "steps": int(state["step"]),
                                               "train_data": state["config"]["data"]["train"]}}
            return potential.to(dtype=torch.float64)
    try:
        potential = load_potential(init, device="cpu", dtype=torch.float64)
    except ValueError as err:
        raise ValueError(f"init {init!r} is neither an est_calc training checkpoint nor a "
                         f"potential ({str(err).split(':')[0]})") from None
    # An uncertainty part describes the init's weights, not the ones this run will make.
    potential.uncertainty = None
    return potential


class Trainer:
    """One training run described by a :class:`TrainConfig`.

    Everything is checked before any work, in this order: the config values
    (:meth:`TrainConfig.validate`), that the data and an init path exist, that ``output_dir``
    holds no run (unless ``resume`` or ``overwrite``), the data frames, and that every element
    of the training and validation data is one the model knows: from scratch the model's
    elements are those of the training data, so a validation set with another element is
    refused; with ``init`` or ``resume`` the training data must also hold only elements of the
    init potential or the checkpoint. Then (rank 0) the temporary files a killed run left
    beside the outputs are removed, and with ``overwrite`` the old run's files
    (:data:`RUN_FILES`, nothing else).

    Args:
        cfg: the run's configuration.
        init: a potential (name or path) to fine-tune instead of starting from scratch.
        resume: continue from ``output_dir/checkpoint.pt`` (a fresh run where there is none).
        overwrite: replace the run in ``output_dir`` (excludes ``resume``).

    Raises:
        ValueError: any of the checks above (one line naming the key, file or frame).
        FileNotFoundError: data or an init path that does not exist.
    """

    def __init__(self, cfg: TrainConfig, *, init: str | None = None, resume: bool = False,
                 overwrite: bool = False):
        if resume and overwrite:
            raise ValueError("resume and overwrite exclude each other: resume continues the run "
                             "in output_dir, overwrite replaces it")
        cfg.validate()
        self.cfg = cfg
        init = init if init is not None else cfg.train.init
        if init is not None and (not isinstance(init, str) or not init.strip()):
            raise ValueError(f"init must be a potential name or path, got {init!r}")
        self.init = init
        cfg.check_paths(init=init)
        self.out = Path(cfg.output_dir)
        ckpt = self.out / "checkpoint.pt"
        _check_output_dir(self.out, resume=resume, overwrite=overwrite)
        self.rank, self.world = dist_utils.setup()
        self.device = _resolve_device(cfg.train.device)
        self.dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.train.dtype]
        t = cfg.train
        if t.batch_size % self.world:
            raise ValueError(f"train.batch_size={t.batch_size} must be divisible by the "
                             f"number of processes ({self.world})")
        train_set, good, report = _open(cfg.data.train, cfg.data.max_train_frames,
                                        cfg.data.bad_frames, "train")
        if not good:
            raise ValueError(f"no usable training frames in {cfg.data.train}")
        self.train_frames = FrameSubset(train_set, good)
        self.data_report = report
        self.val_frames = None
        if cfg.data.val:
            val_set, vgood, _ = _open(cfg.data.val, cfg.data.max_val_frames, cfg.data.bad_frames, "val")
            if not vgood:
                raise ValueError(f"no usable validation frames in {cfg.data.val}")
            self.val_frames = FrameSubset(val_set, vgood)
        species = sorted({int(z) for i in range(len(self.train_frames))
                          for z in np.unique(self.train_frames[i].numbers)})
        torch.manual_seed(t.seed)  # model initialisation is a function of the seed
        state = load_checkpoint(ckpt) if resume and ckpt.is_file() else None
        if resume and state is None and self.rank == 0:
            logger.warning("no checkpoint.pt in %s to resume from: starting a fresh run", self.out)
        if state is not None:
            # Rebuild exactly the model the checkpoint was trained with, whatever the presets
            # of this est_calc version say now.
            potential = Potential.from_config(ModelConfig.from_dict(state["model_config"]),
                                              species=state["species"])
            owner = f"the model of checkpoint {ckpt}"
        elif init is not None:
            potential = _load_init(init)
            owner = f"the init potential {init}"
        else:
            mcfg = ModelConfig.preset(cfg.model.preset, **cfg.model.overrides)
            potential = Potential.from_config(mcfg, species=species)
            owner = "the model (its elements are those of the training data)"
        if set(species) - set(potential.species):
            check_species(self.train_frames, potential.species, what="training data",
                          owner=owner)
        if self.val_frames is not None:
            check_species(self.val_frames, potential.species, what="validation data",
                          owner=owner)
        # References set in the training precision (E0s of heavy elements are ~1e3 eV).
        potential = potential.to(dtype=self.dtype)
        if state is None and init is None:
            self._set_normalisation(potential, species)
        self.potential = potential.to(device=self.device)
        self.ema = copy.deepcopy(self.potential)
        for p in self.ema.parameters():
            p.requires_grad_(False)
        # foreach: one multi-tensor kernel per update term instead of a loop over the ~140
        # parameters (torch's CPU default is the loop; ~5 ms of a 90 ms molecule step).
        if t.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(self.potential.parameters(), lr=t.lr,
                                               weight_decay=t.weight_decay, amsgrad=t.amsgrad,
                                               foreach=True)
        else:
            self.optimizer = torch.optim.Adam(self.potential.parameters(), lr=t.lr,
                                              amsgrad=t.amsgrad, foreach=True)
        self.step = 0
        self.history: list[dict] = []
        self.elapsed_s = 0.0
        # The schedule's length: train.max_steps, or fewer once a time budget has been planned.
        self.max_steps = t.max_steps
        self.budget_planned = False
        if state is not None:
            self._restore(state)
        self.scheduler = self._lr_schedule()
        # This process's share of every step's batch, read ahead by train.num_workers worker
        # processes (0: in this process); a pure function of the step (_next_batch).
        self.step_batches = StepBatches(self.train_frames, batch_size=t.batch_size, seed=t.seed,
                                        energy_mode=cfg.data.energy, dtype=self.dtype,
                                        rank=self.rank, world=self.world)
        self._batches = None  # (iterator over the DataLoader, the step it yields next)
        dist_utils.broadcast_parameters(self.potential)
        # What the steps run: every speed-up, made once, sharing the parameters of
        # self.potential (which the optimizer, the EMA and the checkpoints hold).
        self.fast = accelerate(self.potential)
        self._compiled = None  # train.compile's CompiledStep, made at the first step
        if self.rank == 0:
            _prepare_output_dir(self.out, overwrite=overwrite)

    # ---------------------------------------------------------------- set-up
    def _set_normalisation(self, potential, species) -> None:
        """Element references: the isolated-atom energies of ``data.isolated_atoms``, else a
        least-squares fit to the training energies; energy scale = RMS force component
        (MACE-like)."""
        iso = self.cfg.data.isolated_atoms
        if iso is not None:
            e0 = isolated_atom_energies(iso)
            missing = sorted(set(species) - set(e0))
            if missing:
                from ase.data import chemical_symbols

                raise ValueError(
                    f"data.isolated_atoms has no energy for {[chemical_symbols[z] for z in missing]}"
                    f" of the training data (it has {[chemical_symbols[z] for z in sorted(e0)]})")
            refs = np.zeros(119)
            for z in species:
                refs[z] = e0[z]
        else:
            refs = fit_element_references(self.train_frames, self.cfg.data.energy, species)
        model = potential.model
        model.element_reference.copy_(torch.as_tensor(refs, dtype=model.element_reference.dtype))
        n = min(len(self.train_frames), 2000)
        sq, cnt = 0.0, 0
        for i in range(n):
            f = self.train_frames[i].forces
            if f is not None:
                sq += float(np.sum(np.asarray(f) ** 2))
                cnt += np.asarray(f).size
        if cnt and sq > 0:
            model.energy_scale.fill_(math.sqrt(sq / cnt))

    def _restore(self, state: dict) -> None:
        self.potential.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.elapsed_s = float(state.get("elapsed_s", 0.0))
        if state.get("metadata"):
            self.potential.metadata = dict(state["metadata"])
            self.ema.metadata = dict(state["metadata"])
        if state.get("budget_planned"):
            self.max_steps = int(state["max_steps"])
            self.budget_planned = True

    def _checkpoint(self) -> None:
        if self.rank != 0:
            return
        save_checkpoint(self.out / "checkpoint.pt", {
            "step": self.step,
            "config": self.cfg.to_dict(),
            "model_config": self.potential.config.to_dict(),
            "species": list(self.potential.species),
            "model": self.potential.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "history": self.history,
            "elapsed_s": self.elapsed_s,
            "max_steps": self.max_steps,
            "budget_planned": self.budget_planned,
            "metadata": self.ema.metadata,  # e.g. the record of the run an init came from
        })

    # ---------------------------------------------------------------- schedule and data
    def _lr_schedule(self) -> LambdaLR:
        """The learning-rate schedule, positioned at ``self.step``: ``train.lr`` times
        :func:`cosine_lr_factor` over ``self.max_steps`` steps.

        Made again whenever a time-budget plan changes ``max_steps`` (the new length applies
        from the current step on) and on resume (the schedule is a function of the step and
        ``max_steps``, both in the checkpoint, so it is not stored itself).
        """
        t = self.cfg.train
        for group in self.optimizer.param_groups:
            group["initial_lr"] = t.lr  # the schedule's base (checkpoints before it lack it)
        return LambdaLR(self.optimizer, lambda step: cosine_lr_factor(
            step, self.max_steps, t.warmup_steps, t.min_lr_ratio), last_epoch=self.step - 1)

    def _set_max_steps(self, max_steps: int) -> None:
        self.max_steps = max_steps
        self.scheduler = self._lr_schedule()

    def _next_batch(self):
        """``StepBatches`` item ``self.step`` from the DataLoader; a new loader, counting up from
        ``self.step``, when the step is not the one the current loader yields next."""
        if self._batches is None or self._batches[1] != self.step:
            # Its own generator: making the loader draws a seed for the workers, which must not
            # come from (and move) the global generator.
            loader = DataLoader(self.step_batches, batch_size=None,
                                sampler=itertools.count(self.step),
                                num_workers=self.cfg.train.num_workers, collate_fn=_as_is,
                                generator=torch.Generator().manual_seed(self.step))
            self._batches = [iter(loader), self.step]
        step, batch, tgt, rot = next(self._batches[0])
        self._batches[1] = step + 1
        return batch, tgt, rot

    # ---------------------------------------------------------------- one step
    def loss_weights(self) -> tuple[float, float]:
        """(energy, force) loss weights of the current step: ``loss.energy_weight`` and
        ``loss.force_weight``, or the stage-two weights from ``loss.stage_two_start`` times the
        schedule's length on (a time-budget plan moves that step with the schedule)."""
        loss = self.cfg.loss
        if loss.stage_two_start is not None and self.step >= loss.stage_two_start * self.max_steps:
            return loss.stage_two_energy_weight, loss.stage_two_force_weight
        return loss.energy_weight, loss.force_weight

    def train_step(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        batch, tgt, rot = self._next_batch()
        batch, tgt = batch.to(device=self.device), tgt.to(self.device)
        if self.potential.model.config.rotate_grid_in_training:
            batch, tgt = rotate_batch(batch, tgt, rot)
        # Reversed-pair edge order: the SO(2) blocks rotate half the edges (same gradients to
        # round-off). A compiled step's graph is traced for paired lists: every list is paired.
        compiled = t.compile and tgt.forces is not None
        graph = build_graph(batch, self.potential.cutoff_A, backend=t.neighbor_backend,
                            paired=True, pair_min_edges=0 if compiled else None)
        want_stress = cfg.loss.stress_weight > 0 and bool(tgt.has_stress.any())
        force_mask = (tgt.fixed == 0) if cfg.loss.forces_on_free_atoms else torch.ones_like(tgt.fixed, dtype=torch.bool)
        w_e, w_f = self.loss_weights()
        grads = None
        if compiled:
            loss, grads = self._compiled_loss(batch, graph, tgt, force_mask, want_stress, w_e, w_f)
        else:
            # The lattice rotation is done on the data above (deterministic per step), so the
            # model runs with its fixed lattice: eval-mode semantics for the grid, training for
            # the rest.
            self.fast.train()
            with intra_op_threads(choose_threads(graph.n_edges, t.threads)), \
                    self.fast.model.fixed_grid():
                pred = energy_forces_stress(self.fast, batch, graph,
                                            compute_stress=want_stress, create_graph=True)
            terms = loss_terms(pred, tgt.energy, tgt.forces, tgt.stress if want_stress else None,
                               tgt.has_stress, tgt.n_atoms, force_mask, cfg.loss.kind,
                               cfg.loss.huber_delta)
            counts = dist_utils.all_reduce_sum(
                [terms.energy_count, terms.force_count, terms.stress_count])
            loss = terms.total(w_e, w_f, cfg.loss.stress_weight, counts)
        lr = self.scheduler.get_last_lr()[0]  # this step's
        self.optimizer.zero_grad(set_to_none=True)
        if grads is None:
            with intra_op_threads(choose_threads(graph.n_edges, t.threads)):
                loss.backward()
        else:
            for p, g in zip(self.fast.parameters(), grads):
                p.grad = g
        dist_utils.all_reduce_gradients(self.potential)  # zeros where the loss did not reach
        gnorm = torch.nn.utils.clip_grad_norm_(self.potential.parameters(), t.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        _ema_update(self.ema, self.potential, t.ema_decay)
        self.step += 1
        total = dist_utils.all_reduce_sum([float(loss.detach())])[0]
        return {"step": self.step, "loss": total, "lr": lr, "grad_norm": float(gnorm)}

    def _compiled_loss(self, batch, graph, tgt, force_mask, want_stress, w_e, w_f):
        """(loss, gradients) of ``train_step``'s loss from :class:`CompiledStep` (the same loss
        as the eager step's ``loss_terms``, divided by the same global ``loss_counts``)."""
        from est_calc.training.compiled import CompiledStep

        cfg, t = self.cfg, self.cfg.train
        if not graph.paired:
            raise RuntimeError("train.compile needs symmetric neighbour lists; this batch's "
                               "list is not (train without train.compile)")
        if self._compiled is None:
            self._compiled = CompiledStep(self.fast)
        counts = dist_utils.all_reduce_sum(list(loss_counts(
            tgt.energy.shape[0], force_mask, tgt.has_stress if want_stress else None)))
        threads = t.threads or torch.get_num_threads()  # fixed: compiled kernels keep theirs
        self.fast.train()
        with intra_op_threads(threads), self.fast.model.fixed_grid():
            return self._compiled(
                batch, graph, energy=tgt.energy, forces=tgt.forces,
                stress=tgt.stress if want_stress else None, has_stress=tgt.has_stress,
                n_atoms=tgt.n_atoms, force_mask=force_mask,
                weights=(w_e, w_f, cfg.loss.stress_weight), counts=counts,
                kind=cfg.loss.kind, delta=cfg.loss.huber_delta, with_stress=want_stress)

    # ---------------------------------------------------------------- loop
    def fit(self, stop_at_step: int | None = None) -> Path | None:
        """Train up to ``max_steps`` (from wherever a resumed run stands); export the potential.

        Args:
            stop_at_step: stop early at this step without exporting (a time-boxed chunk of a
                longer run; continue it later with ``resume=True``). The schedule still
                follows ``max_steps``.
        """
        from tqdm.auto import tqdm

        t = self.cfg.train
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            logger.info("%s", self.data_report.summary() if hasattr(self.data_report, "summary")
                        else self.data_report)
        bar = tqdm(total=self.max_steps, initial=self.step, disable=not t.progress or self.rank != 0,
                   desc="train", unit="step")
        t0 = clock() - self.elapsed_s
        first_step = self.step
        try:
            while self.step < (self.max_steps if stop_at_step is None
                               else min(stop_at_step, self.max_steps)):
                step_t0 = clock()
                row = self.train_step()
                step_s = clock() - step_t0
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4g}")
                self.elapsed_s = clock() - t0
                if t.time_budget_s is not None:
                    self._plan_budget(first_step, step_s)
                if self.step % t.log_every == 0 or self.step == self.max_steps:
                    self.history.append({"step": row["step"], "loss": row["loss"], "lr": row["lr"]})
                if self.step % t.eval_every == 0 or self.step == self.max_steps:
                    self._evaluate_and_log()
                self.elapsed_s = clock() - t0
                if (self.step % t.checkpoint_every == 0 or self.step == self.max_steps
                        or self.step == stop_at_step):
                    self._checkpoint()
        finally:
            self._batches = None  # ends the DataLoader's worker processes
            bar.close()
        if self.step < self.max_steps:
            return None
        path = self.out / "potential.pt"
        if self.rank == 0:
            self._export(path)
        dist_utils.barrier()
        return path

    def _plan_budget(self, first_step: int, step_s: float) -> None:
        """Fit the schedule into ``train.time_budget_s`` (see TrainSection); called every step.

        After CALIBRATION_WARMUP_STEPS untimed steps, the pace of the next CALIBRATION_STEPS
        steps of this process sets ``max_steps`` to the steps that fit into 90 % of what is left
        of the budget. The pace is the mean time of the last quarter of the optimiser steps
        timed so far (at least CALIBRATION_STEPS; ``step_s`` is this step's) plus the time spent
        outside them (evaluation, checkpoints, logging) spread over all of them, so neither one
        long evaluation nor a run of large batches looks like a slow-down. It is watched every
        step, and the plan is made again the same way when the rest of the schedule would
        overrun the budget (a run that slowed down: shorter, so the cosine still decays fully)
        or would leave more than REPLAN_SLACK of the budget unused (a slow-down that passed,
        another job on the machine that ended: longer again, never beyond ``train.max_steps``);
        between the two the plan stands, so noise does not move it. A run that has used up the
        whole budget anyway ends at the current step. Ranks agree on every decision (the
        smallest plan of any rank, any-rank stop).
        """
        t = self.cfg.train
        done_here = self.step - first_step
        now = clock()
        if done_here == CALIBRATION_WARMUP_STEPS:
            self._pace = {"since": now, "prefix": [0.0]}  # running sums of the step times
        elif done_here > CALIBRATION_WARMUP_STEPS:
            prefix = self._pace["prefix"]
            prefix.append(prefix[-1] + step_s)
        left = max(t.time_budget_s - self.elapsed_s, 0.0)
        plan = float(self.max_steps)
        pace = float("nan")
        timed = done_here - CALIBRATION_WARMUP_STEPS
        if timed >= CALIBRATION_STEPS:
            prefix = self._pace["prefix"]
            n = len(prefix) - 1
            outside = max(now - self._pace["since"] - prefix[-1], 0.0) / n
            # The last quarter of the steps timed (at least CALIBRATION_STEPS): long enough that
            # batches of different sizes average out, short enough to follow a lasting change.
            w = min(n, max(CALIBRATION_STEPS, n // 4))
            pace = (prefix[-1] - prefix[-1 - w]) / w + outside
            needed = (self.max_steps - self.step) * pace
            # A plan leaves 10 % of what was left unused (final evaluation, export, noise); it is
            # made again when the rest would overrun, or would leave REPLAN_SLACK of the whole
            # budget unused (measured against the whole budget, not against what is left, which
            # tends to zero at the end of any run).
            unused = left - needed
            if not self.budget_planned or unused < 0 or unused > REPLAN_SLACK * t.time_budget_s:
                plan = float(max(self.step, min(t.max_steps, self.step + int(0.9 * left / pace))))
        over_any, neg_plan = dist_utils.all_reduce_max(
            [1.0 if self.elapsed_s >= t.time_budget_s else 0.0, -plan])
        plan = int(-neg_plan)
        if over_any > 0 and self.step < self.max_steps:
            if self.rank == 0:
                logger.info("time budget %.0f s used up at step %d of %d: stopping here",
                            t.time_budget_s, self.step, self.max_steps)
            self._set_max_steps(self.step)
            self.budget_planned = True
        elif plan != self.max_steps or (timed >= CALIBRATION_STEPS and not self.budget_planned):
            if self.rank == 0:
                what = ("set" if not self.budget_planned
                        else "shortened" if plan < self.max_steps else "lengthened")
                logger.info("time budget %.0f s: %.3f s per step, schedule %s to %d steps at "
                            "step %d (max_steps %d)", t.time_budget_s, pace, what, plan,
                            self.step, t.max_steps)
            self._set_max_steps(plan)
            self.budget_planned = True

    def _evaluate_and_log(self) -> None:
        if self.rank != 0 or self.val_frames is None:
            return
        m = evaluate(self.ema, self.val_frames, energy_mode=self.cfg.data.energy,
                     batch_size=self.cfg.train.batch_size, device=self.device,
                     neighbor_backend=self.cfg.train.neighbor_backend)
        last = next((h for h in reversed(self.history) if "loss" in h), {})
        row = {"step": self.step, "elapsed_s": round(self.elapsed_s, 2),
               "train_loss": last.get("loss", float("nan")),
               **{f"val_{k}": v for k, v in m.items()}}
        # Steps per second since the previous evaluation (evaluations included).
        prev = next((h for h in reversed(self.history) if "elapsed_s" in h), None)
        if prev is not None and row["elapsed_s"] > prev["elapsed_s"]:
            rate = (self.step - prev["step"]) / (row["elapsed_s"] - prev["elapsed_s"])
        else:
            rate = self.step / max(self.elapsed_s, 1e-9)
        self.history.append(row)
        logger.info("step %d/%d  %.1f steps/s  val energy RMSE %.2f meV (%.3f meV/atom)  "
                    "force RMSE %.1f meV/Å", self.step, self.max_steps, rate,
                    1000 * m.get("energy_rmse", float("nan")),
                    1000 * m.get("energy_per_atom_rmse", float("nan")),
                    1000 * m.get("forces_rmse", float("nan")))
        self._write_csv_and_plot()

    def _write_csv_and_plot(self) -> None:
        rows = [h for h in self.history if "val_energy_mae" in h]
        if not rows:
            return
        keys = list(rows[-1].keys())
        tmp = self.out / "metrics.csv.tmp"
        try:
            with open(tmp, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)
            os.replace(tmp, self.out / "metrics.csv")
        finally:
            if tmp.exists():
                tmp.unlink()
        from est_calc.training.plots import plot_learning_curves

        plot_learning_curves(self.history, self.out / "learning_curves.png")

    def _export(self, path: Path) -> None:
        # float32 weights unless the run trained in float64 (then the references and weights
        # keep their precision; the calculator casts to the dtype it is asked for).
        final = copy.deepcopy(self.ema).to(dtype=torch.float64 if self.dtype == torch.float64
                                           else torch.float32, device="cpu")
        val = [h for h in self.history if "val_energy_mae" in h]
        final.metadata = dict(final.metadata or {})
        earlier = final.metadata.get("training")
        final.metadata.update({
            "training": {
                "init": str(self.init) if self.init is not None else None,
                "init_training": earlier if self.init is not None else None,
                "train_data": str(self.cfg.data.train),
                "val_data": str(self.cfg.data.val),
                "n_train_frames": len(self.train_frames),
                "energy": self.cfg.data.energy,
                "steps": self.step,
                "max_steps": self.cfg.train.max_steps,
                "time_budget_s": self.cfg.train.time_budget_s,
                "batch_size": self.cfg.train.batch_size,
                "processes": self.world,
                "wall_time_s": round(self.elapsed_s, 1),
            },
            "val_metrics": {k[4:]: float(v) for k, v in val[-1].items() if k.startswith("val_")} if val else {},
        })
        save_potential(final, path)


def train(cfg: TrainConfig, *, init: str | None = None, resume: bool = False,
          overwrite: bool = False) -> Path:
    """Run (or resume) a training run and return the path of the exported potential.

    See :class:`Trainer` for what is checked before any work (config values, data, elements,
    an ``output_dir`` that already holds a run unless ``resume`` or ``overwrite``).
    """
    trainer = Trainer(cfg, init=init, resume=resume, overwrite=overwrite)
    try:
        return trainer.fit()
    finally:
        dist_utils.cleanup()
