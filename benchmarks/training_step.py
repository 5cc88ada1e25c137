"""Time of one molecular training step, eager against ``train.compile`` (issue 22), in one process.

Two trainers on the same data and configuration (the "molecule" preset, batch 5, the 3BPA
recipe's loss weights and AMSGrad, float32), one with ``train.compile``; after the compiled one
has traced and compiled its graph (timed apart, as ``compile_s``) and both have warmed up, they
alternate in rounds of ``--steps`` steps and the median ``Trainer.train_step`` time of each is
printed with their ratio. A step is the whole of it: collation, neighbour list, forward, forces,
the force loss's second derivative, clipping, AMSGrad and the EMA.

Data: the first 100 configurations of a real DFT set (``--data``, extended XYZ with energies and
forces; default 3BPA ``train_300K.xyz`` from ../shared/data/real_dft).

Usage:
    python benchmarks/training_step.py [--threads 2] [--steps 20] [--rounds 3]
    python benchmarks/training_step.py --quick     # toy size, the traced graph without Inductor
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "real_dft" / "3bpa" / "train_300K.xyz"


def _trainer(data: Path, out: Path, *, preset: str, compile_: bool, threads: int, dtype: str):
    from est_calc.training.config import TrainConfig
    from est_calc.training.trainer import Trainer

    return Trainer(TrainConfig.from_dict({
        "output_dir": str(out),
        "data": {"train": str(data / "train.xyz"), "val": str(data / "valid.xyz")},
        "model": {"preset": preset},
        "loss": {"energy_weight": 1.0, "force_weight": 1000.0},
        "train": {"max_steps": 1_000_000, "batch_size": 5, "lr": 0.01, "optimizer": "adam",
                  "amsgrad": True, "warmup_steps": 20, "eval_every": 1_000_000,
                  "checkpoint_every": 1_000_000, "threads": threads, "device": "cpu",
                  "dtype": dtype, "progress": False, "compile": compile_},
    }))


def _steps(trainer, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t0)
    return times


def run(args) -> str:
    from est_calc.training import compiled

    torch.set_num_threads(args.threads)
    backend = compiled.DEFAULT_BACKEND
    if args.quick:  # the traced graph as it is: the script's path in seconds, not its speed
        compiled.DEFAULT_BACKEND = "eager"
    try:
        return _run(args)
    finally:
        compiled.DEFAULT_BACKEND = backend


def _run(args) -> str:
    from ase.io import read, write

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        frames = read(str(args.data), index=":100")
        if len(frames) < 20:
            raise SystemExit(f"--data: {args.data} holds {len(frames)} configurations; need 20")
        write(tmp / "train.xyz", frames[:-10])
        write(tmp / "valid.xyz", frames[-10:])
        preset = "tiny" if args.quick else args.preset
        eager = _trainer(tmp, tmp / "eager", preset=preset, compile_=False,
                         threads=args.threads, dtype=args.dtype)
        fast = _trainer(tmp, tmp / "fast", preset=preset, compile_=True,
                        threads=args.threads, dtype=args.dtype)
        t0 = time.perf_counter()
        fast.train_step()
        first = time.perf_counter() - t0
        _steps(fast, args.warmup)
        _steps(eager, 1 + args.warmup)
        times = {"eager": [], "compiled": []}
        for _ in range(args.rounds):
            times["eager"] += _steps(eager, args.steps)
            times["compiled"] += _steps(fast, args.steps)
    e, c = (1e3 * statistics.median(times[k]) for k in ("eager", "compiled"))
    n_atoms = len(frames[0])
    lines = [
        (f"Training step, 5 molecules of {n_atoms} atoms ({args.data.name}), preset {preset}, "
         f"{args.dtype}, {args.threads} thread(s), {args.rounds} alternating rounds of "
         f"{args.steps} steps"),
        "",
        "| step | median ms | q25-q75 ms |",
        "|---|---|---|",
    ]
    for key, label in (("eager", "eager"), ("compiled", "train.compile")):
        q = statistics.quantiles([1e3 * t for t in times[key]], n=4)
        lines.append(f"| {label} | {1e3 * statistics.median(times[key]):.1f} | "
                     f"{q[0]:.1f}-{q[2]:.1f} |")
    lines += ["", (f"compiled / eager speed: **{e / c:.2f}x**; first compiled step (trace, "
                   f"compile, checks against the eager step): {first:.1f} s")]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="extended XYZ with energies and forces (3BPA train_300K.xyz)")
    p.add_argument("--preset", default="molecule")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--steps", type=int, default=20, help="steps per round (20)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true",
                   help="tiny preset, 2 steps, the traced graph without Inductor (a smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.warmup = 2, 1, 1
    if min(args.threads, args.steps, args.rounds) < 1 or args.warmup < 0:
        p.error("--threads, --steps and --rounds must be >= 1 and --warmup >= 0")
    if not args.data.is_file():
        print(f"training_step.py: no data file {args.data}", file=sys.stderr)
        return 2
    print(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
