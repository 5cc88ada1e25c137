"""The GPU check: one script that installs carried wheels and reports everything GPU-related.

Sections (each one survives the failure of another; a failure is printed with its reason; they
run in the order inference, batched, MD, precision, largest cell, neighbour lists, compile, so
that ``--budget`` cuts the least needed; ``--sections`` picks some):

1. device and software;
2. neighbour lists on the card: the torch cell list against vesin-torch CUDA, Cu fcc at 6 Å,
   pair counts checked equal (targets: torch within 3x of vesin at 256k atoms);
3. energy+forces+stress per call, Cu fcc bulk at ~1k, 8k and 64k atoms, every preset, beside
   MACE-small run by the same script on the same card (target: "small" >= 3x MACE-small
   throughput at 8k atoms), with peak GPU memory;
   then the ~100k-atom cell (97,556 atoms) with and without ``low_memory=True`` (target: fits
   an 80 GB card);
4. MD steps per second (velocity Verlet through ``ESTCalculator``; Verlet skin 0 and 1 Å);
5. batched throughput: 256 small adsorbate/slab systems in one ``calculate_batch`` against
   one-by-one calls, and MACE-small one-by-one on the same structures; ``relax_many`` of 64
   slabs against 64 ``relax`` runs (10 FIRE steps each; target >= 5x);
6. precision: TF32 matrix products and bf16 autocast against float32, as the largest and mean
   force difference on the 8k-atom cell, to compare with the potential's validation force MAE.

Wheels: the GPU machine has no registry. ``bash benchmarks/gpu_wheels.sh`` downloads what its
image lacks into ``.whl/est`` (ase, vesin, ...) and ``.whl/mace`` (mace-torch and its pinned e3nn
0.4.4); ``--wheels .whl`` installs them into /tmp targets and re-runs this script with them.
The peer gets its own target folder, so its e3nn never meets est_calc's.

Usage (on the device machine, from the repo root):
    python3 benchmarks/gpu.py --wheels .whl --out $OUT [--quick]
Here, without a GPU, ``--device cpu --smoke`` runs every section at toy sizes (a test does).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
for p in (str(ROOT), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

from _common import cu_bulk, median_time, run_peer, sync, write_structures  # noqa: E402


# ------------------------------------------------------------------------------ wheels
def install_wheels(wheels: Path, names: tuple[str, ...] = ("est", "mace")) -> dict:
    """pip-install .whl/est/*.whl and .whl/mace/*.whl (or those of ``names``) into /tmp targets
    (no index, no deps); returns {name: target folder} of what was installed."""
    targets = {"est": Path("/tmp/est_site"), "mace": Path("/tmp/mace_site")}
    done = {}
    for name, target in ((n, targets[n]) for n in names):
        files = sorted(str(f) for f in (wheels / name).glob("*.whl"))
        if not files:
            continue
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(target),
                        *files], check=True)
        done[name] = str(target)
    return done


def rerun_with_wheels(wheels: str | None, script: str, argv: list[str]) -> int | None:
    """Install the carried wheels, then run ``script argv`` again in a child whose PYTHONPATH
    puts them (and the repository) first; returns the child's exit status.

    Returns None, doing nothing, without ``wheels`` or inside that child (EST_GPU_WHEELS_DONE),
    so a script calls it first and goes on when it gets None. Used by this script and by
    ``training_runs/gpu_train.py``.
    """
    if not wheels or os.environ.get("EST_GPU_WHEELS_DONE"):
        return None
    targets = install_wheels(Path(wheels))
    env = dict(os.environ, EST_GPU_WHEELS_DONE="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [targets.get("est", ""), str(ROOT), env.get("PYTHONPATH", "")]).strip(os.pathsep)
    if "mace" in targets:
        env["EST_BENCH_MACE_PYTHON"] = sys.executable
        env["EST_BENCH_MACE_PYTHONPATH"] = targets["mace"]
    return subprocess.call([sys.executable, script, *argv], env=env)


# ------------------------------------------------------------------------------ helpers
def _untrained(preset: str, device: str, dtype: str = "float32"):
    import torch

    from est_calc.calculator import ESTCalculator
    from est_calc.potential import Potential

    torch.manual_seed(0)
    pot = Potential.from_config(preset, species=[1, 6, 7, 8, 29])
    return ESTCalculator(pot, device=device, dtype=dtype)


def _peak_mb(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class Report:
    """Markdown lines, also collected as JSON-able records."""

    def __init__(self):
        self.lines: list[str] = []
        self.data: dict = {}

    def add(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def table(self, headers, rows) -> None:
        self.add("| " + " | ".join(map(str, headers)) + " |")
        self.add("|" + "---|" * len(headers))
        for r in rows:
            self.add("| " + " | ".join(map(str, r)) + " |")
        self.add()


def section(report: Report, title: str):
    def wrap(fn):
        def run(*a, **k):
            report.add(f"## {title}")
            report.add()
            t0 = time.perf_counter()
            try:
                fn(*a, **k)
            except Exception as err:  # one failing section must not hide the others
                report.add(f"FAILED: {type(err).__name__}: {err}")
                report.add("```\n" + traceback.format_exc(limit=4) + "```")
            report.add(f"({time.perf_counter() - t0:.1f} s)")
            report.add()
        return run
    return wrap


# ------------------------------------------------------------------------------ sections
def info(report: Report, device: str) -> None:
    import torch

    report.data["device"] = device
    report.add(f"torch {torch.__version__}, python {sys.version.split()[0]}, device {device}"
               + (f", {torch.cuda.get_device_name()}" if device.startswith("cuda") else ""))
    for mod in ("e3nn", "ase", "vesin", "vesin_torch"):
        try:
            m = __import__(mod, fromlist=["_"])
            report.add(f"- {mod} {getattr(m, '__version__', '?')}")
        except Exception as err:
            report.add(f"- {mod}: not importable ({type(err).__name__}: {err})")
    report.add()


def neighbours(report: Report, device: str, sizes: list[int]) -> None:
    import torch
    from ase.build import bulk

    from est_calc.neighbors import neighbor_list
    from est_calc.neighbors._adapters import vesin_available

    rows = []
    backends = ["torch"] + (["vesin"] if vesin_available() else [])
    for n_rep in sizes:
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(n_rep)
        pos = torch.tensor(atoms.positions, device=device)
        cell = torch.tensor(atoms.cell.array, device=device)
        pbc = torch.tensor([True] * 3, device=device)
        times, pairs = {}, {}
        for b in backends:
            def call(b=b):
                return neighbor_list(pos, cell, pbc, 6.0, backend=b)
            times[b] = median_time(call, repeats=5, device=device)
            pairs[b] = int(call()[0].shape[1])
        same = len(set(pairs.values())) == 1
        ratio = f"{times['torch'] / times['vesin']:.2f}" if "vesin" in times else "-"
        rows.append([len(atoms), pairs["torch"], *(f"{1e3 * times[b]:.2f}" for b in backends),
                     ratio, "yes" if same else f"NO {pairs}"])
    report.table(["atoms", "pairs", *(f"{b} ms" for b in backends), "torch / vesin",
                  "pair counts equal"], rows)
    report.data["neighbours"] = rows


def inference(report: Report, device: str, sizes: list[int], presets: list[str],
              peer: bool, repeats: int, est_only: list[int] = ()) -> None:
    import tempfile

    rows, est_ms = [], {}
    structures = [cu_bulk(n) for n in sizes]
    for preset in presets:
        calc = _untrained(preset, device)
        for atoms in structures + [cu_bulk(n) for n in est_only]:
            _reset_peak(device)
            try:
                t = median_time(lambda: calc.calculate(atoms, ["energy", "forces", "stress"]),
                                repeats=repeats, device=device)
                est_ms[(preset, len(atoms))] = 1e3 * t
                peak = _peak_mb(device)
                rows.append([f"EST-{preset}", len(atoms), f"{1e3 * t:.1f}",
                             "-" if peak is None else f"{peak:.0f}"])
            except RuntimeError as err:  # out of memory is a result, not a crash
                rows.append([f"EST-{preset}", len(atoms), f"failed: {str(err)[:60]}", "-"])
        calc = None  # drop the model before emptying the cache
        _reset_peak(device)  # hand the cached blocks back: the peer is another process
    peer_ms = {}
    if peer:
        with tempfile.TemporaryDirectory() as tmp:
            path = write_structures(Path(tmp) / "bulk.extxyz", structures)
            res = run_peer("infer", {"structures": str(path), "repeats": repeats, "warmup": 1,
                                     "device": device, "dtype": "float32"})
        if "error" in res:
            rows.append(["MACE-small", "-", f"peer unavailable: {res['error']}", "-"])
        else:
            for r in res["results"]:
                peer_ms[r["n_atoms"]] = 1e3 * r["median_s"]
                rows.append(["MACE-small", r["n_atoms"], f"{1e3 * r['median_s']:.1f}",
                             f"{r['peak_cuda_MB']:.0f}" if r.get("peak_cuda_MB") else "-"])
    report.table(["model", "atoms", "ms / call (E+F+S)", "peak GPU MB"], rows)
    if peer_ms:
        ratios = [[p, n, f"{peer_ms[n] / est_ms[(p, n)]:.2f}x"]
                  for (p, n) in est_ms if n in peer_ms]
        report.table(["preset", "atoms", "throughput vs MACE-small"], ratios)
    report.data["inference"] = {"est_ms": {f"{p}/{n}": v for (p, n), v in est_ms.items()},
                                "mace_ms": peer_ms}


def compiled(report: Report, device: str, sizes: list[int], preset: str, repeats: int) -> None:
    """ESTCalculator(compile=True) against eager: compile time, ms per E+F+S call, force change."""
    import numpy as np

    from est_calc.calculator import ESTCalculator

    eager = _untrained(preset, device)
    rows, data = [], {}
    t0 = time.perf_counter()
    calc = ESTCalculator(eager.potential, device=device, compile=True)
    for atoms in [cu_bulk(n) for n in sizes]:
        props = ["energy", "forces", "stress"]
        t_first = time.perf_counter()
        calc.calculate(atoms, props)
        sync(device)
        first_s = time.perf_counter() - t_first
        got = {k: np.array(calc.results[k]) for k in props}
        eager.calculate(atoms, props)
        df = float(np.abs(got["forces"] - eager.results["forces"]).max())
        t_c = median_time(lambda: calc.calculate(atoms, props, ["positions"]), repeats=repeats,
                          device=device)
        t_e = median_time(lambda: eager.calculate(atoms, props, ["positions"]), repeats=repeats,
                          device=device)
        rows.append([f"EST-{preset}", len(atoms), f"{first_s:.1f}", f"{1e3 * t_e:.1f}",
                     f"{1e3 * t_c:.1f}", f"{t_e / t_c:.2f}x", f"{df:.1e}"])
        data[len(atoms)] = {"first_call_s": first_s, "eager_ms": 1e3 * t_e, "compiled_ms": 1e3 * t_c,
                            "max_force_diff_eV_per_A": df}
    report.table(["model", "atoms", "first compiled call s", "eager ms", "compiled ms",
                  "speed-up", "max |dF| eV/Å"], rows)
    report.add(f"(compile=True set up and first calls: {time.perf_counter() - t0:.0f} s in all)")
    report.data["compiled"] = data


def big_cell(report: Report, device: str, n_rep: int) -> None:
    """The 100k-atom target: one E+F+S call of EST-small, plain and with low_memory=True."""
    from est_calc.calculator import ESTCalculator

    atoms = cu_bulk(n_rep)
    base = _untrained("small", device)
    rows = []
    for low in (True, False):
        calc = ESTCalculator(base.potential, device=device, low_memory=low)
        _reset_peak(device)
        try:
            t0 = time.perf_counter()
            calc.calculate(atoms, ["energy", "forces", "stress"])
            sync(device)
            peak = _peak_mb(device)
            rows.append([len(atoms), low, f"{1e3 * (time.perf_counter() - t0):.0f}",
                         "-" if peak is None else f"{peak:,.0f}",
                         "-" if peak is None else f"{peak / len(atoms):.3f}"])
        except RuntimeError as err:  # out of memory is a result here
            rows.append([len(atoms), low, f"failed: {str(err)[:80]}", "-", "-"])
        finally:
            del calc
            _reset_peak(device)
    report.table(["atoms", "low_memory", "ms (first call)", "peak GPU MB", "MB/atom"], rows)
    report.data["big_cell"] = rows


def md_speed(report: Report, device: str, sizes: list[int], steps: int) -> None:
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from est_calc.calculator import ESTCalculator

    potential = _untrained("small", device).potential
    rows = []
    for n in sizes:
        for skin in (0.0, 1.0):
            calc = ESTCalculator(potential, device=device, skin=skin)
            atoms = cu_bulk(n)
            atoms.calc = calc
            dyn = VelocityVerlet(atoms, timestep=2.0 * units.fs)
            dyn.run(2)
            sync(device)
            t0 = time.perf_counter()
            dyn.run(steps)
            sync(device)
            dt = time.perf_counter() - t0
            builds = calc.neighbor_list.n_builds if calc.neighbor_list else steps
            rows.append([len(atoms), skin, f"{steps / dt:.1f}", builds])
    report.table(["atoms", "skin Å", "MD steps / s (EST-small)", "list builds"], rows)
    report.data["md"] = rows


def batched(report: Report, device: str, n_systems: int, peer: bool) -> None:
    import tempfile
    from batched import make_calculator, small_slabs, time_relaxation

    structs = small_slabs(n_systems)
    calc = _untrained("small", device)
    props = ["energy", "forces"]
    t_batch = median_time(lambda: calc.calculate_batch(structs, props), repeats=3, device=device)

    def singles():
        from ase.calculators.calculator import all_changes
        for a in structs:
            calc.calculate(a, props, all_changes)
    t_single = median_time(singles, repeats=1, device=device)
    rows = [["EST-small calculate_batch", n_systems, f"{n_systems / t_batch:.0f}"],
            ["EST-small one by one", n_systems, f"{n_systems / t_single:.0f}"]]
    if peer:
        with tempfile.TemporaryDirectory() as tmp:
            path = write_structures(Path(tmp) / "slabs.extxyz", structs)
            res = run_peer("infer", {"structures": str(path), "repeats": 1, "warmup": 1,
                                     "device": device, "dtype": "float32"})
        if "error" in res:
            rows.append(["MACE-small one by one", n_systems, f"peer unavailable: {res['error']}"])
        else:
            total = sum(r["median_s"] for r in res["results"])
            rows.append(["MACE-small one by one", n_systems, f"{n_systems / total:.0f}"])
    report.table(["path", "systems", "structures / s"], rows)
    report.data["batched"] = rows

    # relax_many against separate relax() runs (the Performance issue's >= 5x, 64 slabs)
    n_relax, steps = min(n_systems, 64), 3 if n_systems < 16 else 10
    r = time_relaxation(make_calculator(device, "float32"), small_slabs(n_relax), steps, device,
                        rounds=1)
    report.table(["path", "slabs", "FIRE steps in all", "s", "speed-up"], [
        ["relax() one by one", n_relax, r["single_steps"], f"{r['single_s']:.1f}", "1.00x"],
        ["relax_many()", n_relax, r["many_steps"], f"{r['many_s']:.1f}",
         f"{r['single_s'] / r['many_s']:.1f}x"]])
    report.data["relax_many"] = r


def precision(report: Report, device: str, n_rep: int, potential: str | None) -> None:
    import torch

    from est_calc.batch import AtomsBatch
    from est_calc.forces import energy_forces_stress
    from est_calc.neighbors import build_graph
    from est_calc.potential import load_potential

    try:  # the shipped default unless another is named: the error only means something trained
        pot = load_potential(potential or "default", device=device)
        what = potential or "default"
    except FileNotFoundError:
        pot = _untrained("small", device).potential
        what = "untrained small (no default potential found)"
    atoms = cu_bulk(n_rep)
    batch = AtomsBatch.from_atoms(atoms, device=device, dtype=torch.float32)
    graph = build_graph(batch, pot.cutoff_A)
    from contextlib import nullcontext

    from est_calc.accel import accelerate

    fast = accelerate(pot, inference=True)
    bf16_core = accelerate(pot, inference=True, attention_dtype=torch.bfloat16)

    def run(model=fast):
        return energy_forces_stress(model, batch, graph, compute_stress=True)

    ref = run()
    rows = []
    modes = [("float32", None), ("bf16 attention core only", "bf16-attention")]
    if device.startswith("cuda"):
        modes += [("TF32 matmul", "tf32"), ("bf16 autocast (whole model)", "bf16")]
    for name, mode in modes:
        old = torch.backends.cuda.matmul.allow_tf32 if device.startswith("cuda") else None
        try:
            if mode == "tf32":
                torch.backends.cuda.matmul.allow_tf32 = True
            ctx = torch.autocast("cuda", dtype=torch.bfloat16) if mode == "bf16" else nullcontext()
            model = bf16_core if mode == "bf16-attention" else fast
            with ctx:
                out = run(model)
                t = median_time(lambda: run(model), repeats=3, device=device)
        finally:
            if old is not None:
                torch.backends.cuda.matmul.allow_tf32 = old
        df = (out.forces.float() - ref.forces).abs()
        rows.append([name, f"{1e3 * t:.1f}", f"{1e3 * float(df.mean()):.3f}",
                     f"{1e3 * float(df.max()):.3f}",
                     f"{1e3 * float((out.energy.float() - ref.energy).abs().max()) / len(atoms):.4f}"])
    report.add(f"potential: {what}; {len(atoms)} atoms")
    report.table(["mode", "ms / call", "mean |dF| meV/Å", "max |dF| meV/Å", "|dE| meV/atom"], rows)
    report.data["precision"] = rows


# ------------------------------------------------------------------------------ main
SECTIONS = ("device", "inference", "batched", "md", "precision", "big_cell", "neighbours", "compile")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wheels", default=None, help="folder with est/ and mace/ wheel folders")
    p.add_argument("--out", default=None, help="write gpu_report.md and gpu_report.json here")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="1k and 8k atoms only, fewer repeats")
    p.add_argument("--smoke", action="store_true", help="toy sizes (CPU test of every path)")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    p.add_argument("--no-64k", action="store_true",
                   help="leave out the EST-only 62,500-atom inference row")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds: sections that would start later are skipped (listed as such)")
    p.add_argument("--potential", default=None,
                   help="potential for the precision check (default: the shipped default)")
    args = p.parse_args(argv)

    status = rerun_with_wheels(args.wheels, __file__, list(argv if argv is not None else sys.argv[1:]))
    if status is not None:
        return status

    import torch

    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device visible to torch; use --device cpu --smoke for a dry run")
        return 2
    # sizes: repeats of the 4-atom cubic Cu cell (6 -> 864, 13 -> 8,788, 25 -> 62,500 atoms);
    # est_only: sizes timed for EST but not for the peer (MACE-small's memory at 64k atoms is
    # the peer's problem, not this check's)
    if args.smoke:
        nl_sizes, sizes, est_only, md_sizes, n_batch, presets, reps, md_steps, prec = \
            [3], [2], [3], [2], 4, ["tiny"], 1, 3, 2
    elif args.quick:
        nl_sizes, sizes, est_only, md_sizes, n_batch, presets, reps, md_steps, prec = \
            [10, 20, 40], [6, 13], [25], [6], 256, ["tiny", "small"], 3, 20, 13
    else:
        nl_sizes, sizes, est_only, md_sizes, n_batch, presets, reps, md_steps, prec = \
            [10, 20, 40], [6, 13], [25], [6, 13], 256, ["tiny", "small", "medium"], 5, 50, 13
    peer = not args.no_peer
    wanted = set(args.sections.split(","))
    if wanted - set(SECTIONS):
        p.error(f"unknown sections {sorted(wanted - set(SECTIONS))}; choose from {SECTIONS}")
    if args.no_64k:
        est_only = []
    report = Report()
    report.add(f"# est_calc GPU check ({time.strftime('%Y-%m-%d %H:%M')})")
    report.add()
    t_start = time.perf_counter()
    out = Path(args.out) if args.out else None

    def write() -> None:  # after every section: a call cut off at its limit keeps what ran
        if out is None:
            return
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_report.md").write_text("\n".join(report.lines) + "\n")
        (out / "gpu_report.json").write_text(json.dumps(report.data, indent=1, default=str))

    def run(key, title, fn, *fargs) -> None:
        """One section if ``key`` was asked for, unless the budget is spent (then it is
        listed as skipped)."""
        if key not in wanted:
            return
        spent = time.perf_counter() - t_start
        if args.budget is not None and spent > args.budget:
            report.add(f"## {title}\n\nskipped: {spent:.0f} s of the {args.budget:.0f} s "
                       "budget were spent\n")
            report.data.setdefault("skipped", []).append(title)
        else:
            section(report, title)(fn)(*fargs)
        write()

    # In order of what the Performance issue needs most, so a budget cuts the least important.
    run("device", "Device", info, report, device)
    run("inference", "Energy + forces + stress (Cu fcc bulk, float32)", inference,
        report, device, sizes, presets, peer, reps, est_only)
    run("batched", f"Batched throughput ({n_batch} small systems)", batched,
        report, device, n_batch, peer)
    run("md", "MD steps per second", md_speed, report, device, md_sizes, md_steps)
    run("precision", "Precision: TF32 / bf16 against float32", precision,
        report, device, prec, args.potential)
    run("big_cell", "Largest cell: ~100k atoms, EST-small", big_cell,
        report, device, 2 if args.smoke else 29)
    run("neighbours", "Neighbour lists (Cu fcc, 6 Å)", neighbours, report, device, nl_sizes)
    run("compile", "torch.compile (compile=True) against eager, Cu fcc bulk, float32", compiled,
        report, device, sizes[:2], "tiny" if args.smoke else "small", reps)
    report.add(f"(all sections: {time.perf_counter() - t_start:.0f} s)")
    write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
