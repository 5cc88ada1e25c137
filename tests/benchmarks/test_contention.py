"""benchmarks/contention.py: its command line, its tables, and above all its background loads,
which must start, be seen running during the timing, and be gone afterwards whatever happens
(normal end, an exception, Ctrl-C, a SIGKILL of the benchmark). Nothing heavy is timed: the
timed processes are replaced by stand-ins and the loads by short-lived stand-ins where possible."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import contention  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="process groups and /proc: Linux only")


def _gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (absent, or a zombie waiting for its reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")


def _wait_gone(pids, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(_gone(p) for p in pids):
            return True
        time.sleep(0.05)
    return all(_gone(p) for p in pids)


def _sleeper(tmp_path, *, ready=True, fail=False) -> list:
    """A stand-in load: optionally a banner and a ready line, then sleeps (or fails)."""
    script = tmp_path / f"load_{ready}_{fail}.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys, time
        print("a banner that is not JSON", flush=True)
        if {fail!r}:
            print("boom: the load cannot start", file=sys.stderr, flush=True)
            sys.exit(3)
        if {ready!r}:
            print(json.dumps({{"ready": True, "n_atoms": 5}}), flush=True)
        time.sleep(120)
    """))
    return [sys.executable, str(script)]


# ---------------------------------------------------------------------------- command line
def test_modes_and_flags_give_the_plan():
    parse = contention.build_parser().parse_args
    quick = contention.make_plan(parse(["--quick"]))
    assert (quick.call_repeats, quick.md_repeats, quick.train_repeats) == (3, 1, 1)
    assert (quick.md_steps, quick.train_steps, quick.train_batch) == (100, 20, 4)
    assert quick.cases == contention.CASES and quick.conditions == ("idle", "same", "busy")
    default = contention.make_plan(parse([]))
    assert min(default.call_repeats, default.md_repeats, default.train_repeats) >= 5
    full = contention.make_plan(parse(["--full"]))
    assert full.call_repeats >= default.call_repeats and full.md_repeats >= 5
    smoke = contention.make_plan(parse(["--smoke"]))
    assert smoke.smoke and "bulk" not in smoke.cases and smoke.md_steps <= 5
    custom = contention.make_plan(parse(["--quick", "--repeats", "4", "--md-steps", "7",
                                         "--cases", "md,slab", "--conditions", "busy,idle",
                                         "--settle", "0", "--worker-timeout", "9"]))
    assert (custom.call_repeats, custom.md_steps, custom.settle_s) == (4, 7, 0.0)
    assert custom.cases == ("slab", "md") and custom.conditions == ("idle", "busy")  # run order
    assert custom.worker_timeout_s == 9.0
    for bad in (["--repeats", "0"], ["--cases", "slab,nope"], ["--conditions", ""],
                ["--settle", "-1"], ["--worker-timeout", "0"]):
        with pytest.raises(ValueError):
            contention.make_plan(parse(bad))
    assert contention.main(["--cases", "nope"]) == 2
    with pytest.raises(SystemExit):
        parse(["--quick", "--full"])


def test_user_environment_drops_the_thread_variables(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("EST_SOMETHING", "kept")
    env = contention.user_env()
    assert "OMP_WAIT_POLICY" not in env and "OMP_NUM_THREADS" not in env
    assert env["EST_SOMETHING"] == "kept" and env["EST_BENCH_PARENT_PID"] == str(os.getpid())
    assert contention.user_env(inherit=True)["OMP_WAIT_POLICY"] == "PASSIVE"


# ---------------------------------------------------------------------------- loads
def test_busy_loop_runs_and_is_killed_even_after_an_exception():
    with contention.busy_loop_load(0.2) as load:
        pid = load.pid
        assert load.alive() and pid in {ld.pid for ld in contention._LIVE}
    assert _wait_gone([pid]) and not contention._LIVE
    with pytest.raises(KeyboardInterrupt):
        with contention.busy_loop_load(0.0) as load:
            pid = load.pid
            raise KeyboardInterrupt   # Ctrl-C during the timing
    assert _wait_gone([pid]) and not contention._LIVE


def test_load_waits_for_ready_and_reports_a_failed_start(tmp_path):
    with contention.BackgroundLoad("stand-in", _sleeper(tmp_path), wait_ready=True,
                                   settle_s=0.0, grace_s=1.0) as load:
        assert load.ready.is_set() and load.info["n_atoms"] == 5 and load.alive()
        pid = load.pid
    assert _wait_gone([pid])
    with pytest.raises(contention.LoadFailed, match="exited with 3.*boom"):
        contention.BackgroundLoad("broken", _sleeper(tmp_path, fail=True), wait_ready=True,
                                  settle_s=0.0).start()
    silent = contention.BackgroundLoad("silent", _sleeper(tmp_path, ready=False),
                                       wait_ready=True, settle_s=0.0, ready_timeout_s=0.5,
                                       grace_s=1.0)
    with pytest.raises(contention.LoadFailed, match="not ready"):
        silent.start()
    assert _wait_gone([silent.pid]) and not contention._LIVE


def test_md_load_loop_reports_ready_and_stops(tmp_path):
    """The loop both MD loads run (``_peer_mace.md_until_killed``), here with ASE's EMT."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / "benchmarks")!r})
        from ase.build import bulk
        from ase.calculators.emt import EMT
        from _peer_mace import die_with_parent, md_until_killed
        die_with_parent()
        md_until_killed(bulk("Cu", "fcc", a=3.6, cubic=True), EMT(), reset_every=3)
    """)
    with contention.BackgroundLoad("EMT MD", [sys.executable, "-c", code], wait_ready=True,
                                   settle_s=0.3, grace_s=2.0) as load:
        assert load.info["n_atoms"] == 4 and load.alive()   # still running after restarts
        pid = load.pid
    assert _wait_gone([pid])


