"""Accuracy on real DFT data: EST and MACE trained on the same data with the same budget.

Both models are trained on the same split of a real DFT set (``../shared/data/real_dft/``,
read from there), with the same cutoff (5 Å), the same isolated-atom energies, the same
wall-clock budget and the same CPU cores, then evaluated on every evaluation set of that data
and timed per MD step (energy + forces) on the molecule and on a ~1,000-atom periodic box of
the same species, in the same run. MACE is trained by its own ``mace_run_train`` in the peer
environment (``benchmarks/setup_mace_env.sh``) with its published 3BPA settings (AMSGrad,
lr 0.01, batch 5, energy : force weights 1 : 1000 then a second stage at 1000 : 100 for the
last quarter, EMA 0.99) and the model scaled down where the budget forces it (``--mace-hidden``).

Stages (``--stage``, comma-separated; default all of them, in this order):

* ``split``: the training file is split (seed 0) into ``n_train`` + ``n_val`` frames; every
  evaluation set is written beside it without a cell (pbc False); frames of an evaluation set
  that also appear in the training split (same energy) are dropped and counted.
* ``calibrate``: a one-epoch MACE run (not counted in the budget) measures MACE's epoch time
  alone on the cores (``mace`` runs it first when it has not been run).
* ``mace``: the real MACE run gets the number of epochs that fits 90 % of the budget
  (``--share N``: N trainings share these cores at the same time, so an epoch takes N times
  as long) and a watchdog that stops it at 1.5x the budget.
* ``est``: ``est train`` with ``train.time_budget_s`` (the schedule plans itself to the budget).
* ``report``: errors of both models on every evaluation set (energies in meV per structure and
  meV/atom, forces in meV/Å; RMSE and MAE), parameters, training wall time, time per MD step of
  each trained model (same cores, alternating rounds), a learning curve (validation force and
  energy RMSE against training minutes, both models; PNG) and, for ethanol, the H-removal and
  normal-mode curves against DFT (PNG). The speed table has a third row, "EST .pt2": the same
  EST potential exported by ``est export`` (one AOTInductor graph, no Python per operation;
  ``--no-export`` leaves it out). Tables go to stdout and ``report.md``, numbers to
  ``report.json`` in ``--out``.
* ``uncertainty``: would the user have been warned where EST is wrong? EST's latent
  uncertainty fitted as ``est train --uncertainty`` fits it (training frames as reference,
  validation frames as calibration and for the flag thresholds), then the share of flagged
  frames and the rank correlation of the std with the error on every evaluation set, per
  chemical formula where a set mixes molecules (``uncertainty.md``, ``uncertainty.json``).

Usage::

    python benchmarks/accuracy.py --dataset 3bpa --budget-min 60 --out runs/accuracy/3bpa
    python benchmarks/accuracy.py --dataset ethanol --budget-min 30 --cores 1 --share 2 ...
    python benchmarks/accuracy.py --quick --out /tmp/acc      # toy size, about a minute
    # on a GPU (the 3BPA target of 1.2x MACE's published 8.8 meV/Å; EST only, longer budget):
    python benchmarks/accuracy.py --dataset 3bpa --device cuda --stage split,est,report \
        --budget-min 8 --est-eval-every 500

The EST run's settings are ``--est-*`` options (defaults: the "molecule" preset, Adam with
AMSGrad, lr 0.01, batch 5, the same loss weights and second stage as MACE, EMA 0.99, float32).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import _peer_env, markdown_table, peer_python  # noqa: E402

# shared/ lies beside the repository (or inside a CI checkout).
DEFAULT_DATA = next((p for p in (REPO.parent / "shared" / "data" / "real_dft",
                                 REPO / "shared" / "data" / "real_dft") if p.is_dir()),
                    REPO.parent / "shared" / "data" / "real_dft")

#: name -> training file, split, isolated atoms, evaluation sets (label -> file or "valid").
DATASETS = {
    "3bpa": {
        "folder": "3bpa", "train": "train_300K.xyz", "n_train": 450, "n_val": 50,
        "isolated": "iso_atoms.xyz",
        "evals": {"300 K, 50 held out": "valid",
                  "mixed T (300/600/1200 K)": "train_mixedT.xyz"},
    },
    "ethanol": {
        "folder": "ethanol", "train": "train.xyz", "n_train": 950, "n_val": 50,
        "isolated": "isolated_atoms.xyz",
        "evals": {"50 held out": "valid", "MD test (rMD17)": "test_MD.xyz",
                  "ethanol + methanol test": "test_eth_meth.xyz",
                  "H removal (energies)": "test_H_removal.xyz",
                  "normal mode 874 cm-1": "test_norm_mode_874.xyz",
                  "normal mode 3005 cm-1": "test_norm_mode_3005.xyz",
                  "dimers (energies)": "test_dimers.xyz"},
    },
}

MACE_E0_CUTOFF_A = 5.0


# ----------------------------------------------------------------------------- split
def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def _strip_cell(frames):
    """The frames without their 50 Å box (pbc False), keeping the DFT energy and forces."""
    from ase.calculators.singlepoint import SinglePointCalculator

    for a in frames:
        results = dict(a.calc.results) if a.calc is not None else {}
        a.calc = None
        a.pbc = False
        a.cell = None
        a.calc = SinglePointCalculator(a, **results)
    return frames


def stage_split(args, spec, out: Path) -> dict:
    from ase.io import read, write

    root = Path(args.data_root) / spec["folder"]
    frames = read(root / spec["train"], index=":")
    n_train, n_val = spec["n_train"], spec["n_val"]
    if args.quick:
        n_train, n_val = 20, 6
    if n_train + n_val > len(frames):
        raise SystemExit(f"{spec['train']} has {len(frames)} frames, fewer than {n_train + n_val}")
    order = np.random.default_rng(0).permutation(len(frames))
    train = _strip_cell([frames[i] for i in order[:n_train]])
    val = _strip_cell([frames[i] for i in order[n_train:n_train + n_val]])
    write(out / "train.xyz", train)
    write(out / "valid.xyz", val)
    seen = {round(a.get_potential_energy(), 6) for a in train}
    sets = {}
    for label, name in spec["evals"].items():
        path = out / f"eval_{_slug(label)}.xyz"
        if name == "valid":
            shutil.copyfile(out / "valid.xyz", path)
            sets[label] = {"file": str(path), "n": len(val), "dropped": 0}
            continue
        data = _strip_cell(read(root / name, index=":"))
        keep = [a for a in data if round(a.get_potential_energy(), 6) not in seen]
        dropped = len(data) - len(keep)
        if args.quick:
            keep = keep[:8]
        write(path, keep)
        sets[label] = {"file": str(path), "n": len(keep), "dropped": dropped}
    from ase.data import chemical_symbols

    e0 = _e0s(str(root / spec["isolated"]))
    # File names relative to the work folder and the E0s by value: the folder can be copied to
    # another machine (the GPU one has no shared/ data) and used there.
    for s in sets.values():
        s["file"] = Path(s["file"]).name
    info = {"dataset": args.dataset, "n_train": n_train, "n_val": n_val,
            "isolated_atoms": {chemical_symbols[z]: e for z, e in sorted(e0.items())},
            "isolated_atoms_file": str(root / spec["isolated"]), "evals": sets}
    (out / "split.json").write_text(json.dumps(info, indent=1))
    print(f"split: {n_train} train, {n_val} validation; evaluation sets: "
          + ", ".join(f"{k} ({v['n']}, {v['dropped']} in training dropped)" for k, v in sets.items()))
    return info


def _e0s(source) -> dict[int, float]:
    """Atomic number -> isolated-atom energy from a file or a {symbol: eV} mapping."""
    from est_calc.training.config import isolated_atom_energies

    return isolated_atom_energies(source)


# ----------------------------------------------------------------------------- MACE
def _pinned(cmd: list[str], cores: str | None) -> list[str]:
    return (["taskset", "-c", cores] if cores else []) + cmd


def _thread_env(threads: int, peer: bool = False) -> dict:
    env = _peer_env() if peer else dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def have_mace() -> bool:
    return (Path(peer_python()).parent / "mace_run_train").exists()


def _mace_command(args, out: Path, name: str, work: Path, epochs: int, split: dict) -> list[str]:
    from ase.io import read

    species = {int(z) for a in read(out / "train.xyz", index=":") for z in a.numbers}
    e0 = {z: e for z, e in _e0s(split["isolated_atoms"]).items() if z in species}
    cmd = [str(Path(peer_python()).parent / "mace_run_train"),
           "--name", name, "--work_dir", str(work),
           "--train_file", str(out / "train.xyz"), "--valid_file", str(out / "valid.xyz"),
           "--E0s", json.dumps({str(z): e for z, e in e0.items()}).replace('"', ""),
           "--energy_key", "energy", "--forces_key", "forces",
           "--model", "MACE", "--hidden_irreps", args.mace_hidden,
           "--r_max", str(MACE_E0_CUTOFF_A), "--max_ell", "3", "--correlation", "3",
           "--num_interactions", "2", "--batch_size", "5", "--valid_batch_size", "10",
           "--max_num_epochs", str(epochs), "--amsgrad", "--lr", "0.01",
           "--energy_weight", "1", "--forces_weight", "1000",
           "--ema", "--ema_decay", "0.99", "--default_dtype", args.dtype,
           "--device", args.device, "--seed", "1", "--error_table", "PerAtomRMSE",
           "--eval_interval", "1", "--save_cpu"]
    if epochs >= 4:
        cmd += ["--swa", "--start_swa", str(max(1, int(0.75 * epochs))),
                "--swa_energy_weight", "1000", "--swa_forces_weight", "100"]
    if args.quick:
        cmd += ["--hidden_irreps", "8x0e + 8x1o", "--max_ell", "2", "--correlation", "2"]
    return cmd


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) INFO: (.*)$")


def mace_log_curve(work: Path) -> list[dict]:
    """(minutes since 'Started training', validation RMSEs) from a MACE log."""
    logs = sorted((work / "logs").glob("*.log"))
    rows, t0 = [], None
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            m = _STAMP.match(line)
            if not m:
                continue
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
            msg = m.group(2)
            if msg.startswith("Started training"):
                t0 = t
            e = re.search(r"RMSE_E_per_atom=\s*([\d.]+) meV, RMSE_F=\s*([\d.]+) meV", msg)
            if e and t0 is not None and re.match(r"(Epoch \d+|Initial)", msg):
                rows.append({"minutes": (t - t0) / 60, "energy_per_atom_rmse_meV": float(e.group(1)),
                             "forces_rmse_meV_A": float(e.group(2))})
    return rows


def stage_calibrate(args, spec, out: Path, split: dict) -> float:
    """One MACE epoch on these cores (alone on them: run it before the trainings); seconds."""
    calib = out / "mace_calibration"
    if calib.exists():
        shutil.rmtree(calib)
    subprocess.run(_pinned(_mace_command(args, out, "calib", calib, 1, split), args.cores),
                   env=_thread_env(args.threads, peer=True), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.STDOUT)
    epoch_s = 60 * mace_log_curve(calib)[-1]["minutes"]
    (out / "mace_calibration.json").write_text(json.dumps({"epoch_s": epoch_s}))
    print(f"mace calibration: {epoch_s:.0f} s per epoch alone on cores {args.cores or 'all'}")
    return epoch_s


def stage_mace(args, spec, out: Path, split: dict) -> dict:
    budget_s = args.budget_min * 60
    env = _thread_env(args.threads, peer=True)
    work = out / "mace"
    if work.exists():
        shutil.rmtree(work)
    if args.mace_epoch_s:
        epoch_s = args.mace_epoch_s
    elif (out / "mace_calibration.json").exists():
        epoch_s = json.loads((out / "mace_calibration.json").read_text())["epoch_s"]
    else:
        epoch_s = stage_calibrate(args, spec, out, split)
    epoch_s *= args.share
    epochs = max(1, int(0.9 * budget_s / epoch_s))
    print(f"mace: {epoch_s:.0f} s per epoch on these cores (x{args.share} shared): "
          f"{epochs} epochs in {args.budget_min} min")
    t0 = time.perf_counter()
    proc = subprocess.Popen(_pinned(_mace_command(args, out, "mace", work, epochs, split),
                                    args.cores), env=env, stdout=open(out / "mace.out", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=1.5 * budget_s + 600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        print("mace: stopped by the watchdog at 1.5x the budget")
    wall = time.perf_counter() - t0
    models = sorted(work.glob("*.model"))
    model = next((m for m in models if "stagetwo" in m.name or "swa" in m.name), None) or \
        (models[0] if models else None)
    curve = mace_log_curve(work)
    info = {"epochs": epochs, "epoch_s_calibration": epoch_s, "process_wall_s": wall,
            "training_minutes": curve[-1]["minutes"] if curve else None,
            "model": str(model) if model else None, "returncode": proc.returncode}
    (out / "mace.json").write_text(json.dumps(info, indent=1))
    print(f"mace: {info}")
    return info


# ----------------------------------------------------------------------------- EST
def est_config(args, out: Path, split: dict) -> dict:
    budget_s = args.budget_min * 60
    cfg = {
        "output_dir": str(out / "est"),
        "data": {"train": str(out / "train.xyz"), "val": str(out / "valid.xyz"),
                 "isolated_atoms": split["isolated_atoms"]},
        "model": {"preset": "tiny" if args.quick else args.est_preset,
                  "overrides": json.loads(args.est_overrides) if args.est_overrides else {}},
        "loss": {"energy_weight": 1.0, "force_weight": 1000.0, "stage_two_start": 0.75,
                 "stage_two_energy_weight": 1000.0, "stage_two_force_weight": 100.0},
        "train": {"max_steps": 10_000_000, "time_budget_s": budget_s, "batch_size": 5,
                  "lr": args.est_lr, "optimizer": "adam", "amsgrad": True,
                  "warmup_steps": 20, "ema_decay": args.est_ema, "eval_every": args.est_eval_every,
                  "seed": args.est_seed,
                  "checkpoint_every": 2000, "dtype": args.dtype, "threads": args.threads,
                  "device": args.device, "progress": False, "compile": bool(args.est_compile)},
    }
    if args.quick:
        cfg["model"]["overrides"]["cutoff_A"] = 5.0
        # one layer: the toy run's export compiles in about half the time of two
        cfg["model"]["overrides"].setdefault("n_layers", 1)
        cfg["train"]["eval_every"] = 5
    return cfg


def stage_est(args, spec, out: Path, split: dict) -> dict:
    import yaml

    cfg = est_config(args, out, split)
    path = out / "est.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.perf_counter()
    with open(out / "est.out", "w") as log:
        proc = subprocess.run(_pinned([sys.executable, "-m", "est_calc.cli", "train", str(path),
                                       "--overwrite"], args.cores),
                              env={**_thread_env(args.threads), "PYTHONPATH": str(REPO)},
                              stdout=log, stderr=subprocess.STDOUT,
                              timeout=1.5 * args.budget_min * 60 + 600)
    wall = time.perf_counter() - t0
    info = {"process_wall_s": wall, "returncode": proc.returncode,
            "potential": str(out / "est" / "potential.pt")}
    (out / "est.json").write_text(json.dumps(info, indent=1))
    if proc.returncode:
        raise SystemExit(f"est train failed (exit {proc.returncode}); see {out / 'est.out'}")
    print(f"est: {info}")
    return info


def est_log_curve(out: Path) -> list[dict]:
    import csv

    path = out / "est" / "metrics.csv"
    rows = []
    with open(path) as fh:
        for r in csv.DictReader(fh):
            if r.get("elapsed_s"):
                rows.append({"minutes": float(r["elapsed_s"]) / 60,
                             "energy_per_atom_rmse_meV": 1000 * float(r["val_energy_per_atom_rmse"]),
                             "forces_rmse_meV_A": 1000 * float(r["val_forces_rmse"])})
    return rows


# ----------------------------------------------------------------------------- report
def _est_predict(potential: str, path: str, dtype: str):
    from ase.io import read

    from est_calc import ESTCalculator

    calc = ESTCalculator(model=potential, dtype=dtype, device="cpu")
    out = []
    for a in read(path, index=":"):
        ref_e = a.get_potential_energy()
        ref_f = a.calc.results.get("forces")
        b = a.copy()
        b.calc = calc
        out.append((ref_e, ref_f, b.get_potential_energy(), b.get_forces(), len(a)))
    return out


def _mace_predict(model: str, path: str, dtype: str, work: Path):
    from ase.io import read

    target = work / (Path(path).stem + "_mace.xyz")
    subprocess.run([str(Path(peer_python()).parent / "mace_eval_configs"), "--configs", path,
                    "--model", model, "--output", str(target), "--device", "cpu",
                    "--default_dtype", dtype, "--batch_size", "10"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=_thread_env(1, peer=True))
    refs = read(path, index=":")
    preds = read(target, index=":")
    out = []
    for a, p in zip(refs, preds):
        out.append((a.get_potential_energy(), a.calc.results.get("forces"),
                    float(p.info["MACE_energy"]), np.asarray(p.arrays["MACE_forces"]), len(a)))
    return out


def errors(rows) -> dict:
    """RMSE and MAE of energies (meV per structure and meV/atom) and forces (meV/Å)."""
    de = np.array([(e - ref) for ref, _, e, _, _ in rows])
    n = np.array([k for *_, k in rows], dtype=float)
    out = {"n": len(rows),
           "energy_rmse_meV": 1000 * float(np.sqrt(np.mean(de**2))),
           "energy_mae_meV": 1000 * float(np.mean(np.abs(de))),
           "energy_per_atom_rmse_meV": 1000 * float(np.sqrt(np.mean((de / n) ** 2))),
           "energy_per_atom_mae_meV": 1000 * float(np.mean(np.abs(de / n)))}
    df = [np.asarray(f) - np.asarray(rf) for _, rf, _, f, _ in rows if rf is not None]
    if df:
        df = np.concatenate(df).ravel()
        out["forces_rmse_meV_A"] = 1000 * float(np.sqrt(np.mean(df**2)))
        out["forces_mae_meV_A"] = 1000 * float(np.mean(np.abs(df)))
    return out


def molecule_box(molecule, n_atoms: int = 1000, density_g_cm3: float = 0.6, seed: int = 0):
    """About ``n_atoms`` atoms: copies of ``molecule``, randomly rotated, placed without
    intermolecular contacts closer than 2 Å (rejection sampling) in a cubic periodic box of the
    given density (lowered in 10 % steps where the molecules do not fit)."""
    for k in range(10):
        box = _try_molecule_box(molecule, n_atoms, density_g_cm3 * 0.9**k, seed)
        if box is not None:
            return box
    raise RuntimeError(f"could not pack {n_atoms} atoms of {molecule.get_chemical_formula()}")


def _try_molecule_box(molecule, n_atoms, density_g_cm3, seed):
    from ase import Atoms
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    n_mol = max(1, round(n_atoms / len(molecule)))
    mass_g = n_mol * molecule.get_masses().sum() / 6.02214076e23
    side = (mass_g / density_g_cm3 * 1e24) ** (1 / 3)
    base = molecule.positions - molecule.positions.mean(axis=0)
    placed = np.zeros((0, 3))
    numbers = []
    for _ in range(n_mol):
        for _try in range(2000):
            q = rng.normal(size=4)
            q /= np.linalg.norm(q)
            w, x, y, z = q
            rot = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
            pos = (base @ rot.T + rng.uniform(0, side, 3)) % side
            if len(placed):
                tree = cKDTree(placed, boxsize=side)
                if np.isfinite(tree.query(pos, distance_upper_bound=2.0)[0]).any():
                    continue
            placed = np.vstack([placed, pos])
            numbers.extend(molecule.numbers)
            break
        else:
            return None
    return Atoms(numbers=numbers, positions=placed, cell=[side] * 3, pbc=True)


def _time_est(potential: str, structures, repeats: int, threads: int) -> list[float]:
    from est_calc import ESTCalculator

    out = []
    for atoms in structures:
        a = atoms.copy()
        a.calc = ESTCalculator(model=potential, dtype="float32", device="cpu", threads=threads)
        rng = np.random.default_rng(0)
        times = []
        for k in range(repeats + 2):
            a.positions += rng.normal(scale=1e-3, size=a.positions.shape)
            t0 = time.perf_counter()
            a.get_forces()
            if k >= 2:
                times.append(time.perf_counter() - t0)
        out.append(statistics.median(times))
    return out


def _export_package(potential: Path, out: Path) -> dict:
    """The trained EST potential as an AOTInductor package (``est export``, float32, CPU) in
    ``out``, for the speed table; reused while it is newer than the potential and this est_calc
    and torch read it (a package of an older format is exported again). Its deviation
    from the eager potential is checked by the export itself (refused above round-off)."""
    from est_calc.deploy import export_potential, read_metadata

    path = out / "est.pt2"
    if path.exists() and path.stat().st_mtime > potential.stat().st_mtime:
        try:
            read_metadata(path)  # another format version or torch: export again
            return {"path": str(path), "reused": True}
        except ValueError as err:
            print(f"est export: {path} is not reusable ({err}); exporting again")
    t0 = time.perf_counter()
    res = export_potential(str(potential), path, dtype="float32", device="cpu", overwrite=True)
    print(f"est export: {path} in {time.perf_counter() - t0:.0f} s, max deviation from the "
          f"eager potential {res.max_deviation:.1e}")
    return {"path": str(path), "export_s": res.trace_s + res.compile_s,
            "max_deviation": res.max_deviation}


def _time_mace(model: str, structures_path: Path, repeats: int, threads: int) -> tuple[list, int]:
    script = (
        "import json,sys,time,statistics,numpy as np,torch\n"
        f"torch.set_num_threads({threads})\n"
        "from ase.io import read\nfrom mace.calculators import MACECalculator\n"
        f"calc=MACECalculator(model_paths={model!r},device='cpu',default_dtype='float32')\n"
        "n=sum(p.numel() for p in calc.models[0].parameters())\nres=[]\n"
        f"for a in read({str(structures_path)!r},index=':'):\n"
        "    a.calc=calc; rng=np.random.default_rng(0); ts=[]\n"
        f"    for k in range({repeats}+2):\n"
        "        a.positions+=rng.normal(scale=1e-3,size=a.positions.shape)\n"
        "        t0=time.perf_counter(); a.get_forces()\n"
        "        if k>=2: ts.append(time.perf_counter()-t0)\n"
        "    res.append(statistics.median(ts))\n"
        "print(json.dumps({'times':res,'params':n}))\n")
    cmd = [str(peer_python()), "-c", script]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env=_thread_env(threads, peer=True))
    d = json.loads(out.stdout.strip().splitlines()[-1])
    return d["times"], d["params"]


def _plot_curves(path: Path, curves: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in curves.items():
        if not rows:
            continue
        t = [r["minutes"] for r in rows]
        axes[0].plot(t, [r["forces_rmse_meV_A"] for r in rows], label=name)
        axes[1].plot(t, [r["energy_per_atom_rmse_meV"] for r in rows], label=name)
    for ax, what in zip(axes, ("force RMSE (meV/Å)", "energy RMSE (meV/atom)")):
        ax.set_yscale("log")
        ax.set_xlabel("training wall time (min)")
        ax.set_ylabel(f"validation {what}")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_scans(path: Path, scans: dict) -> None:
    """Energy along each scan (relative to the DFT minimum), DFT and both models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scans), figsize=(5 * len(scans), 4))
    axes = np.atleast_1d(axes)
    for ax, (label, d) in zip(axes, scans.items()):
        x = np.asarray(d["x"])
        ref0 = min(d["DFT"])
        for name, style in (("DFT", "k-"), ("EST", "C0.-"), ("MACE", "C1.--")):
            if name in d:
                ax.plot(x, np.asarray(d[name]) - ref0, style, label=name, ms=3)
        ax.set_xlabel(d["xlabel"])
        ax.set_ylabel("energy - DFT minimum (eV)")
        ax.set_title(label)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def stage_report(args, spec, out: Path, split: dict) -> dict:
    from ase.io import read, write

    est_pot = out / "est" / "potential.pt"
    mace_info = json.loads((out / "mace.json").read_text()) if (out / "mace.json").exists() else {}
    mace_model = mace_info.get("model")
    work = out / "predictions"
    work.mkdir(exist_ok=True)
    report = {"dataset": args.dataset, "budget_min": args.budget_min, "cores": args.cores,
              "share": args.share, "threads": args.threads, "dtype": args.dtype,
              "mace_hidden": args.mace_hidden, "sets": {}}
    preds = {}
    for label, s in split["evals"].items():
        if s["n"] == 0:
            continue
        # Each model in the precision it was trained in.
        preds[label] = {"EST": _est_predict(str(est_pot), s["file"], args.dtype)}
        if mace_model:
            preds[label]["MACE"] = _mace_predict(mace_model, s["file"], args.dtype, work)
        report["sets"][label] = {k: errors(v) for k, v in preds[label].items()}

    # Scans (ethanol): energies along the H-removal path and the two normal modes.
    scans = {}
    for label, key, xlabel in (("H removal (energies)", "OH_dist", "O-H distance (Å)"),
                               ("normal mode 874 cm-1", None, "frame along the mode"),
                               ("normal mode 3005 cm-1", None, "frame along the mode")):
        if label not in preds:
            continue
        frames = read(split["evals"][label]["file"], index=":")
        x = [a.info[key] for a in frames] if key else list(range(len(frames)))
        d = {"x": x, "xlabel": xlabel, "DFT": [r[0] for r in preds[label]["EST"]]}
        for name, rows in preds[label].items():
            d[name] = [r[2] for r in rows]
        scans[label] = d
    if scans:
        _plot_scans(out / "scans.png", scans)
        report["scans"] = {k: {m: v[m] for m in v if m != "xlabel"} for k, v in scans.items()}

    # Speed: time per MD step (energy + forces) of each trained model, same cores, alternating.
    mol = read(split["evals"][next(iter(split["evals"]))]["file"], index=0)
    box = molecule_box(mol, n_atoms=60 if args.quick else 1000)
    structs = out / "speed_structures.xyz"
    write(structs, [mol, box])
    repeats = 3 if args.quick else args.repeats
    package = _export_package(est_pot, out) if args.export else None
    est_t, pkg_t, mace_t = [], [], []
    for _ in range(2 if args.quick else args.rounds):
        est_t.append(_time_est(str(est_pot), [mol, box], repeats, args.threads))
        if package:
            pkg_t.append(_time_est(str(package["path"]), [mol, box], repeats, args.threads))
        if mace_model:
            t, mace_params = _time_mace(mace_model, structs, repeats, args.threads)
            mace_t.append(t)
    est_ms = [1000 * statistics.median(r[i] for r in est_t) for i in range(2)]
    pkg_ms = [1000 * statistics.median(r[i] for r in pkg_t) for i in range(2)] if pkg_t else None
    mace_ms = [1000 * statistics.median(r[i] for r in mace_t) for i in range(2)] if mace_t else None

    from est_calc.potential import load_potential

    pot = load_potential(str(est_pot))
    meta = pot.metadata.get("training", {})
    report["models"] = {
        "EST": {"params": sum(p.numel() for p in pot.parameters()),
                "training_minutes": meta.get("wall_time_s", float("nan")) / 60,
                "steps": meta.get("steps"), "ms_molecule": est_ms[0], "ms_box": est_ms[1]},
    }
    if package:
        # The same potential as the EST row (its errors are EST's, to the export check's
        # round-off), as one AOTInductor graph: `est export`, then ESTCalculator(model=".pt2").
        report["models"]["EST .pt2"] = {**report["models"]["EST"], "ms_molecule": pkg_ms[0],
                                        "ms_box": pkg_ms[1], "export": package}
    if mace_model:
        report["models"]["MACE"] = {"params": mace_params,
                                    "training_minutes": mace_info.get("training_minutes"),
                                    "epochs": mace_info.get("epochs"),
                                    "ms_molecule": mace_ms[0], "ms_box": mace_ms[1]}
    report["box_atoms"] = len(box)
    report["molecule_atoms"] = len(mol)
    curves = {"EST": est_log_curve(out)}
    if mace_model:
        curves["MACE"] = mace_log_curve(out / "mace")
    report["curves"] = curves
    _plot_curves(out / "learning_curve.png", curves,
                 f"{args.dataset}: validation error against training time "
                 f"({args.budget_min:g} min budget)")
    text = format_report(report)
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(text)
    return report


