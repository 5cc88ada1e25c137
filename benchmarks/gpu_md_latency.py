"""MD step latency of one structure: eager calls against the captured CUDA graph (issue 23, item 4).

One run, per size of Cu fcc bulk (1,000 atoms, 5 x 5 x 10 cubic cells, and 864, 6 x 6 x 6, by
default), through ``ESTCalculator`` with the shipped potential, Verlet skin 1 Å:

1. ms per MD step (ASE VelocityVerlet, 2 fs, NVE from 300 K), eager and ``cuda_graph=True``, each
   after its warm-up steps (the capture happens there), and the ratio; captures and neighbour
   list builds during the timed steps;
2. where the time of one step goes: the calculator's call (neighbour list, checks, results to the
   host), the model step alone (eager ``energy_forces_stress``; captured: copies in, replay,
   copies out) and, captured, the bare replay;
3. max |F_graph - F_eager| (and |dE|, |d stress|) at the configurations both runs end at, each
   evaluated by the other calculator: round-off is the expectation;
4. ``--profile`` (CUDA): the kernels of one replayed step, the count and the most expensive;
5. ``--compile``: a second graph row, ``compile=True`` as well, whose graph records the compiled
   network (the first call compiles, minutes).

Target: <= 5 ms per MD step at 1,000 atoms on an H100/H200 (``cuda_graph=True``).

On the device machine, after ``bash benchmarks/gpu_wheels.sh`` here (carry [".whl"]):
    python3 benchmarks/gpu_md_latency.py --wheels .whl --out $OUT --profile
Here, without a GPU, ``--device cpu --atoms 32 --steps 5`` runs every part at toy size; the CPU has
no CUDA graphs, so the "graph" calculator runs the padded step eagerly (the code a graph records).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
for _p in (str(ROOT), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _common import cu_bulk_atoms, median_time, sync  # noqa: E402

TARGET_MS = 5.0
TARGET_ATOMS = 1000


def install_est_wheels(wheels: str | None, argv: list[str]) -> int | None:
    """pip-install the carried est wheels (ase, vesin, ...) and run this script again with them
    first on PYTHONPATH; None (doing nothing) without ``wheels`` or inside that child."""
    if not wheels or os.environ.get("EST_GPU_WHEELS_DONE"):
        return None
    from gpu import install_wheels

    target = install_wheels(Path(wheels), ("est",)).get("est", "")
    env = dict(os.environ, EST_GPU_WHEELS_DONE="1")
    env["PYTHONPATH"] = os.pathsep.join([target, str(ROOT), env.get("PYTHONPATH", "")]).strip(
        os.pathsep)
    return subprocess.call([sys.executable, __file__, *argv], env=env)


def make_calculators(model: str, device: str, dtype: str, skin: float, modes: list[str]):
    """The eager calculator and {mode: (calculator, what it runs)} on ``device``. Mode "graph":
    ``cuda_graph=True``, or off CUDA the padded step run eagerly (set by hand: the calculator
    refuses CUDA graphs there); "graph+compile": the same with ``compile=True``, so that the
    graph records the compiled network."""
    import torch

    from est_calc.accel.graphs import CapturedStep
    from est_calc.calculator import ESTCalculator
    from est_calc.potential import load_potential

    potential = load_potential(model, device=device, dtype=getattr(torch, dtype))
    for p in potential.parameters():  # frozen, as in a calculator that loads the potential itself
        p.requires_grad_(False)
    eager = ESTCalculator(potential, device=device, dtype=dtype, skin=skin)
    calcs = {}
    for mode in modes:
        compile_ = mode == "graph+compile"
        if device.startswith("cuda"):
            calc = ESTCalculator(potential, device=device, dtype=dtype, skin=skin,
                                 compile=compile_, cuda_graph=True)
            what = "CUDA graph" + (" of the compiled network" if compile_ else "")
        else:
            calc = ESTCalculator(potential, device=device, dtype=dtype, skin=skin,
                                 compile=compile_)
            calc.captured_step = CapturedStep(calc.potential, capture=False)
            what = "padded step, eager (no CUDA graphs off CUDA)"
        calcs[mode] = (calc, what)
    return eager, calcs


def run_md(calc, atoms0, steps: int, warmup: int, device: str) -> tuple:
    """(atoms after warm-up + steps, seconds of the warm-up steps (the capture happens there),
    seconds per timed step, captures and list builds during the timed steps)."""
    from ase import units
    from ase.md.verlet import VelocityVerlet

    atoms = atoms0.copy()
    atoms.calc = calc
    dyn = VelocityVerlet(atoms, timestep=2.0 * units.fs)
    t0 = time.perf_counter()
    dyn.run(warmup)
    sync(device)
    warmup_s = time.perf_counter() - t0
    step = calc.captured_step
    captures0 = step.n_captures if step is not None else 0
    builds0 = calc.neighbor_list.n_builds if calc.neighbor_list is not None else 0
    t0 = time.perf_counter()
    dyn.run(steps)
    sync(device)
    seconds = (time.perf_counter() - t0) / steps
    captures = (step.n_captures - captures0) if step is not None else 0
    builds = (calc.neighbor_list.n_builds - builds0) if calc.neighbor_list is not None else steps
    return atoms, warmup_s, seconds, captures, builds


def agreement(eager, graph, configurations) -> dict:
    """Largest |F_graph - F_eager|, |dE| and |d stress| over ``configurations``, each evaluated
    by both calculators."""
    import numpy as np

    df = de = ds = 0.0
    for atoms in configurations:
        results = []
        for calc in (eager, graph):
            probe = atoms.copy()
            probe.calc = calc
            results.append((probe.get_forces(), probe.get_potential_energy(), probe.get_stress()))
        (f_e, e_e, s_e), (f_g, e_g, s_g) = results
        df = max(df, float(np.abs(f_g - f_e).max()))
        de = max(de, abs(e_g - e_e))
        ds = max(ds, float(np.abs(s_g - s_e).max()))
    return {"max_force_diff_eV_per_A": df, "energy_diff_eV": de, "max_stress_diff_eV_per_A3": ds}


def breakdown(calc, atoms, device: str, repeats: int) -> dict:
    """ms of one calculator call (positions changed: neighbour list, checks, model, results to
    the host), of the model step alone (eager: ``energy_forces_stress``; captured: copies in,
    replay, copies out) and of the bare replay (CUDA graphs), at ``atoms``."""
    from est_calc.batch import AtomsBatch
    from est_calc.forces import energy_forces_stress
    from est_calc.neighbors import build_graph
    from est_calc.threads import choose_threads, intra_op_threads

    props = ["energy", "forces", "stress"]
    probe = atoms.copy()
    probe.calc = calc
    probe.get_forces()
    out = {"call_ms": 1e3 * median_time(lambda: calc.calculate(probe, props, ["positions"]),
                                        repeats=repeats, device=device)}
    batch = AtomsBatch.from_atoms(probe, device=calc.device, dtype=calc.dtype)
    graph = (calc.neighbor_list(batch) if calc.neighbor_list is not None
             else build_graph(batch, calc.cutoff_A, paired=True))
    step = calc.captured_step
    threads = choose_threads(graph.n_edges, calc.threads)  # as the calculator's own calls
    if step is None:
        def model_step():
            with intra_op_threads(threads):
                return energy_forces_stress(calc.potential, batch, graph, compute_stress=True)
    else:
        numbers = probe.numbers

        def model_step():
            with intra_op_threads(threads):
                return step(batch, graph, compute_stress=True, numbers=numbers)
    out["model_step_ms"] = 1e3 * median_time(model_step, repeats=repeats, device=device)
    if step is not None:
        out["capacity_atoms_edges"] = list(step.capacity)
        out["edges"] = graph.n_edges
        if step._graph is not None:
            out["replay_ms"] = 1e3 * median_time(step._graph.replay, repeats=repeats,
                                                 device=device)
    return out


def profile_replay(graph, n_replays: int = 10) -> dict:
    """CUDA kernels of one replay of ``graph``'s captured step: count and the costliest."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    replay = graph.captured_step._graph.replay
    replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n_replays):
            replay()
        torch.cuda.synchronize()
    rows, kernels, total_us = [], 0, 0.0
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", None)
        if us is None:
            us = getattr(evt, "self_cuda_time_total", 0.0)
        if us <= 0:
            continue
        kernels += evt.count
        total_us += us
        rows.append((us / n_replays, evt.count / n_replays, evt.key[:70]))
    rows.sort(reverse=True)
    return {"kernels_per_step": kernels / n_replays,
            "gpu_busy_ms_per_step": total_us / n_replays / 1e3,
            "top": [[f"{us / 1e3:.3f}", f"{count:.0f}", name] for us, count, name in rows[:15]]}