def test_mace_same_code_load_is_the_peer_busy_md_task(tmp_path, monkeypatch):
    fake = tmp_path / "fake_peer.py"
    fake.write_text(textwrap.dedent("""
        import json, sys, time
        assert sys.argv[2] == "busy_md", sys.argv
        opts = json.loads(sys.argv[3])
        print(json.dumps({"ready": True, "n_atoms": opts["reset_every"]}), flush=True)
        time.sleep(120)
    """))
    launcher = tmp_path / "python"
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{fake}" "$@"\n')
    launcher.chmod(0o755)
    monkeypatch.setenv("EST_BENCH_MACE_PYTHON", str(launcher))
    inputs = {"slab": str(tmp_path / "slab.extxyz"), "bulk108": str(tmp_path / "b.extxyz")}
    with contention.same_code_load("mace", inputs, "cpu", "float32", 0.0) as load:
        assert load.info["n_atoms"] == contention.LOAD_RESET_EVERY and load.alive()
        assert "OMP_WAIT_POLICY" not in load.env   # a MACE user's environment
        pid = load.pid
    assert _wait_gone([pid])


def test_loads_die_with_a_killed_benchmark(tmp_path):
    """SIGKILL of the benchmark (run_all's timeout) runs no finally block: the loads must still
    go, through PR_SET_PDEATHSIG."""
    child = tmp_path / "bench.py"
    child.write_text(textwrap.dedent(f"""
        import json, sys, time
        sys.path.insert(0, {str(ROOT / "benchmarks")!r})
        import contention
        busy = contention.busy_loop_load(0.0).start()
        code = ("import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
                "from _peer_mace import die_with_parent; die_with_parent(); "
                "import json, time; print(json.dumps({{'ready': True}}), flush=True); "
                "time.sleep(120)")
        other = contention.BackgroundLoad("py", [sys.executable, "-c", code],
                                          wait_ready=True, settle_s=0.0).start()
        print(json.dumps([busy.pid, other.pid]), flush=True)
        time.sleep(120)
    """))
    proc = subprocess.Popen([sys.executable, str(child)], stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(proc.stdout.readline())
        assert not any(_gone(p) for p in pids)
    finally:
        proc.kill()
        proc.wait()
    assert _wait_gone(pids), [p for p in pids if not _gone(p)]


def test_measure_runs_each_condition_with_its_loads_and_cleans_up(tmp_path, monkeypatch):
    """The orchestration with stand-in timed processes: idle has no load, (b) the code's own
    MD load, (d) the busy loop shared by both codes; every load is gone afterwards, also when
    the timing is interrupted."""
    started = []

    def fake_same(code, inputs, device, dtype, settle_s, **kw):
        load = contention.BackgroundLoad(f"same-{code}", _sleeper(tmp_path), wait_ready=True,
                                         settle_s=settle_s, grace_s=1.0)
        started.append(load)
        return load

    seen = []

    def fake_worker(code, opt, *, timeout_s, inherit_env=False):
        live = sorted(ld.name for ld in contention._LIVE if ld.alive())
        seen.append((code, live))
        started.extend(ld for ld in contention._LIVE if ld not in started)
        return {"info": {"torch_threads": 1, "OMP_WAIT_POLICY": None},
                "cases": {"slab": {"times_s": [0.01 * (1 + len(live))] * 3}}}

    monkeypatch.setattr(contention, "same_code_load", fake_same)
    monkeypatch.setattr(contention, "run_worker", fake_worker)
    plan = contention.Plan(call_repeats=3, md_repeats=1, train_repeats=1, settle_s=0.0,
                           cases=("slab",))
    results, _ = contention.measure(plan, device="cpu", dtype="float32", est_kwargs={},
                                    with_peer=True, inherit_env=False, worker_timeout_s=10,
                                    log=lambda msg: None)
    assert seen == [("est", []), ("mace", []), ("est", ["same-est"]), ("mace", ["same-mace"]),
                    ("est", ["busy loop"]), ("mace", ["busy loop"])]
    assert all(results[c][code]["loads_alive"]
               for c in ("same", "busy") for code in ("est", "mace"))
    assert _wait_gone([ld.pid for ld in started]) and not contention._LIVE

    text = contention.render(plan, results, device="cpu", dtype="float32", peer_reason=None,
                             est_kwargs={})
    assert "| 66-atom slab, get_forces + get_stress | (b) beside a 2nd simulation, same code | " \
           "20 | 20 | 2.00x (2.00x) | 20 | 20 | 2.00x (2.00x) | 1.00x |" in text

    def interrupted(code, opt, **kw):
        started.extend(ld for ld in contention._LIVE if ld not in started)
        raise KeyboardInterrupt

    monkeypatch.setattr(contention, "run_worker", interrupted)
    plan.conditions = ("busy",)
    with pytest.raises(KeyboardInterrupt):
        contention.measure(plan, device="cpu", dtype="float32", est_kwargs={}, with_peer=False,
                           inherit_env=False, worker_timeout_s=10, log=lambda msg: None)
    assert _wait_gone([ld.pid for ld in started]) and not contention._LIVE


# ---------------------------------------------------------------------------- answers, tables
def test_a_timed_out_process_keeps_its_finished_cases():
    out = "\n".join(["banner", json.dumps({"info": {"torch_threads": 2}}),
                     json.dumps({"case": "slab", "result": {"times_s": [0.1, 0.2, 0.3]}})])
    res = contention.parse_worker_output(out, ["slab", "bulk", "md"], "stopped at its limit")
    assert res["cases"]["slab"]["times_s"] == [0.1, 0.2, 0.3]
    assert res["cases"]["bulk"] == {"error": "stopped at its limit"} == res["cases"]["md"]
    assert contention.parse_worker_output("", ["slab"], "exited with 1: boom") == \
        {"error": "exited with 1: boom"}


def test_table_slowdowns_ratios_and_missing_peer():
    plan = contention.Plan(call_repeats=3, md_repeats=1, train_repeats=1, cases=("slab", "md"))

    def ans(slab, md):
        return {"info": {"torch_threads": 2, "OMP_WAIT_POLICY": "PASSIVE"},
                "cases": {"slab": {"times_s": slab}, "md": md}, "loads": [], "loads_alive": True}

    results = {"idle": {"est": ans([0.01, 0.02, 0.03], {"times_s": [1.0]})},
               "same": {"est": ans([0.04, 0.05, 0.09], {"error": "RuntimeError: x"})},
               "busy": {"est": {"error": "load failed: busy loop exited"}}}
    text = contention.render(plan, results, device="cpu", dtype="float32",
                             peer_reason="no MACE env at /x", est_kwargs={})
    rows = [ln for ln in text.splitlines() if ln.startswith("| 66-atom slab")]
    assert rows[0].startswith("| 66-atom slab, get_forces + get_stress | (a) idle | 20 | 30 "
                              "| 1.00x (1.50x) | peer unavailable |")
    assert "| 50 | 90 | 2.50x (4.50x) | peer unavailable |" in rows[1]
    assert "failed [1]" in rows[2] and "[1] load failed: busy loop exited" in text
    assert "failed [2]" in text and "[2] RuntimeError: x" in text
    assert "MACE-small: peer unavailable (no MACE env at /x)." in text


def test_run_all_runs_it_in_quick_mode():
    import run_all

    entry = next(s for s in run_all.SCRIPTS if s[0] == "contention.py")
    assert entry[1] == ["--quick"] and entry[3] is True