def stage_uncertainty(args, out: Path, split: dict) -> dict:
    """Would the user have been warned? The latent-distance uncertainty (issue 26's
    ``ESTCalculator(uncertainty=True)``) fitted to the trained EST potential the way ``est train
    --uncertainty`` fits it (reference: the training frames; calibration: the validation
    frames, whose 95 % values are its "auto" flag thresholds), then evaluated on every
    evaluation set, per chemical formula where a set mixes molecules: frames flagged by the
    largest per-atom forces_std, by the frame's RMS of it, and by either; and the rank
    correlation of forces_std with the per-atom force error (sets with forces) or of energy_std
    with the energy error (energy-only sets)."""
    import shutil

    from ase.io import read

    from est_calc import ESTCalculator
    from est_calc.training.uncertainty import fit_and_save, spearman
    from est_calc.uncertainty import frame_statistics

    folder = out / "est_uncertainty"
    folder.mkdir(exist_ok=True)
    path = folder / "potential.pt"
    shutil.copyfile(out / "est" / "potential.pt", path)  # the sidecar is bound to this copy
    fit_and_save(path, out / "train.xyz", out / "valid.xyz")
    calc = ESTCalculator(model=str(path), dtype=args.dtype, device="cpu", uncertainty=True)
    part = calc.potential.uncertainty
    th = part.thresholds
    rows, result = [], {"thresholds": th, "sets": {}}
    for label, s in split["evals"].items():
        frames = read(s["file"], index=":")
        if not frames:
            continue
        per = []
        for a in frames:
            ref_e = a.get_potential_energy()
            ref_f = a.calc.results.get("forces")
            b = a.copy()
            b.calc = calc
            e, f = b.get_potential_energy(), b.get_forces()
            std = np.asarray(calc.results["forces_std"], dtype=float)
            (largest,), (rms,) = frame_statistics(std)
            per.append({"formula": a.get_chemical_formula(), "max": float(largest),
                        "rms": float(rms), "std": std,
                        "e_std": float(calc.results["energy_std"]), "de": e - ref_e,
                        "df": None if ref_f is None else np.linalg.norm(f - ref_f, axis=1)})
        formulas = sorted({r["formula"] for r in per})
        groups = [(label, per)] + ([(f"{label}: {f}", [r for r in per if r["formula"] == f])
                                    for f in formulas] if len(formulas) > 1 else [])
        for name, rs in groups:
            over_max = np.array([r["max"] > th["max"] for r in rs])
            over_rms = np.array([r["rms"] > th["rms"] for r in rs])
            if rs[0]["df"] is not None:
                rank = spearman(np.concatenate([r["std"] for r in rs]),
                                np.concatenate([r["df"] for r in rs]))
                what = "forces_std vs per-atom force error"
            else:
                rank = spearman(np.array([r["e_std"] for r in rs]),
                                np.abs([r["de"] for r in rs]))
                what = "energy_std vs energy error"
            result["sets"][name] = {"n": len(rs), "flagged_max": float(over_max.mean()),
                                    "flagged_rms": float(over_rms.mean()),
                                    "flagged_either": float((over_max | over_rms).mean()),
                                    "spearman": rank, "spearman_of": what}
            rows.append([name, len(rs), f"{100 * over_max.mean():.1f} %",
                         f"{100 * over_rms.mean():.1f} %",
                         f"{100 * (over_max | over_rms).mean():.1f} %", f"{rank:.3f} ({what})"])
    text = ("## EST's latent uncertainty on the evaluation sets\n\n"
            f"Fitted on the training frames (reference) and the validation frames (calibration): "
            f"a = {part.force_a:.4g} eV/Å, b = {part.force_b:.4g}; flag thresholds (95 % of "
            f"the validation frames under each) {th['max']:.4g} eV/Å (largest per-atom std) and "
            f"{th['rms']:.4g} eV/Å (the frame's RMS).\n\n"
            + markdown_table(["set", "frames", "flagged: largest std", "flagged: RMS std",
                              "flagged: either", "Spearman"], rows) + "\n")
    (out / "uncertainty.md").write_text(text)
    (out / "uncertainty.json").write_text(json.dumps(result, indent=1))
    print(text)
    return result


