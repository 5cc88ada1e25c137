"""MACE-small peer runner for the benchmarks (run with the MACE env's python, not est_calc's).

Usage: .venv-mace/bin/python benchmarks/_peer_mace.py TASK 'JSON-OPTIONS'

Builds an untrained MACE with the MACE-MP-0 "small" hyper-parameters (hidden irreps 128x0e,
max_ell 3, correlation 3, 2 interactions, r_max 6 Å, 89 elements, radial MLP [64, 64, 64]);
speed and memory do not depend on trained weights. Tasks (each prints one JSON line):

- ``infer``: {"structures": extxyz path, "repeats", "warmup", "device", "dtype"} ->
  {"model", "params", "results": [{"n_atoms", "median_s"}, ...]}; each call is
  ``MACECalculator.calculate(atoms, ["energy", "forces", "stress"])``.
- ``memory``: {"structures": extxyz path with one structure, "device", "dtype"} ->
  {"n_atoms", "peak_rss_MB", "baseline_rss_MB", "peak_cuda_MB"} for one energy+forces+stress call.
- ``train``: {"structures": extxyz path with "ref_energy" info and "ref_forces" arrays,
  "batch_size", "steps", "warmup", "device", "dtype"} -> {"structures_per_s", "median_step_s"}:
  forward with forces (create_graph), loss = MSE(E/atom) + 10 MSE(F), backward, AdamW step.
  Neighbour lists are built once before timing (as MACE's own training does). The answer also
  has "total_s" (the timed steps together) and "step_times_s".
- ``serve``: {"device", "dtype"}: builds the model once, then answers one JSON line per request
  line read from stdin ({"structures", "repeats", "warmup"}, as ``infer``) until stdin closes.
  Lets a benchmark alternate EST and MACE timings in rounds without paying the peer's start-up
  for every round, so a change of machine load hits both sides alike.
- ``busy_md``: {"structures": extxyz path (the first structure is used), "device", "dtype",
  "reset_every", "temperature_K", "seed"}: a background load for ``contention.py``. Runs
  VelocityVerlet MD (1 fs) with ``MACECalculator`` until it is killed, restarting from the
  initial state every ``reset_every`` steps; prints ``{"ready": true, ...}`` after its first
  step and nothing else. Never returns.

This file is imported by nothing in est_calc; it only needs mace-torch, torch and ase.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time

import numpy as np

N_ELEMENTS = 89
R_MAX_A = 6.0


def build_model(dtype: str, device: str):
    """Untrained ScaleShiftMACE with MACE-MP-0 "small" hyper-parameters, and its parameter count."""
    import torch
    from e3nn import o3
    from mace import modules

    z = list(range(1, N_ELEMENTS + 1))
    block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    torch.manual_seed(0)
    model = modules.ScaleShiftMACE(
        r_max=R_MAX_A, num_bessel=10, num_polynomial_cutoff=5, max_ell=3,
        interaction_cls=block, interaction_cls_first=block, num_interactions=2,
        num_elements=len(z), hidden_irreps=o3.Irreps("128x0e"), MLP_irreps=o3.Irreps("16x0e"),
        atomic_energies=np.zeros(len(z)), avg_num_neighbors=30.0, atomic_numbers=z,
        correlation=3, gate=torch.nn.functional.silu, atomic_inter_scale=1.0,
        atomic_inter_shift=0.0, radial_MLP=[64, 64, 64])
    model = model.to(device=device, dtype=getattr(torch, dtype))
    return model, sum(p.numel() for p in model.parameters())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _calculator(model, device: str, dtype: str):
    from mace.calculators import MACECalculator

    # MACECalculator sets torch's default dtype itself (MACE relies on it); this process is
    # the peer's own, so est_calc is unaffected.
    return MACECalculator(models=model, device=device, default_dtype=dtype)


def task_infer(opt: dict) -> dict:
    device, dtype = opt.get("device", "cpu"), opt.get("dtype", "float32")
    model, n_params = build_model(dtype, device)
    return _time_structures(_calculator(model, device, dtype), n_params, opt)


def _time_structures(calc, n_params: int, opt: dict) -> dict:
    from ase.calculators.calculator import all_changes
    from ase.io import read

    device = opt.get("device", "cpu")
    results = []
    for atoms in read(opt["structures"], index=":"):
        def call():
            calc.calculate(atoms, ["energy", "forces", "stress"], all_changes)
            _sync(device)

        for _ in range(int(opt.get("warmup", 1))):
            call()
        times = []
        for _ in range(int(opt["repeats"])):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        results.append({"n_atoms": len(atoms), "median_s": statistics.median(times)})
    return {"model": "MACE-small", "params": n_params, "results": results}


def task_memory(opt: dict) -> dict:
    import torch
    from ase.calculators.calculator import all_changes
    from ase.io import read

    device, dtype = opt.get("device", "cpu"), opt.get("dtype", "float32")
    atoms = read(opt["structures"], index=0)
    model, _ = build_model(dtype, device)
    calc = _calculator(model, device, dtype)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated() / 2**20
    calc.calculate(atoms, ["energy", "forces", "stress"], all_changes)
    _sync(device)
    out = {"n_atoms": len(atoms), "baseline_rss_MB": base,
           "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if device.startswith("cuda"):
        out["peak_cuda_MB"] = torch.cuda.max_memory_allocated() / 2**20 - base_cuda
    return out


def task_train(opt: dict) -> dict:
    import torch
    from ase.io import read
    from mace import data as mdata
    from mace import tools
    from mace.tools import torch_geometric

    device, dtype = opt.get("device", "cpu"), opt.get("dtype", "float32")
    tdtype = getattr(torch, dtype)
    if dtype != "float32":
        tools.set_default_dtype(dtype)  # MACE builds its data tensors in the default dtype
    frames = read(opt["structures"], index=":")
    model, n_params = build_model(dtype, device)
    z_table = tools.AtomicNumberTable(list(range(1, N_ELEMENTS + 1)))
    graphs = []
    for atoms in frames:
        bare = atoms.copy()
        bare.calc = None
        cfg = mdata.config_from_atoms(bare)
        g = mdata.AtomicData.from_config(cfg, z_table=z_table, cutoff=R_MAX_A)
        g.ref_energy = torch.tensor([float(atoms.info["ref_energy"])], dtype=tdtype)
        g.ref_forces = torch.tensor(atoms.arrays["ref_forces"], dtype=tdtype)
        graphs.append(g)
    bs = int(opt["batch_size"])
    loader = torch_geometric.dataloader.DataLoader(graphs, batch_size=bs, shuffle=False,
                                                   drop_last=False)
    batches = [b.to(device) for b in loader]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    model.train()

    def step(batch) -> None:
        out = model(batch.to_dict(), training=True, compute_force=True)
        n_atoms = (batch.ptr[1:] - batch.ptr[:-1]).to(tdtype)
        e_loss = torch.mean(((out["energy"] - batch.ref_energy) / n_atoms) ** 2)
        f_loss = torch.mean((out["forces"] - batch.ref_forces) ** 2)
        loss = e_loss + 10.0 * f_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        _sync(device)

    n_steps, warmup = int(opt["steps"]), int(opt.get("warmup", 1))
    for k in range(warmup):
        step(batches[k % len(batches)])
    times, n_structs = [], 0
    for k in range(n_steps):
        b = batches[(k + warmup) % len(batches)]
        t0 = time.perf_counter()
        step(b)
        times.append(time.perf_counter() - t0)
        n_structs += int(b.num_graphs)
    return {"model": "MACE-small", "params": n_params, "median_step_s": statistics.median(times),
            "structures_per_s": n_structs / sum(times), "steps": n_steps,
            "total_s": sum(times), "step_times_s": times}


def task_serve(opt: dict) -> None:
    device, dtype = opt.get("device", "cpu"), opt.get("dtype", "float32")
    model, n_params = build_model(dtype, device)
    calc = _calculator(model, device, dtype)
    print(json.dumps({"ready": True, "params": n_params}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = dict(json.loads(line), device=device)
        print(json.dumps(_time_structures(calc, n_params, request)), flush=True)


def die_with_parent() -> None:
    """Have the kernel kill this process when its parent exits (Linux ``PR_SET_PDEATHSIG``).

    Background loads call it first thing, so a benchmark that is killed outright (SIGKILL, a
    timeout of ``run_all.py``) leaves none of them spinning. When the parent is already gone
    (``$EST_BENCH_PARENT_PID`` differs from the parent's pid) the process exits at once.
    No-op where ``prctl`` is missing.
    """
    import ctypes
    import os
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    expected = os.environ.get("EST_BENCH_PARENT_PID")
    if expected and os.getppid() != int(expected):
        os._exit(0)


def md_until_killed(atoms, calc, *, reset_every: int = 200, temperature_K: float = 300.0,
                    seed: int = 0, timestep_fs: float = 1.0) -> None:
    """VelocityVerlet MD with ``calc`` on ``atoms`` forever: a simulation running beside a
    benchmark. Every ``reset_every`` steps it starts again from the initial positions and the
    same seeded velocities (so it never drifts into a state the calculator refuses); prints one
    ``{"ready": true}`` JSON line after its first step. Used by ``busy_md`` and by
    ``contention.py`` for EST (same loop, est_calc's calculator). Never returns."""
    import os

    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    start = atoms.copy()
    start.calc = None
    MaxwellBoltzmannDistribution(start, temperature_K=temperature_K,
                                 rng=np.random.RandomState(seed))
    steps = max(1, int(reset_every))
    ready, failures = False, 0
    while True:
        atoms = start.copy()
        atoms.calc = calc
        dyn = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
        try:
            if not ready:
                dyn.run(1)
                print(json.dumps({"ready": True, "pid": os.getpid(), "n_atoms": len(atoms)}),
                      flush=True)
                ready = True
                dyn.run(steps - 1)
            else:
                dyn.run(steps)
        except Exception as err:  # a load must go on: restart from the start
            failures += 1
            if failures == 1:
                print(f"md_until_killed: {type(err).__name__}: {err}; restarting",
                      file=sys.stderr, flush=True)
            if not ready:
                raise


def task_busy_md(opt: dict) -> None:
    from ase.io import read

    die_with_parent()
    device, dtype = opt.get("device", "cpu"), opt.get("dtype", "float32")
    atoms = read(opt["structures"], index=0)
    model, _ = build_model(dtype, device)
    md_until_killed(atoms, _calculator(model, device, dtype),
                    reset_every=int(opt.get("reset_every", 200)),
                    temperature_K=float(opt.get("temperature_K", 300.0)),
                    seed=int(opt.get("seed", 0)))


TASKS = {"infer": task_infer, "memory": task_memory, "train": task_train, "serve": task_serve,
         "busy_md": task_busy_md}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in TASKS:
        print(f"usage: _peer_mace.py {{{'|'.join(TASKS)}}} 'JSON options'", file=sys.stderr)
        return 2
    result = TASKS[argv[0]](json.loads(argv[1]))
    if result is not None:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
