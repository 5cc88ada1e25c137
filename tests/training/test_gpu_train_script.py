"""training_runs/gpu_train.py is run on a GPU machine CI never has; here it runs the same path on
the CPU for a few seconds, so that the prepared session cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_train_script_trains_in_budget_and_reports(tmp_path):
    from est_calc.cli import main
    from est_calc.potential import Potential, load_potential, save_potential

    cfg = yaml.safe_load((ROOT / "training_runs" / "est-emt-small-gpu.yaml").read_text())
    assert cfg["train"]["init"].startswith("runs/")  # a run output, relative to the repository
    # run outputs are not in git: an untrained tiny potential stands in for that checkpoint
    init = str(save_potential(Potential.from_config("tiny", load_potential("est-emt-small").species),
                              tmp_path / "init.pt"))
    data = tmp_path / "data"
    assert main(["generate", str(data), "--n-systems", "1", "--seed", "3", "--formats", "hdf5",
                 "--frames-per-system", "3", "--no-bulk", "--no-gas", "--quiet"]) == 0
    h5 = data / "synthetic.h5"
    out = tmp_path / "out"
    sets = [f"data.train=[{h5}]", f"data.val={h5}", "train.batch_size=2", "train.eval_every=2",
            "train.checkpoint_every=2", f"train.init={init}"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "training_runs" / "gpu_train.py"), "--device", "cpu",
         "--budget", "6", "--out", str(out)] + [x for s in sets for x in ("--set", s)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (out / "run" / "potential.pt").is_file() and (out / "run" / "checkpoint.pt").is_file()
    report = json.loads((out / "train_report.json").read_text())
    assert report["training"]["time_budget_s"] == 6.0
    assert report["training"]["init"] == init
    assert report["val_metrics"]["forces_mae"] > 0
    assert "validation force MAE" in proc.stdout


def test_gpu_train_script_refuses_cuda_without_a_gpu(tmp_path):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run([sys.executable, str(ROOT / "training_runs" / "gpu_train.py"),
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stdout
