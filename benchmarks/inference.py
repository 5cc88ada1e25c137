"""Energy + forces + stress speed of EST presets beside MACE-small, and where EST's time goes.

Systems: a 66-atom CO/Cu(111) slab and an 864-atom Cu fcc bulk cell. Each call is a full
``ESTCalculator.calculate(atoms, ["energy", "forces", "stress"])`` (the peer: the same call on
``MACECalculator``), median of N repeats after one warm-up call. EST and MACE (one long-lived
peer process) alternate in rounds, system by system, so a change of machine load during the
run hits both; the throughput ratio t_MACE / t_EST (> 1: EST is faster) is taken within each
round and reported as the median over rounds, with its range. Target of the Performance issue:
"small" >= 5x MACE-small on both systems.

The second table splits one "small" call into: batch building, neighbour list, forward pass
(message blocks, update blocks, the rest) and backward pass (forces and stress by autograd).

Usage: python benchmarks/inference.py [--quick | --full] [--device cpu|cuda] [--repeats N]
       [--rounds N] [--compile]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from _common import (PEER_UNAVAILABLE, PeerSession, base_parser, co_cu_slab, cu_bulk, fmt_ms,
                     markdown_table, median_time, resolve_device, sync, write_structures)

PROPERTIES = ["energy", "forces", "stress"]
SPECIES = [6, 8, 29]
TARGET_RATIO = 5.0


def systems() -> dict:
    """name -> Atoms of the benchmark systems."""
    return {"CO/Cu(111) slab": co_cu_slab(), "Cu bulk": cu_bulk(6)}


def make_calculator(preset: str, device: str, dtype: str, compile: bool = False):
    """An ESTCalculator around an untrained potential of ``preset`` (speed needs no training)."""
    import torch

    from est_calc.calculator import ESTCalculator
    from est_calc.potential import Potential

    torch.manual_seed(0)
    potential = Potential.from_config(preset, species=SPECIES)
    return ESTCalculator(potential, device=device, dtype=dtype, compile=compile)


def time_calculator(calc, atoms, repeats: int, device: str) -> float:
    """Median seconds of one energy+forces+stress calculation of ``atoms``."""
    from ase.calculators.calculator import all_changes

    atoms = atoms.copy()
    return median_time(lambda: calc.calculate(atoms, PROPERTIES, all_changes),
                       repeats=repeats, warmup=1, device=device)


def cost_split(calc, atoms, repeats: int, device: str) -> dict:
    """Median seconds of each stage of one energy+forces+stress call.

    Stages: "batch" (Atoms -> AtomsBatch on the device), "neighbours" (build_graph), "forward"
    (the model, split by forward hooks into "message" and "update" blocks and "other") and
    "backward" (autograd of the energy w.r.t. positions and strain).
    """
    import torch

    from est_calc.batch import AtomsBatch
    from est_calc.geometry import apply_strain, symmetrize
    from est_calc.neighbors import build_graph

    potential = calc.potential
    model = potential.model
    acc = {"message": 0.0, "update": 0.0}
    hooks = []
    for kind, blocks in (("message", model.messages), ("update", model.updates)):
        for block in blocks:
            def pre(_m, _inp):
                sync(device)
                _m._bench_t0 = time.perf_counter()

            def post(_m, _inp, _out, kind=kind):
                sync(device)
                acc[kind] += time.perf_counter() - _m._bench_t0

            hooks += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
    records: dict[str, list] = {k: [] for k in
                                ("batch", "neighbours", "forward", "message", "update", "backward")}
    try:
        for rep in range(repeats + 1):
            acc["message"] = acc["update"] = 0.0
            t0 = time.perf_counter()
            batch = AtomsBatch.from_atoms([atoms], device=device, dtype=calc.dtype)
            sync(device)
            t1 = time.perf_counter()
            graph = build_graph(batch, potential.cutoff_A, backend=calc.neighbor_backend)
            sync(device)
            t2 = time.perf_counter()
            with torch.enable_grad():
                pos = batch.positions.detach().requires_grad_(True)
                strain = torch.zeros(1, 3, 3, dtype=pos.dtype, device=pos.device,
                                     requires_grad=True)
                spos, scell = apply_strain(pos, batch.cell, symmetrize(strain), batch.system_idx)
                out = potential(batch.replace(positions=spos, cell=scell), graph)
                sync(device)
                t3 = time.perf_counter()
                torch.autograd.grad(out.energy.sum(), [pos, strain])
                sync(device)
                t4 = time.perf_counter()
            if rep == 0:
                continue  # warm-up
            for key, val in (("batch", t1 - t0), ("neighbours", t2 - t1), ("forward", t3 - t2),
                             ("message", acc["message"]), ("update", acc["update"]),
                             ("backward", t4 - t3)):
                records[key].append(val)
    finally:
        for h in hooks:
            h.remove()
    import statistics

    med = {k: statistics.median(v) for k, v in records.items()}
    med["other forward"] = max(med["forward"] - med["message"] - med["update"], 0.0)
    med["edges"] = int(graph.n_edges)
    return med


def run(args) -> str:
    """All tables of this benchmark as one markdown string."""
    import contextlib
    import statistics

    import torch

    device = resolve_device(args.device)
    repeats = args.repeats or (2 if args.quick else 5)
    rounds = args.rounds or (3 if args.quick else 5)
    presets = ["tiny", "small"]
    if args.full or device.startswith("cuda"):
        presets.append("medium")
    structs = systems()
    calcs = {preset: make_calculator(preset, device, args.dtype) for preset in presets}
    if args.compile:
        # The first warm-up call compiles (minutes on CPU); later rounds reuse the graph.
        calcs["small, compile=True"] = make_calculator("small", device, args.dtype, compile=True)
    est = {label: {name: [] for name in structs} for label in calcs}   # seconds, one per round
    peer_rounds: list[dict] = []
    peer_error, peer_params = None, None
    # EST and the peer alternate in rounds (the peer is one long-lived process), system by
    # system: each ratio compares timings taken seconds apart, within one round, so a change of
    # machine load during the run hits both sides.
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        paths = {name: write_structures(Path(tmp) / f"system{k}.extxyz", [atoms])
                 for k, (name, atoms) in enumerate(structs.items())}
        peer = None
        if args.no_peer:
            peer_error = "skipped (--no-peer)"
        else:
            peer = stack.enter_context(PeerSession(device, args.dtype))
            peer_error, peer_params = peer.error, peer.params
        for _ in range(rounds):
            peer_round = {}
            for name, atoms in structs.items():
                for label, calc in calcs.items():
                    est[label][name].append(time_calculator(calc, atoms, repeats, device))
                if peer is not None and peer_error is None:
                    answer = peer.infer(paths[name], repeats)
                    if "error" in answer:
                        peer_error = answer["error"]
                    else:
                        peer_round[name] = answer["results"][0]["median_s"]
            if peer_error is None and len(peer_round) == len(structs):
                peer_rounds.append(peer_round)
    split = {name: cost_split(calcs["small"], atoms, repeats, device)
             for name, atoms in structs.items()}
    n_params = {label: calc.potential.model.num_parameters() for label, calc in calcs.items()}
    del calcs
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    if peer_error is None and len(peer_rounds) < rounds:
        peer_error = "peer gave no timings"

    def ratios(label: str, name: str) -> list[float]:
        return [p[name] / e for p, e in zip(peer_rounds, est[label][name])]

    headers = ["system", "atoms", "model", "params", "ms/call", "atom-evals/s",
               "throughput vs MACE-small", "range over rounds"]
    rows = []
    for name, atoms in structs.items():
        n = len(atoms)
        for label in est:
            t = statistics.median(est[label][name])
            if peer_error is None:
                r = ratios(label, name)
                ratio, spread = f"{statistics.median(r):.2f}x", f"{min(r):.2f}-{max(r):.2f}x"
            else:
                ratio, spread = PEER_UNAVAILABLE, "-"
            rows.append([name, n, f"EST-{label}", f"{n_params[label]:,}", fmt_ms(t),
                         f"{n / t:,.0f}", ratio, spread])
        if peer_error is None:
            t = statistics.median(p[name] for p in peer_rounds)
            rows.append([name, n, "MACE-small (untrained)", f"{peer_params:,}", fmt_ms(t),
                         f"{n / t:,.0f}", "1.00x", "-"])
        else:
            rows.append([name, n, "MACE-small", "-", "-", "-", PEER_UNAVAILABLE, "-"])
    out = [f"### Inference: energy+forces+stress ({device}, {args.dtype}; {rounds} rounds, "
           f"EST and MACE alternating; per round the median of {repeats} calls after 1 "
           "warm-up; ms/call and ratio are medians over rounds)", "",
           markdown_table(headers, rows), ""]
    if peer_error is not None:
        out += [f"MACE-small: {PEER_UNAVAILABLE} ({peer_error})", ""]
    else:
        worst = min(statistics.median(ratios("small", name)) for name in structs)
        verdict = "met" if worst >= TARGET_RATIO else "NOT met"
        out += [f"Target EST-small >= {TARGET_RATIO:.0f}x MACE-small throughput on both "
                f"systems: {verdict} (worst {worst:.2f}x).", ""]

    headers = ["system", "edges", "batch", "neighbours", "forward: message", "forward: update",
               "forward: other", "backward", "total"]
    rows = []
    for name, s in split.items():
        total = s["batch"] + s["neighbours"] + s["forward"] + s["backward"]
        pct = lambda v: f"{fmt_ms(v)} ({100 * v / total:.0f}%)"  # noqa: E731
        rows.append([name, f"{s['edges']:,}", pct(s["batch"]), pct(s["neighbours"]),
                     pct(s["message"]), pct(s["update"]), pct(s["other forward"]),
                     pct(s["backward"]), fmt_ms(total)])
    out += [f"### Cost split of EST-small, ms (share of the call), {device}", "",
            markdown_table(headers, rows), "",
            "message/update are forward only (forward hooks); backward covers forces and stress.",
            ""]
    return "\n".join(out)


def main(argv=None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per case and round (after one warm-up call)")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds of EST and MACE timings, alternating (default 3, --full 5)")
    p.add_argument("--compile", action="store_true",
                   help="also time EST-small with compile=True (compiling takes minutes on CPU)")
    args = p.parse_args(argv)
    print(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