def measure(n_atoms: int, args, device: str, modes: list[str], report: dict,
            lines: list[str]) -> None:
    """Every part of the module docstring for the Cu fcc bulk of ``n_atoms`` atoms: one row per
    mode, each against the same eager run."""
    import numpy as np
    from ase import units

    atoms = cu_bulk_atoms(n_atoms)
    # Maxwell-Boltzmann momenta at the initial temperature (seed 0), total momentum zero
    masses = atoms.get_masses()[:, None]
    momenta = np.random.default_rng(0).normal(size=(len(atoms), 3)) * np.sqrt(
        masses * units.kB * args.temperature)
    atoms.set_momenta(momenta - masses * momenta.sum(axis=0) / masses.sum())
    eager, calcs = make_calculators(args.model, device, args.dtype, args.skin, modes)
    end_e, warm_e, s_e, _, builds_e = run_md(eager, atoms, args.steps, args.warmup, device)
    base = breakdown(eager, end_e, device, args.repeats)
    for mode, (calc, what) in calcs.items():
        t_mode = time.perf_counter()
        end_g, warm_g, s_g, captures, builds_g = run_md(calc, atoms, args.steps, args.warmup,
                                                        device)
        row = {"atoms": n_atoms, "mode": mode, "graph_path": what, "steps": args.steps,
               "warmup": args.warmup, "eager_ms_per_step": 1e3 * s_e,
               "graph_ms_per_step": 1e3 * s_g, "speed_up": s_e / s_g,
               "captures_in_timed_steps": captures,
               "captures_in_all": calc.captured_step.n_captures,
               "graph_recorded": calc.captured_step.captures,
               "capture_failure": calc.captured_step.failure,
               "list_builds_eager": builds_e, "list_builds_graph": builds_g,
               "trajectories_max_position_diff_A": float(np.abs(end_g.positions
                                                               - end_e.positions).max()),
               "eager_warmup_s": warm_e, "graph_warmup_s": warm_g}
        row.update(agreement(eager, calc, [end_g, end_e]))
        row.update({f"eager_{k}": v for k, v in base.items()})
        row.update({f"graph_{k}": v for k, v in breakdown(calc, end_g, device,
                                                          args.repeats).items()})
        if args.profile and device.startswith("cuda"):
            try:
                row["profile"] = profile_replay(calc)
            except Exception as err:  # the profile is extra: its failure must not lose the rest
                row["profile"] = {"error": f"{type(err).__name__}: {err}"}
        row["seconds"] = time.perf_counter() - t_mode
        if device.startswith("cuda") and n_atoms == TARGET_ATOMS:
            row["target_met"] = row["graph_ms_per_step"] <= TARGET_MS
        report["rows"].append(row)
        lines.append(
            f"| {n_atoms} | {mode} | {row['eager_ms_per_step']:.2f} "
            f"| {row['graph_ms_per_step']:.2f} | {row['speed_up']:.2f}x "
            f"| {row['max_force_diff_eV_per_A']:.1e} | {row['energy_diff_eV']:.1e} "
            f"| {captures} | {builds_g} | {row['eager_call_ms']:.2f} / {row['graph_call_ms']:.2f} "
            f"| {row['eager_model_step_ms']:.2f} / {row['graph_model_step_ms']:.2f} "
            f"| {row.get('graph_replay_ms', float('nan')):.2f} |")
        print(lines[-1], flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wheels", default=None, help="folder with the est/ wheels (device machine)")
    p.add_argument("--out", default=None, help="write gpu_md_latency.md and .json here")
    p.add_argument("--device", default="auto", help="cuda | cpu | auto")
    p.add_argument("--atoms", default="1000,864", help="comma-separated bulk sizes (4 k)")
    p.add_argument("--steps", type=int, default=200, help="timed MD steps per calculator")
    p.add_argument("--warmup", type=int, default=10, help="MD steps before the timing")
    p.add_argument("--repeats", type=int, default=None, help="repeats of the breakdown timings")
    p.add_argument("--skin", type=float, default=1.0, help="Verlet skin, Å")
    p.add_argument("--temperature", type=float, default=300.0, help="initial K")
    p.add_argument("--model", default="est-emt-small", help="potential name or file")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--compile", action="store_true",
                   help="also mode graph+compile: compile=True, the graph records the compiled "
                        "network (its first call compiles: minutes)")
    p.add_argument("--profile", action="store_true", help="kernels of one replay (CUDA)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds: sizes that would start later are skipped (listed)")
    args = p.parse_args(argv)
    argv_list = list(argv if argv is not None else sys.argv[1:])
    status = install_est_wheels(args.wheels, argv_list)
    if status is not None:
        return status

    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device visible to torch; use --device cpu --atoms 32 --steps 5 for a "
              "dry run")
        return 2
    if args.repeats is None:
        args.repeats = 30 if device.startswith("cuda") else 3
    sizes = [int(s) for s in args.atoms.split(",") if s.strip()]
    modes = ["graph"] + (["graph+compile"] if args.compile else [])
    for n in sizes:
        cu_bulk_atoms(n)  # refuse a size that is not a Cu fcc bulk before any work
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    report = {"device": device, "device_name": name, "torch": torch.__version__,
              "model": args.model, "dtype": args.dtype, "skin_A": args.skin,
              "compile": args.compile, "target_ms": TARGET_MS, "rows": [], "skipped": []}
    title = (f"# MD step latency, eager against cuda_graph=True "
             f"({time.strftime('%Y-%m-%d %H:%M')})")
    setting = (f"{name}, torch {torch.__version__}, {args.model} in {args.dtype}, "
               f"skin {args.skin} Å, VelocityVerlet 2 fs from {args.temperature:g} K, "
               f"{args.steps} timed steps after {args.warmup}")
    header = ("| atoms | mode | eager ms/step | graph ms/step | speed-up | max |dF| eV/Å "
              "| |dE| eV | captures (timed) | list builds (timed) | call ms eager / graph "
              "| model step ms eager / graph | replay ms |")
    lines = [title, "", setting, "", header, "|" + "---|" * 12]
    out = Path(args.out) if args.out else None
    t_start = time.perf_counter()

    def write() -> None:
        if out is None:
            return
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_md_latency.md").write_text("\n".join(lines) + "\n")
        (out / "gpu_md_latency.json").write_text(json.dumps(report, indent=1, default=str))

    failed = False
    for n in sizes:
        spent = time.perf_counter() - t_start
        if args.budget is not None and spent > args.budget:
            report["skipped"].append(n)
            lines.append(f"| {n} | skipped: {spent:.0f} s of the {args.budget:.0f} s budget "
                         "spent |" + " |" * 10)
            continue
        try:
            measure(n, args, device, modes, report, lines)
        except Exception as err:  # one failing size must not hide the others
            import traceback

            failed = True
            report["rows"].append({"atoms": n, "error": f"{type(err).__name__}: {err}",
                                   "traceback": traceback.format_exc(limit=6)})
            lines.append(f"| {n} | FAILED: {type(err).__name__}: {str(err)[:120]} |" + " |" * 10)
            print(lines[-1], flush=True)
        write()
    for row in report["rows"]:
        if "target_met" in row:
            verdict = (f"Target (<= {TARGET_MS:g} ms per step at {TARGET_ATOMS} atoms, "
                       f"{row['mode']}): {'met' if row['target_met'] else 'not met'} "
                       f"({row['graph_ms_per_step']:.2f} ms)")
            lines += ["", verdict]
        prof = row.get("profile")
        if prof and "top" in prof:
            summary = (f"Replay at {row['atoms']} atoms ({row['mode']}): "
                       f"{prof['kernels_per_step']:.0f} kernels, "
                       f"{prof['gpu_busy_ms_per_step']:.2f} ms of kernel time per step")
            lines += ["", summary, "", "| ms / step | calls / step | kernel |", "|---|---|---|"]
            lines += [f"| {a} | {b} | {c} |" for a, b, c in prof["top"]]
    lines += ["", f"({time.perf_counter() - t_start:.0f} s in all)"]
    write()
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
