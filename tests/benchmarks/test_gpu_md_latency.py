"""benchmarks/gpu_md_latency.py runs on a GPU machine that CI never has; here it runs at toy size
on the CPU (the graph calculator then runs the padded step eagerly), so that it cannot rot
between GPU sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_md_latency.py"


def test_md_latency_script_runs_at_toy_size_on_cpu(tmp_path):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    env.pop("EST_GPU_WHEELS_DONE", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--atoms", "32", "--steps", "5",
         "--warmup", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((tmp_path / "gpu_md_latency.json").read_text())
    (row,) = data["rows"]
    assert row["atoms"] == 32 and "padded step" in row["graph_path"]
    assert row["eager_ms_per_step"] > 0 and row["graph_ms_per_step"] > 0
    # float32 on both paths: the padded step's forces are the eager ones to round-off
    assert row["max_force_diff_eV_per_A"] < 1e-4
    assert row["captures_in_all"] == 1 and row["captures_in_timed_steps"] == 0
    assert row["list_builds_graph"] == 0  # the skin kept the list over the timed steps
    assert "target_met" not in row  # only a CUDA run at 1,000 atoms is judged
    report = (tmp_path / "gpu_md_latency.md").read_text()
    assert "| 32 |" in report and "FAILED" not in report


def test_md_latency_script_sizes_and_refusals():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_md_latency

    assert len(gpu_md_latency.cu_bulk_atoms(1000)) == 1000
    assert len(gpu_md_latency.cu_bulk_atoms(864)) == 864
    with pytest.raises(ValueError, match="4 atoms per cubic cell"):
        gpu_md_latency.cu_bulk_atoms(1001)
    import torch

    if torch.cuda.is_available():
        return
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert proc.returncode == 2 and "no CUDA device" in proc.stdout
