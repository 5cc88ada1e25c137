"""EST and MACE-small on a busy machine: idle, beside a second simulation, beside a busy loop.

Issue 23: on a shared machine a simulation rarely has the CPUs to itself. This benchmark times
both codes, each exactly as a user gets it (``ESTCalculator()`` with the shipped default
potential and default settings; MACE-small with the peer's usual defaults), in three conditions:

* **(a) idle**: nothing else started by the benchmark (the machine's load average at the start
  is printed: the idle row is only idle if the machine was).
* **(b) beside a second simulation of the same code**: a background process that runs
  VelocityVerlet MD (1 fs, 300 K, restarted from the same state every 200 steps) without pause,
  started before the timing and killed after it. EST: ``ESTCalculator()`` on a 108-atom Cu bulk
  (``cu_bulk(3)``); MACE: MACE-small on the 66-atom slab (``_peer_mace.py busy_md``). Both use
  the same loop, ``_peer_mace.md_until_killed``.
* **(d) beside a single-threaded busy loop**: ``python -c "while True: pass"`` (preceded only by
  the line that ties it to this script's life, see below).

Timed cases, in the timed process, each repeated (median and worst reported):

* **slab call**: the 66-atom CO/Cu(111) slab (``co_cu_slab()``); before each repeat, outside the
  timing, fresh positions (the slab rattled by 0.01 Å around its start, new random numbers each
  time, so ASE's cache never answers); timed: ``atoms.get_forces()`` then ``atoms.get_stress()``
  (both codes return the stress of a periodic cell from the same pass). One warm-up call.
* **bulk call**: the same on the 864-atom Cu bulk (``cu_bulk(6)``).
* **MD**: 100 VelocityVerlet steps (1 fs) on the slab, every repeat from the same state (300 K
  seeded velocities; the start's forces are computed outside the timing); 2 warm-up steps.
* **training**: 20 steps. EST: ``Trainer.train_step`` of EST-small, batch 4, on synthetic EMT
  frames (``training_throughput.time_est``: a fresh trainer per repeat, one warm-up step).
  MACE: the peer's ``train`` task on the same frames (same batch size, graphs built before the
  timing, one warm-up step). The sum of the 20 step times is one repeat.

What runs where, and why:

* **This script** (est_calc's python, as ``make bench`` runs it) only orchestrates: it writes
  the structures and the training data to a temporary folder, starts and stops the background
  loads, runs the timed processes one after the other and prints the tables. It times nothing.
* **The timed process** is a fresh python per code and condition, ``contention.py _worker est``
  with est_calc's python (``sys.executable``) and ``contention.py _worker mace`` with the peer's
  (``_common.peer_python()``): a new process that imports est_calc (or MACE) first, as a user's
  script does, so its threads, OpenMP wait policy and allocator are the ones the code chooses
  by itself. This script could not be that process: it runs under ``make bench``'s
  ``OMP_WAIT_POLICY=PASSIVE``, has imported torch already, and would time EST and MACE in
  different ways. Its environment is this script's without the OpenMP/MKL thread and wait
  variables (:data:`USER_ENV_DROP`): a user's shell does not set them (``--inherit-env`` keeps
  them, to see what they change). The MACE processes get the peer's environment
  (``_common._peer_env``) without the malloc setting that the other scripts hand the peer to
  match EST's allocator: here each code runs as its users get it.
* **The loads** are separate processes too, started in their own session with the same user
  environment, given a few seconds to warm up (``--settle``; the MD loads first report that their
  first step is done), checked to be alive after the timing, and always killed afterwards:
  SIGTERM, then SIGKILL, in ``finally`` blocks that also run on Ctrl-C and on SIGTERM/SIGHUP.
  Each load also asks the kernel to kill it when this script dies (``PR_SET_PDEATHSIG``), so a
  SIGKILL of this script (``run_all.py``'s timeout) leaves nothing spinning either.

Usage: python benchmarks/contention.py [--quick | --full] [--no-peer] [--conditions idle,same,busy]
       [--cases slab,bulk,md,train] [--repeats N] [--md-repeats N] [--train-repeats N]
       [--settle S] [--inherit-env]
--quick (``make bench``): 3 repeats of the calls, 1 of MD and of training, each timed process
stopped after 420 s (its finished cases are kept); sized for 6-8 minutes on 2 idle cores with
the peer (an estimate from the other scripts' timings, not yet measured: MACE's spinning OpenMP
threads beside a second MACE process can make (b) much longer). Default: 5 repeats of each;
--full: 9 of the calls, 5 of MD and training.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from _common import (BENCH_DIR, PEER_SCRIPT, PEER_UNAVAILABLE, ROOT, base_parser, fmt_ms,
                     machine_info, markdown_table, peer_python)

SCRIPT = Path(__file__).resolve()

#: Conditions in the order they run: key -> label of the tables.
CONDITIONS = {"idle": "(a) idle", "same": "(b) beside a 2nd simulation, same code",
              "busy": "(d) beside a busy loop"}
#: Timed cases in the order they run.
CASES = ("slab", "bulk", "md", "train")
CODES = {"est": "EST", "mace": "MACE-small"}

#: Variables a user's shell does not set but ``make bench`` (or a tuned shell) may: dropped from
#: the environment of the timed processes and of the loads (unless --inherit-env).
USER_ENV_DROP = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                 "OMP_PROC_BIND", "OMP_PLACES", "GOMP_SPINCOUNT", "KMP_BLOCKTIME",
                 "KMP_AFFINITY", "MKL_DYNAMIC", "OMP_DYNAMIC")

#: The single-threaded busy loop of condition (d). The first lines only tie it to this script's
#: life (Linux ``PR_SET_PDEATHSIG``); the load is the bare ``while True: pass``.
BUSY_LOOP = ("import ctypes, signal\n"
             "try:\n"
             "    ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))\n"
             "except Exception:\n"
             "    pass\n"
             "while True: pass\n")

RATTLE_A = 0.01          # per-repeat rattle of the single calls, Å
MD_TIMESTEP_FS = 1.0
MD_TEMPERATURE_K = 300.0
MD_WARMUP_STEPS = 2
LOAD_RESET_EVERY = 200   # steps of a background MD load between restarts from its start
LOAD_READY_TIMEOUT_S = 300.0


# ---------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """What one run measures (from the command line, :func:`make_plan`)."""

    call_repeats: int
    md_repeats: int
    train_repeats: int
    md_steps: int = 100
    train_steps: int = 20
    train_batch: int = 4
    n_systems: int = 2          # synthetic data: adsorbate systems of generate()
    settle_s: float = 3.0
    worker_timeout_s: float = 1800.0
    cases: tuple = CASES
    conditions: tuple = tuple(CONDITIONS)
    smoke: bool = False
    mode: str = "default"
    extra: dict = field(default_factory=dict)


def _names(text: str | None, known, what: str) -> tuple:
    if text is None:
        return tuple(known)
    wanted = [w.strip() for w in text.split(",") if w.strip()]
    bad = [w for w in wanted if w not in known]
    if bad or not wanted:
        raise ValueError(f"unknown {what} {bad or text!r}; choose from {', '.join(known)}")
    return tuple(k for k in known if k in wanted)   # always in the running order


def make_plan(args: argparse.Namespace) -> Plan:
    """Repeat counts and sizes of a run: --smoke (toy, for tests), --quick, default, --full;
    then the explicit flags, which win. ValueError for impossible values."""
    if args.smoke:
        plan = Plan(call_repeats=1, md_repeats=1, train_repeats=1, md_steps=3, train_steps=2,
                    n_systems=1, settle_s=1.0, cases=("slab", "md", "train"), smoke=True,
                    mode="smoke")
    elif args.quick:
        plan = Plan(call_repeats=3, md_repeats=1, train_repeats=1, mode="quick")
    elif args.full:
        plan = Plan(call_repeats=9, md_repeats=5, train_repeats=5, mode="full")
    else:
        plan = Plan(call_repeats=5, md_repeats=5, train_repeats=5)
    for name, attr in (("repeats", "call_repeats"), ("md_repeats", "md_repeats"),
                       ("train_repeats", "train_repeats"), ("md_steps", "md_steps"),
                       ("train_steps", "train_steps"), ("batch_size", "train_batch")):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
            setattr(plan, attr, int(value))
    plan.worker_timeout_s = 420.0 if plan.mode == "quick" else 1800.0
    if args.worker_timeout is not None:
        if args.worker_timeout <= 0:
            raise ValueError(f"--worker-timeout must be > 0, got {args.worker_timeout}")
        plan.worker_timeout_s = float(args.worker_timeout)
    if args.settle is not None:
        if not 0 <= args.settle <= 600:
            raise ValueError(f"--settle must be in [0, 600] s, got {args.settle}")
        plan.settle_s = float(args.settle)
    if args.cases is not None:
        plan.cases = _names(args.cases, CASES, "case(s)")
    if args.conditions is not None:
        plan.conditions = _names(args.conditions, CONDITIONS, "condition(s)")
    return plan


def build_parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--conditions", default=None,
                   help="comma-separated subset of idle,same,busy (default: all)")
    p.add_argument("--cases", default=None,
                   help="comma-separated subset of slab,bulk,md,train (default: all)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed single calls per case (quick 3, default 5, full 9)")
    p.add_argument("--md-repeats", type=int, default=None,
                   help="timed MD runs (quick 1, default and full 5)")
    p.add_argument("--train-repeats", type=int, default=None,
                   help="timed training runs (quick 1, default and full 5)")
    p.add_argument("--md-steps", type=int, default=None, help="MD steps per run (100)")
    p.add_argument("--train-steps", type=int, default=None, help="training steps per run (20)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (4)")
    p.add_argument("--settle", type=float, default=None,
                   help="seconds a load runs before the timing starts (3)")
    p.add_argument("--inherit-env", action="store_true",
                   help="keep this shell's OMP_*/MKL_* variables in the timed processes and loads")
    p.add_argument("--worker-timeout", type=float, default=None,
                   help="limit of one timed process (one code, one condition), s; the cases "
                        "it finished are kept (quick 420, otherwise 1800)")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # toy size, tests
    return p


# ---------------------------------------------------------------------------- environments
def user_env(base: dict | None = None, *, inherit: bool = False) -> dict:
    """``base`` (default: this process's environment) as a user's shell would have it: without
    :data:`USER_ENV_DROP` unless ``inherit``; plus ``EST_BENCH_PARENT_PID`` (this process), which
    the loads and timed processes use to die with it."""
    env = dict(os.environ if base is None else base)
    if not inherit:
        for name in USER_ENV_DROP:
            env.pop(name, None)
    env["EST_BENCH_PARENT_PID"] = str(os.getpid())
    return env


def peer_user_env(*, inherit: bool = False) -> dict:
    """The peer's environment (``_common._peer_env``: no est_calc on its path, torch's load flag)
    without the malloc tuning the other scripts give it, as a MACE user has it."""
    from _common import _peer_env
    from est_calc.allocator import malloc_env

    env = _peer_env()
    if not inherit:
        for name in {*malloc_env(), *malloc_env(retain=True)}:
            if name not in os.environ:   # keep a setting the user made themselves
                env.pop(name, None)
    return user_env(env, inherit=inherit)


# ---------------------------------------------------------------------------- loads
class LoadFailed(RuntimeError):
    """A background load did not start, or did not report ready in time."""


_LIVE: set = set()   # loads started and not yet stopped (stopped on exit and on signals)


class BackgroundLoad:
    """One background process that loads the machine while another is timed.

    ``with BackgroundLoad(name, cmd, wait_ready=True, settle_s=3) as load:`` starts ``cmd`` in a
    new session (stdin closed, stdout read by a thread until EOF so it can never block on a full
    pipe, stderr to a temporary log), waits for a ``{"ready": true}`` JSON line on its stdout
    when ``wait_ready``, then ``settle_s`` seconds, and checks that it still runs; on leaving the
    block (also by an exception or Ctrl-C) the whole process group gets SIGTERM, then SIGKILL
    after ``grace_s``. :class:`LoadFailed` (with the tail of its stderr) when it exits or stays
    silent before it is ready; it is stopped then too.
    """

    def __init__(self, name: str, cmd: list, *, env: dict | None = None,
                 cwd: str | Path | None = None, wait_ready: bool = False, settle_s: float = 3.0,
                 ready_timeout_s: float = LOAD_READY_TIMEOUT_S, grace_s: float = 5.0):
        self.name, self.cmd = name, [str(c) for c in cmd]
        self.env = user_env() if env is None else env
        self.cwd = str(cwd) if cwd is not None else None
        self.wait_ready, self.settle_s = wait_ready, float(settle_s)
        self.ready_timeout_s, self.grace_s = float(ready_timeout_s), float(grace_s)
        self.proc: subprocess.Popen | None = None
        self.ready = threading.Event()
        self.info: dict = {}
        self._log = None
        self._reader: threading.Thread | None = None

    # -- life cycle
    def start(self) -> "BackgroundLoad":
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self._log, env=self.env, cwd=self.cwd,
                                     start_new_session=True)
        _LIVE.add(self)
        try:
            self._reader = threading.Thread(target=self._read_stdout, daemon=True,
                                            name=f"load-{self.name}")
            self._reader.start()
            if self.wait_ready:
                deadline = time.monotonic() + self.ready_timeout_s
                while not self.ready.wait(0.1):
                    if self.proc.poll() is not None:
                        raise LoadFailed(f"{self.name} exited with {self.proc.returncode} "
                                         f"before it was ready: {self.log_tail()}")
                    if time.monotonic() > deadline:
                        raise LoadFailed(f"{self.name} not ready after "
                                         f"{self.ready_timeout_s:.0f} s: {self.log_tail()}")
            time.sleep(self.settle_s)
            if not self.alive():
                raise LoadFailed(f"{self.name} exited with {self.proc.returncode} while "
                                 f"settling: {self.log_tail()}")
        except BaseException:
            self.stop()
            raise
        return self

    def _read_stdout(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").strip()
            if line.startswith("{"):
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if msg.get("ready"):
                    self.info = msg
                    self.ready.set()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def log_tail(self, n_chars: int = 400) -> str:
        if self._log is None:
            return ""
        try:
            self._log.flush()
            self._log.seek(0)
            text = self._log.read().decode(errors="replace").strip()
        except (OSError, ValueError):
            return ""
        lines = text.splitlines()
        return (lines[-1] if lines else "no output")[-n_chars:]

    def stop(self) -> None:
        """SIGTERM to the load's process group, SIGKILL after ``grace_s``; idempotent."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            for sig, wait_s in ((signal.SIGTERM, self.grace_s), (signal.SIGKILL, 30.0)):
                try:
                    os.killpg(proc.pid, sig)   # its own session: pgid == pid
                except (ProcessLookupError, PermissionError):
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(sig)
                try:
                    proc.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._reader is not None:
            self._reader.join(timeout=5.0)
        if proc is not None and proc.stdout is not None:
            with contextlib.suppress(OSError):
                proc.stdout.close()
        _LIVE.discard(self)

    def close(self) -> None:
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "BackgroundLoad":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def stop_all_loads() -> None:
    """Stop every load still running (exit and signal handlers)."""
    for load in list(_LIVE):
        load.stop()


