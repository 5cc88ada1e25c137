"""benchmarks/uncertainty.py --quick runs end to end: its tables, the calibration PNG and the
cost table of the shipped potential's uncertainty part."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_prints_the_tables_and_writes_the_plot(tmp_path):
    plot = tmp_path / "calibration.png"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "uncertainty.py"), "--quick", "--device",
         "cpu", "--plot", str(plot), "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for name in ("in distribution (val)", "OOD: fcc(110) Cu-Pd", "OOD: ternary alloys",
                 "OOD: unseen adsorbates", "OOD: strained alloys", "OOD: strained bulk"):
        assert f"| {name}" in out, name
    assert "Spearman (per atom)" in out and "miscal. area" in out and "frames flagged" in out
    assert "flagged (frame RMS)" in out and "flagged (either)" in out
    assert "| CO/Cu(111) slab | 66 |" in out and "Cost of uncertainty=True" in out
    assert plot.stat().st_size > 10_000