def format_report(r: dict) -> str:
    # Error columns for the models evaluated on the sets (the exported package is the EST
    # potential: its errors are EST's, so it has a speed row only).
    names = [n for n in r["models"] if any(n in errs for errs in r["sets"].values())]
    head = ["evaluation set", "frames"]
    for n in names:
        head += [f"{n} E RMSE / MAE (meV)", f"{n} F RMSE / MAE (meV/Å)"]
    rows = []
    for label, errs in r["sets"].items():
        row = [label, next(iter(errs.values()))["n"]]
        for n in names:
            e = errs.get(n, {})
            row.append(f"{e.get('energy_rmse_meV', float('nan')):.1f} / {e.get('energy_mae_meV', float('nan')):.1f}")
            f = e.get("forces_rmse_meV_A")
            row.append(f"{f:.1f} / {e['forces_mae_meV_A']:.1f}" if f is not None else "-")
        rows.append(row)
    lines = [f"## {r['dataset']}: {r['budget_min']:g} min each, cores {r['cores'] or 'all'} "
             f"(shared by {r['share']} runs), {r['threads']} thread(s), {r['dtype']}",
             "", markdown_table(head, rows), ""]
    mrows = []
    for n, m in r["models"].items():
        mrows.append([n, f"{m['params']:,}", f"{m['training_minutes']:.1f}" if m.get("training_minutes") else "-",
                      f"{m['ms_molecule']:.2f}", f"{m['ms_box']:.1f}"])
    for name in ("EST", "EST .pt2"):
        if "MACE" in r["models"] and name in r["models"]:
            e, m = r["models"][name], r["models"]["MACE"]
            mrows.append([f"MACE / {name}", "", "", f"{m['ms_molecule'] / e['ms_molecule']:.2f}x",
                          f"{m['ms_box'] / e['ms_box']:.2f}x"])
    lines += [markdown_table(["model", "parameters", "training (min)",
                              f"MD step, molecule ({r['molecule_atoms']} atoms, ms)",
                              f"MD step, box ({r['box_atoms']} atoms, ms)"], mrows), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(DATASETS), default="3bpa")
    p.add_argument("--data-root", default=str(DEFAULT_DATA))
    p.add_argument("--out", default=None, help="work folder (default runs/accuracy/DATASET)")
    p.add_argument("--stage", default="split,calibrate,mace,est,report,uncertainty")
    p.add_argument("--budget-min", type=float, default=60.0)
    p.add_argument("--cores", default=None, help="taskset CPU list for the trainings, e.g. 1")
    p.add_argument("--share", type=int, default=1,
                   help="trainings that share these cores at the same time (MACE's epoch plan)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where both models train (evaluation and timing stay on the CPU)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--mace-hidden", default="64x0e + 64x1o")
    p.add_argument("--mace-epoch-s", type=float, default=None,
                   help="MACE's epoch time on these cores (skips the calibration run)")
    p.add_argument("--export", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the trained EST potential exported to a .pt2 package (about "
                        "a minute to compile; default: on, off with --quick)")
    p.add_argument("--est-preset", default="molecule")
    p.add_argument("--est-overrides", default=None, help="JSON of ModelConfig overrides")
    p.add_argument("--est-seed", type=int, default=0,
                   help="EST's train.seed (initial weights, batch order, lattice rotations)")
    p.add_argument("--est-lr", type=float, default=0.01)
    p.add_argument("--est-ema", type=float, default=0.99)
    p.add_argument("--est-eval-every", type=int, default=200)
    p.add_argument("--est-compile", action="store_true",
                   help="train EST with train.compile (one compiled graph per step; minutes of "
                        "compiling at the start count against the budget)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="toy size: a few frames, tiny models")
    args = p.parse_args(argv)
    if args.quick:
        args.budget_min = min(args.budget_min, 0.15)
    if args.export is None:
        args.export = not args.quick
    spec = DATASETS[args.dataset]
    out = Path(args.out or REPO / "runs" / "accuracy" / args.dataset)
    out.mkdir(parents=True, exist_ok=True)
    stages = [s.strip() for s in args.stage.split(",") if s.strip()]
    unknown = set(stages) - {"split", "calibrate", "mace", "est", "report", "uncertainty"}
    if unknown:
        raise SystemExit(f"unknown stage(s) {sorted(unknown)}; choose split, calibrate, mace, "
                         f"est, report, uncertainty")
    split = stage_split(args, spec, out) if "split" in stages else \
        json.loads((out / "split.json").read_text())
    for s in split["evals"].values():
        s["file"] = str(out / Path(s["file"]).name)
    if not have_mace() and ({"calibrate", "mace"} & set(stages)):
        print(f"MACE peer env unavailable ({peer_python()}; benchmarks/setup_mace_env.sh makes "
              f"it): EST only")
        stages = [s for s in stages if s not in ("calibrate", "mace")]
    if "calibrate" in stages:
        stage_calibrate(args, spec, out, split)
    if "mace" in stages:
        stage_mace(args, spec, out, split)
    if "est" in stages:
        stage_est(args, spec, out, split)
    if "report" in stages:
        stage_report(args, spec, out, split)
    if "uncertainty" in stages:
        stage_uncertainty(args, out, split)
    return 0


if __name__ == "__main__":
    sys.exit(main())
