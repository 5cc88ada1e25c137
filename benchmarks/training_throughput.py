"""Training throughput (structures/s) of est_calc's Trainer beside MACE-small on the same data.

Data: ``est_calc.training.synthetic.generate`` (EMT-labelled slabs with H/C/N/O adsorbates, bulk
and gas molecules; seeded). EST: ``Trainer.train_step()`` with the "small" preset (batch
collation, neighbour list, energy+forces with create_graph, energy + 10 x force L2 loss,
backward, gradient clipping, AdamW, EMA). MACE-small: forward with forces (create_graph),
the same loss, backward, clipping and AdamW on the same frames (in a fixed shuffled order),
with its neighbour lists built once before timing, as MACE's own training does; so the EST
figure includes graph building and the MACE one does not. Median step time after warm-up.

Usage: python benchmarks/training_throughput.py [--quick | --full] [--device cpu|cuda]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from _common import (PEER_UNAVAILABLE, base_parser, fmt_ms, markdown_table, resolve_device,
                     run_peer, sync)


def make_data(out_dir: Path, n_systems: int, seed: int = 0) -> dict:
    """Generate the synthetic data set into ``out_dir`` (extxyz + HDF5); returns its summary."""
    from est_calc.training.synthetic import generate

    return generate(out_dir, n_systems=n_systems, seed=seed, formats=("extxyz", "hdf5"),
                    progress=False)


def export_for_peer(extxyz: Path, out: Path, seed: int = 0) -> tuple[Path, float]:
    """Write the frames with "ref_energy"/"ref_forces" labels in a seeded random order.

    Returns:
        (path, mean atoms per frame).
    """
    import numpy as np
    from ase.io import read, write

    frames = read(str(extxyz), index=":")
    order = np.random.default_rng(seed).permutation(len(frames))
    clean = []
    for k in order:
        atoms = frames[k]
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        a = atoms.copy()
        a.calc = None
        a.info = {"ref_energy": float(energy)}
        a.arrays = {key: a.arrays[key] for key in ("numbers", "positions")}
        a.new_array("ref_forces", np.asarray(forces, dtype=float))
        clean.append(a)
    write(str(out), clean, format="extxyz")
    return out, float(np.mean([len(a) for a in clean]))


def time_est(data_h5: Path, out_dir: Path, *, batch_size: int, steps: int, device: str,
             dtype: str) -> dict:
    """Median step time and structures/s of ``Trainer.train_step`` (one warm-up step)."""
    from est_calc.training.config import TrainConfig
    from est_calc.training.trainer import Trainer

    cfg = TrainConfig.from_dict({
        "output_dir": str(out_dir),
        "data": {"train": str(data_h5)},
        "model": {"preset": "small"},
        "train": {"batch_size": batch_size, "max_steps": steps + 1, "warmup_steps": 1,
                  "device": device, "dtype": dtype, "progress": False},
    })
    trainer = Trainer(cfg)
    n_params = trainer.potential.model.num_parameters()
    trainer.train_step()  # warm-up
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"params": n_params, "median_step_s": statistics.median(times),
            "structures_per_s": batch_size * steps / sum(times)}


def run(args) -> str:
    """The training table as one markdown string."""
    device = resolve_device(args.device)
    steps = args.steps or (3 if args.quick else 20)
    batch_size = args.batch_size
    n_systems = 2 if args.quick else 8
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        summary = make_data(tmp / "data", n_systems)
        est = time_est(tmp / "data" / "synthetic.h5", tmp / "run", batch_size=batch_size,
                       steps=steps, device=device, dtype=args.dtype)
        peer_file, mean_atoms = export_for_peer(tmp / "data" / "synthetic.extxyz",
                                                tmp / "peer.extxyz")
        if args.no_peer:
            peer = {"error": "skipped (--no-peer)"}
        else:
            peer = run_peer("train", {"structures": str(peer_file), "batch_size": batch_size,
                                      "steps": steps, "warmup": 1, "device": device,
                                      "dtype": args.dtype})
    rows = [["EST-small (Trainer.train_step)", f"{est['params']:,}", fmt_ms(est["median_step_s"]),
             f"{est['structures_per_s']:.2f}", f"{est['structures_per_s'] * mean_atoms:,.0f}"]]
    if "error" in peer:
        rows.append(["MACE-small", "-", "-", PEER_UNAVAILABLE, "-"])
        ratio_line = f"MACE-small: {PEER_UNAVAILABLE} ({peer['error']})."
    else:
        rows.append(["MACE-small (forward+loss+backward+AdamW)", f"{peer['params']:,}",
                     fmt_ms(peer["median_step_s"]), f"{peer['structures_per_s']:.2f}",
                     f"{peer['structures_per_s'] * mean_atoms:,.0f}"])
        ratio_line = (f"EST-small / MACE-small training throughput: "
                      f"{est['structures_per_s'] / peer['structures_per_s']:.2f}x.")
    out = [f"### Training throughput ({device}, {args.dtype}, batch {batch_size}, median of "
           f"{steps} steps after 1 warm-up; {summary['n_frames']} synthetic EMT frames, "
           f"{mean_atoms:.0f} atoms/frame on average)", "",
           markdown_table(["model", "params", "ms/step", "structures/s", "~atoms/s"], rows), "",
           ratio_line, "atoms/s = structures/s x mean frame size (an estimate: batches differ).",
           ""]
    return "\n".join(out)


def main(argv=None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="timed steps (20; quick: 3)")
    p.add_argument("--batch-size", type=int, default=4, help="structures per step (4)")
    args = p.parse_args(argv)
    if args.batch_size < 1 or (args.steps is not None and args.steps < 1):
        raise ValueError("--batch-size and --steps must be >= 1")
    print(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
