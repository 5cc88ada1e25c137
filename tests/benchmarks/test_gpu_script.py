"""benchmarks/gpu.py runs on a GPU machine that CI never has; its every section runs here at toy
sizes on the CPU so that the script cannot rot between GPU sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_script_runs_every_section_on_cpu(tmp_path):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--smoke",
         "--no-peer", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (tmp_path / "gpu_report.md").read_text()
    assert "FAILED" not in report, report
    for title in ("Neighbour lists", "Energy + forces + stress", "torch.compile", "Largest cell",
                  "MD steps per second", "Batched throughput", "Precision"):
        assert f"## {title}" in report
    data = json.loads((tmp_path / "gpu_report.json").read_text())
    # neighbour rows: pair counts of every backend agree
    assert all(row[-1] == "yes" for row in data["neighbours"])
    assert data["inference"]["est_ms"]
    # relax_many was timed against separate relax runs, with work to do in both
    assert data["relax_many"]["many_steps"] > 0 and data["relax_many"]["single_steps"] > 0
    # the compiled path was timed and gives the eager forces (float32 rounding only)
    assert data["compiled"] and all(r["max_force_diff_eV_per_A"] < 1e-4 for r in data["compiled"].values())


def test_gpu_script_refuses_cuda_without_a_gpu(tmp_path):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal path does not apply")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cuda"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "no CUDA device" in proc.stdout


def test_rerun_with_wheels_installs_then_reruns_with_the_wheels_first(tmp_path, monkeypatch):
    """The one helper gpu.py and training_runs/gpu_train.py use to run themselves again on
    the carried wheels: the child sees the install target and the repository on PYTHONPATH and
    the done-flag, the child's own call is a no-op, and without wheels nothing happens."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu

    monkeypatch.delenv("EST_GPU_WHEELS_DONE", raising=False)
    monkeypatch.setattr(gpu, "install_wheels", lambda wheels: {"est": str(tmp_path / "site")})
    child = tmp_path / "child.py"
    report = tmp_path / "child.json"
    child.write_text(
        "import json, os, sys\n"
        f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
        "import gpu\n"
        f"json.dump({{'argv': sys.argv[1:], 'path': os.environ['PYTHONPATH'],\n"
        "           'again': gpu.rerun_with_wheels('w', __file__, [])},\n"
        f"          open({str(report)!r}, 'w'))\n"
        "sys.exit(7)\n")
    assert gpu.rerun_with_wheels(None, str(child), []) is None
    assert gpu.rerun_with_wheels(str(tmp_path), str(child), ["--x", "1"]) == 7
    seen = json.loads(report.read_text())
    assert seen["argv"] == ["--x", "1"] and seen["again"] is None
    assert seen["path"].split(os.pathsep)[:2] == [str(tmp_path / "site"), str(ROOT)]


def test_gpu_script_budget_skips_sections_and_still_writes_the_report(tmp_path):
    """A spent budget skips the remaining sections by name (none silently dropped), and the
    report files exist even so: on the device a call cut off at its limit keeps what ran."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--smoke",
         "--no-peer", "--budget", "0", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (tmp_path / "gpu_report.md").read_text()
    data = json.loads((tmp_path / "gpu_report.json").read_text())
    assert len(data["skipped"]) == 8
    assert report.count("skipped:") == 8
    assert "inference" not in data