def _raise_on_signal(signum, _frame):
    raise SystemExit(128 + signum)   # unwinds through the finally blocks that stop the loads


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP end this script through its ``finally`` blocks (Ctrl-C already does);
    loads still running at interpreter exit are stopped too."""
    import atexit

    atexit.register(stop_all_loads)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):   # not in the main thread
            signal.signal(sig, _raise_on_signal)


def busy_loop_load(settle_s: float, *, inherit_env: bool = False) -> BackgroundLoad:
    """Condition (d): a single-threaded ``while True: pass`` in a fresh python."""
    return BackgroundLoad("busy loop", [sys.executable, "-c", BUSY_LOOP],
                          env=user_env(inherit=inherit_env), settle_s=settle_s)


def same_code_load(code: str, inputs: dict, device: str, dtype: str, settle_s: float, *,
                   est_kwargs: dict | None = None, inherit_env: bool = False) -> BackgroundLoad:
    """Condition (b): MD without pause with the same code (EST: 108-atom Cu bulk; MACE: the
    66-atom slab), reporting ready after its first step."""
    if code == "est":
        opts = {"structures": inputs["bulk108"], "est_kwargs": est_kwargs or {},
                "reset_every": LOAD_RESET_EVERY}
        return BackgroundLoad("EST MD (108-atom Cu bulk)",
                              [sys.executable, SCRIPT, "_load", "est", json.dumps(opts)],
                              env=user_env(inherit=inherit_env), cwd=BENCH_DIR, wait_ready=True,
                              settle_s=settle_s)
    if code == "mace":
        opts = {"structures": inputs["slab"], "device": device, "dtype": dtype,
                "reset_every": LOAD_RESET_EVERY, "temperature_K": MD_TEMPERATURE_K}
        return BackgroundLoad("MACE-small MD (66-atom slab)",
                              [peer_python(), PEER_SCRIPT, "busy_md", json.dumps(opts)],
                              env=peer_user_env(inherit=inherit_env), cwd=BENCH_DIR,
                              wait_ready=True, settle_s=settle_s)
    raise ValueError(f"unknown code {code!r}")


# ---------------------------------------------------------------------------- timed process
def time_calls(calc, atoms, repeats: int, *, warmup: int = 1, seed: int = 0) -> list:
    """Seconds of ``get_forces(); get_stress()`` on freshly rattled positions, per repeat."""
    import numpy as np

    rng = np.random.default_rng(seed)
    atoms = atoms.copy()
    base = atoms.get_positions().copy()
    atoms.calc = calc
    times = []
    for k in range(warmup + repeats):
        atoms.set_positions(base + rng.normal(0.0, RATTLE_A, base.shape))
        t0 = time.perf_counter()
        atoms.get_forces()
        atoms.get_stress()
        dt = time.perf_counter() - t0
        if k >= warmup:
            times.append(dt)
    return times


def time_md(calc, atoms, steps: int, repeats: int, *, warmup_steps: int = MD_WARMUP_STEPS,
            seed: int = 0) -> list:
    """Seconds of ``steps`` VelocityVerlet steps (1 fs) per repeat, each from the same state."""
    import numpy as np
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    start = atoms.copy()
    start.calc = None
    MaxwellBoltzmannDistribution(start, temperature_K=MD_TEMPERATURE_K,
                                 rng=np.random.RandomState(seed))

    def fresh():
        a = start.copy()
        a.calc = calc
        a.get_forces()   # the start's forces, outside the timing
        return VelocityVerlet(a, timestep=MD_TIMESTEP_FS * units.fs)

    if warmup_steps:
        fresh().run(warmup_steps)
    times = []
    for _ in range(repeats):
        dyn = fresh()
        t0 = time.perf_counter()
        dyn.run(steps)
        times.append(time.perf_counter() - t0)
    return times


def _case(fn) -> dict:
    try:
        return {"times_s": fn()}
    except Exception as err:  # one failed case must not lose the others
        return {"error": f"{type(err).__name__}: {str(err)[:300]}"}


def worker(code: str, opt: dict, emit=None) -> None:
    """The timed process (run as ``contention.py _worker CODE JSON`` in that code's python).

    Prints JSON lines as it goes (``emit``, default: print and flush): ``{"info": ...}`` once the
    calculator is built, then ``{"case": name, "result": {"times_s": [...]} or {"error": ...}}``
    per case, then ``{"done": true, ...}``; a timed-out process thus keeps its finished cases.
    """
    from _peer_mace import die_with_parent

    if emit is None:
        def emit(msg: dict) -> None:
            print(json.dumps(msg), flush=True)

    die_with_parent()
    plan, inputs = opt["plan"], opt["inputs"]
    device, dtype = opt["device"], opt["dtype"]
    if code == "est":
        import est_calc  # noqa: F401 - first, as a user's script: it may set up threads/OpenMP
        from est_calc.calculator import ESTCalculator

        calc = ESTCalculator(**opt.get("est_kwargs", {}))
        n_params = sum(p.numel() for p in calc.potential.parameters())

        def train_once(k: int) -> float:
            from training_throughput import time_est

            out_dir = Path(opt["tmp"]) / f"est_train_{opt.get('tag', 'run')}_{k}"
            r = time_est(Path(inputs["train_h5"]), out_dir,
                         batch_size=plan["train_batch"], steps=plan["train_steps"],
                         device=device, dtype=dtype)
            return plan["train_batch"] * plan["train_steps"] / r["structures_per_s"]
    elif code == "mace":
        with contextlib.suppress(ValueError):   # est_calc's tree stays out of MACE's imports
            sys.path.remove(str(ROOT))
        import _peer_mace as peer

        model, n_params = peer.build_model(dtype, device)
        calc = peer._calculator(model, device, dtype)

        def train_once(k: int) -> float:
            r = peer.task_train({"structures": inputs["train_extxyz"],
                                 "batch_size": plan["train_batch"], "steps": plan["train_steps"],
                                 "warmup": 1, "device": device, "dtype": dtype})
            return r["total_s"]
    else:
        raise ValueError(f"unknown code {code!r}")
    import torch
    from ase.io import read

    emit({"info": {"params": int(n_params), "torch_threads": torch.get_num_threads(),
                   "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                   "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}})
    for case in plan["cases"]:
        if case in ("slab", "bulk"):
            atoms = read(inputs[case], index=0)
            result = _case(lambda a=atoms: time_calls(calc, a, plan["call_repeats"]))
        elif case == "md":
            atoms = read(inputs["slab"], index=0)
            result = _case(lambda a=atoms: time_md(calc, a, plan["md_steps"], plan["md_repeats"]))
        elif case == "train":
            result = _case(lambda: [train_once(k) for k in range(plan["train_repeats"])])
        else:
            result = {"error": f"unknown case {case!r}"}
        emit({"case": case, "result": result})
    emit({"done": True, "torch_threads_after": torch.get_num_threads()})


def est_load(opt: dict) -> None:
    """Condition (b) for EST (``contention.py _load est JSON``): MD with ``ESTCalculator()`` on
    the given structure until killed."""
    from _peer_mace import die_with_parent, md_until_killed

    die_with_parent()
    import est_calc  # noqa: F401 - first, as a user's script
    from ase.io import read
    from est_calc.calculator import ESTCalculator

    atoms = read(opt["structures"], index=0)
    md_until_killed(atoms, ESTCalculator(**opt.get("est_kwargs", {})),
                    reset_every=int(opt.get("reset_every", LOAD_RESET_EVERY)),
                    temperature_K=MD_TEMPERATURE_K)


def parse_worker_output(stdout: str, cases, failure: str | None) -> dict:
    """Collect a timed process's JSON lines into ``{"info", "cases": {case: result}}``; cases it
    did not finish get ``{"error": failure}`` (or the whole answer is ``{"error": ...}`` when it
    never got as far as its info line)."""
    info, results, done = None, {}, False
    for line in (stdout or "").splitlines():
        if not line.startswith("{"):
            continue
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if "info" in msg:
            info = msg["info"]
        elif "case" in msg:
            results[msg["case"]] = msg["result"]
        elif msg.get("done"):
            done = True
            if info is not None:
                info["torch_threads_after"] = msg.get("torch_threads_after")
    if info is None:
        return {"error": failure or "timed process gave no answer"}
    for case in cases:
        if case not in results:
            results[case] = {"error": failure or ("not run" if done else "no answer")}
    return {"info": info, "cases": results}


def run_worker(code: str, opt: dict, *, timeout_s: float, inherit_env: bool = False) -> dict:
    """Run the timed process of ``code``; its answer (:func:`parse_worker_output`), with the
    cases it finished even when it timed out or crashed later."""
    if code == "est":
        python, env = sys.executable, user_env(inherit=inherit_env)
    else:
        python, env = peer_python(), peer_user_env(inherit=inherit_env)
    cmd = [str(python), str(SCRIPT), "_worker", code, json.dumps(opt)]
    failure = None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env,
                              cwd=str(BENCH_DIR), stdin=subprocess.DEVNULL)
        stdout = proc.stdout
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            failure = f"timed process exited with {proc.returncode}: {tail[:300]}"
    except subprocess.TimeoutExpired as exc:   # run() killed it; what it printed is kept
        out = exc.stdout or ""
        stdout = out.decode(errors="replace") if isinstance(out, bytes) else out
        failure = f"timed process stopped at its {timeout_s:.0f} s limit (--worker-timeout)"
    return parse_worker_output(stdout, opt["plan"]["cases"], failure)


# ---------------------------------------------------------------------------- orchestration
def prepare_inputs(plan: Plan, tmp: Path) -> dict:
    """Write the structures (and the training frames) the processes read; name -> path."""
    from _common import co_cu_slab, cu_bulk, write_structures

    inputs = {"slab": str(write_structures(tmp / "slab.extxyz", [co_cu_slab()]))}
    if "bulk" in plan.cases:
        inputs["bulk"] = str(write_structures(tmp / "bulk864.extxyz", [cu_bulk(6)]))
    if "same" in plan.conditions:
        inputs["bulk108"] = str(write_structures(tmp / "bulk108.extxyz", [cu_bulk(3)]))
    if "train" in plan.cases:
        from training_throughput import export_for_peer, make_data

        summary = make_data(tmp / "data", plan.n_systems)
        inputs["train_h5"] = str(tmp / "data" / "synthetic.h5")
        path, mean_atoms = export_for_peer(tmp / "data" / "synthetic.extxyz",
                                           tmp / "peer_train.extxyz")
        inputs["train_extxyz"] = str(path)
        inputs["train_frames"], inputs["train_mean_atoms"] = summary["n_frames"], mean_atoms
    return inputs


def est_calculator_kwargs(device_arg: str, device: str, dtype: str) -> dict:
    """``ESTCalculator()``'s keywords: none unless --device/--dtype ask for something other than
    its defaults (device "auto", float32)."""
    from _common import resolve_device

    kwargs = {}
    if device_arg != "auto" and device != resolve_device("auto"):
        kwargs["device"] = device
    if dtype != "float32":
        kwargs["dtype"] = dtype
    return kwargs


def measure(plan: Plan, *, device: str, dtype: str, est_kwargs: dict, with_peer: bool,
            inherit_env: bool, worker_timeout_s: float, log=print) -> tuple[dict, dict]:
    """Every condition for every code; returns (results[cond][code], inputs summary)."""
    codes = ["est"] + (["mace"] if with_peer else [])
    results: dict = {cond: {} for cond in plan.conditions}
    with tempfile.TemporaryDirectory(prefix="est_contention_") as tmp:
        tmp = Path(tmp)
        inputs = prepare_inputs(plan, tmp)
        opt_base = {"plan": asdict(plan), "inputs": inputs, "device": device, "dtype": dtype,
                    "est_kwargs": est_kwargs, "tmp": str(tmp)}
        for cond in plan.conditions:
            with contextlib.ExitStack() as shared:
                shared_load = None
                if cond == "busy":
                    try:
                        shared_load = shared.enter_context(
                            busy_loop_load(plan.settle_s, inherit_env=inherit_env))
                    except LoadFailed as err:
                        for code in codes:
                            results[cond][code] = {"error": f"load failed: {err}"}
                        continue
                for code in codes:
                    log(f"contention: {CONDITIONS[cond]}, {CODES[code]} ...")
                    with contextlib.ExitStack() as own:
                        loads = [shared_load] if shared_load is not None else []
                        if cond == "same":
                            try:
                                loads.append(own.enter_context(same_code_load(
                                    code, inputs, device, dtype, plan.settle_s,
                                    est_kwargs=est_kwargs, inherit_env=inherit_env)))
                            except LoadFailed as err:
                                results[cond][code] = {"error": f"load failed: {err}"}
                                continue
                        t0 = time.perf_counter()
                        res = run_worker(code, dict(opt_base, tag=cond),
                                         timeout_s=worker_timeout_s,
                                         inherit_env=inherit_env)
                        res["wall_s"] = time.perf_counter() - t0
                        res["loads"] = [load.name for load in loads]
                        res["loads_alive"] = all(load.alive() for load in loads)
                        results[cond][code] = res
        summary = {k: v for k, v in inputs.items() if k.startswith("train_") and
                   not k.endswith(("h5", "extxyz"))}
    return results, summary


# ---------------------------------------------------------------------------- tables
def _times(results: dict, cond: str, code: str, case: str):
    """(times list or None, error text or None)."""
    res = results.get(cond, {}).get(code)
    if res is None:
        return None, None
    if "error" in res:
        return None, res["error"]
    c = res.get("cases", {}).get(case)
    if c is None:
        return None, None
    if "error" in c:
        return None, c["error"]
    return c["times_s"], None


def case_label(plan: Plan, case: str) -> str:
    return {"slab": "66-atom slab, get_forces + get_stress",
            "bulk": "864-atom bulk, get_forces + get_stress",
            "md": f"{plan.md_steps} MD steps (VV 1 fs), slab",
            "train": f"{plan.train_steps} training steps, batch {plan.train_batch}"}[case]


def render(plan: Plan, results: dict, *, device: str, dtype: str, peer_reason: str | None,
           est_kwargs: dict, train_summary: dict | None = None, wall_s: float | None = None,
           loadavg: tuple | None = None, inherit_env: bool = False) -> str:
    """The markdown report of :func:`measure`'s results."""
    codes = ["est", "mace"]
    errors: list[str] = []

    def note(text: str) -> str:
        if text not in errors:
            errors.append(text)
        return f"failed [{errors.index(text) + 1}]"

    headers = ["case", "condition", "EST ms (median)", "EST worst", "EST slowdown (worst)",
               "MACE ms (median)", "MACE worst", "MACE slowdown (worst)",
               "EST/MACE speed"]
    rows = []
    for case in plan.cases:
        idle = {code: _times(results, "idle", code, case)[0] for code in codes}
        for cond in plan.conditions:
            row = [case_label(plan, case), CONDITIONS[cond]]
            med = {}
            for code in codes:
                if code == "mace" and peer_reason is not None:
                    row += [PEER_UNAVAILABLE, "-", "-"]
                    continue
                times, err = _times(results, cond, code, case)
                if times is None:
                    row += [note(err) if err else "-", "-", "-"]
                    continue
                med[code] = statistics.median(times)
                worst = max(times)
                if idle[code]:
                    base = statistics.median(idle[code])
                    slow = f"{med[code] / base:.2f}x ({worst / base:.2f}x)"
                else:
                    slow = "-"
                row += [fmt_ms(med[code]), fmt_ms(worst), slow]
            if peer_reason is not None:
                row.append(PEER_UNAVAILABLE)
            elif len(med) == 2:
                row.append(f"{med['mace'] / med['est']:.2f}x")
            else:
                row.append("-")
            rows.append(row)

    est_desc = "ESTCalculator(" + ", ".join(f"{k}={v!r}" for k, v in est_kwargs.items()) + ")"
    out = [f"### Contention: EST ({est_desc}, shipped potential) and MACE-small beside other "
           f"processes ({device}, {dtype}; {plan.mode})", ""]
    lines = [f"Machine: {machine_info(device)}"]
    if loadavg is not None:
        lines.append(f"load average at the start (1/5/15 min): "
                     f"{loadavg[0]:.2f} / {loadavg[1]:.2f} / {loadavg[2]:.2f}")
    out += ["; ".join(lines), "",
            markdown_table(headers, rows), "",
            f"Repeats: {plan.call_repeats} of each single call (after 1 warm-up call), "
            f"{plan.md_repeats} of the MD run (after {MD_WARMUP_STEPS} warm-up steps), "
            f"{plan.train_repeats} of the training run (each after 1 warm-up step). "
            "ms: median and worst repeat. Slowdown: the condition's median (worst) over the "
            "idle median of the same code. EST/MACE speed: MACE's median over EST's in the "
            "same condition (> 1: EST is faster).",
            "Loads: (b) a second process running MD without pause with the same code (EST: "
            "ESTCalculator() on a 108-atom Cu bulk; MACE: MACE-small on the 66-atom slab); "
            "(d) `python -c \"while True: pass\"`. Each timed process is a fresh python of its "
            "code; its environment is " + ("this shell's (--inherit-env)." if inherit_env else
                                           "this shell's without OMP_*/MKL_* variables, as a "
                                           "user's shell has it."),
            ""]
    if train_summary and "train" in plan.cases:
        out += [f"Training frames: {train_summary.get('train_frames')} synthetic EMT frames, "
                f"{train_summary.get('train_mean_atoms', 0):.0f} atoms each on average; EST: "
                "Trainer.train_step of EST-small (includes collation and neighbour lists), "
                "MACE: the peer's train task (graphs built before timing).", ""]
    info_rows, dead = [], []
    for cond in plan.conditions:
        for code in codes:
            res = results.get(cond, {}).get(code)
            if res is None or "info" not in res:
                continue
            i = res["info"]
            alive = res.get("loads_alive")
            info_rows.append([CONDITIONS[cond], CODES[code], i.get("torch_threads"),
                              i.get("OMP_WAIT_POLICY") or "unset", ", ".join(res.get("loads", []))
                              or "-", "-" if not res.get("loads") else ("yes" if alive else
                                                                         "NO"),
                              f"{res['wall_s']:.0f}" if "wall_s" in res else "-"])
            if res.get("loads") and not alive:
                dead.append(f"{CONDITIONS[cond]}, {CODES[code]}")
    if info_rows:
        out += ["Timed processes (torch threads: torch's default count in the process; a code "
                "may set its own per call):", "",
                markdown_table(["condition", "code", "torch threads", "OMP_WAIT_POLICY",
                                "background load", "load alive to the end", "process wall s"],
                               info_rows), ""]
    if dead:
        out += [f"WARNING: a background load exited before the timing ended ({'; '.join(dead)}): "
                "those rows were not measured under the full load.", ""]
    if peer_reason is not None:
        out += [f"MACE-small: {PEER_UNAVAILABLE} ({peer_reason}).", ""]
    for k, err in enumerate(errors, start=1):
        out.append(f"[{k}] {err}")
    if errors:
        out.append("")
    if wall_s is not None:
        out += [f"_contention.py wall time: {wall_s:.0f} s_", ""]
    return "\n".join(out)


def run(args: argparse.Namespace) -> str:
    """Measure every condition and return the markdown report."""
    from _common import resolve_device

    plan = make_plan(args)
    device = resolve_device(args.device)
    loadavg = os.getloadavg() if hasattr(os, "getloadavg") else None
    peer_reason = None
    if args.no_peer:
        peer_reason = "skipped (--no-peer)"
    elif not peer_python().exists():
        peer_reason = f"no MACE env at {peer_python()} (run benchmarks/setup_mace_env.sh)"
    est_kwargs = est_calculator_kwargs(args.device, device, args.dtype)
    t0 = time.perf_counter()
    install_signal_handlers()
    try:
        results, summary = measure(
            plan, device=device, dtype=args.dtype, est_kwargs=est_kwargs,
            with_peer=peer_reason is None, inherit_env=args.inherit_env,
            worker_timeout_s=plan.worker_timeout_s,
            log=lambda msg: print(msg, file=sys.stderr, flush=True))
    finally:
        stop_all_loads()
    # A MACE process that could not run at all (no timings anywhere): "peer unavailable".
    if peer_reason is None:
        mace = [r.get("mace", {}) for r in results.values()]
        if mace and all("error" in m and not m["error"].startswith("load failed") for m in mace):
            peer_reason = mace[0]["error"]
    return render(plan, results, device=device, dtype=args.dtype, peer_reason=peer_reason,
                  est_kwargs=est_kwargs, train_summary=summary,
                  wall_s=time.perf_counter() - t0, loadavg=loadavg,
                  inherit_env=args.inherit_env)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("_worker", "_load"):
        if len(argv) != 3:
            print("usage: contention.py _worker est|mace JSON | _load est JSON", file=sys.stderr)
            return 2
        if argv[0] == "_worker":
            worker(argv[1], json.loads(argv[2]))
            return 0
        if argv[1] != "est":
            print("contention.py _load: only 'est' (MACE's load is _peer_mace.py busy_md)",
                  file=sys.stderr)
            return 2
        est_load(json.loads(argv[2]))
        return 0
    args = build_parser().parse_args(argv)
    try:
        make_plan(args)
    except ValueError as err:
        print(f"contention.py: {err}", file=sys.stderr)
        return 2
    print(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
