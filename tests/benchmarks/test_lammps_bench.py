"""benchmarks/lammps.py (LAMMPS ``pair_style est`` against ``run_md``) at toy size: its table
and JSON have every row, both paths ran the same trajectory (float64: the same energies at the
first and the last frame), 2 ranks work, and the memory guard stops a run instead of the machine
swapping. A one-layer float64 test potential stands in for the shipped one (its export is about a
minute, the shipped one's three); the plugin is built as the LAMMPS tests build it, and the test
skips, saying why, where it cannot be."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "lammps.py"

pytestmark = pytest.mark.lammps


@pytest.fixture(scope="module")
def tiny(plugin, make_potential, tmp_path_factory, request):
    """(source .pt, float64 .pt2) of the one-layer so2 test potential: the session's
    ``tiny_package64`` (tests/conftest.py); EST_TEST_LAMMPS_PACKAGE reuses a package exported
    from make_potential("so2", n_layers=1) (as tests/lammps does)."""
    if os.environ.get("EST_TEST_LAMMPS_PACKAGE"):
        from est_calc.potential import save_potential

        folder = tmp_path_factory.mktemp("lammps_bench")
        source = save_potential(make_potential("so2", n_layers=1), folder / "tiny.pt")
        return source, Path(os.environ["EST_TEST_LAMMPS_PACKAGE"])
    return request.getfixturevalue("tiny_package64")


def _run(tiny, plugin, tmp_path, *extra, timeout=900):
    source, package = tiny
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--dtype", "float64", "--potential",
           str(source), "--package", str(package), "--plugin", str(plugin), "--json", str(out),
           "--workdir", str(tmp_path / "work"), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=env, check=False)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_quick_table_and_same_trajectory(tiny, plugin, tmp_path):
    proc, data = _run(tiny, plugin, tmp_path, "--quick", "--ranks", "1,2", "--steps", "3",
                      "--warmup", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = data["rows"]
    assert [(r["atoms"], r["parallel"], r["steps"]) for r in rows] == [(108, 1, 3), (108, 2, 3)]
    for r in rows:
        ase, lmp = r["ase"], r["lammps"]
        assert ase["steps_per_s"] > 0 and lmp["steps_per_s"] > 0, r
        assert r["ratio"] == pytest.approx(lmp["steps_per_s"] / ase["steps_per_s"])
        assert ase["threads_used"] == r["parallel"]
        assert lmp["ghosts_per_rank"] > 0
        assert ase["peak_host_bytes"] > 0 and lmp["peak_host_bytes"] > 0
        # float64: the same energy at the first frame (the benchmark's own check) and, after
        # 1 + 3 steps of the same NVE trajectory, at the last
        assert r["e_first_diff_eV_per_atom"] < 1e-10, r
        assert r["e_last_diff_eV_per_atom"] < 1e-8, r
        assert ase["e_last_eV"] != ase["e_first_eV"]  # the atoms moved
    assert data["mismatch"] == [] and data["dtype"] == "float64"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("|")]
    assert lines[0].startswith("| atoms | ranks = threads | steps | ASE steps/s | LAMMPS steps/s "
                               "| LAMMPS / ASE |")
    assert [ln.split("|")[1:3] for ln in lines[2:]] == [[" 108 ", " 1 "], [" 108 ", " 2 "]]


def test_memory_guard_stops_a_run(tiny, plugin, tmp_path):
    """A budget far below one run's memory: each run is killed by the guard and the row says so;
    the script still ends normally with its table."""
    proc, data = _run(tiny, plugin, tmp_path, "--quick", "--ranks", "1", "--steps", "1",
                      "--warmup", "0", "--memory-gib", "0.05", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = data["rows"]
    for kind in ("ase", "lammps"):
        assert "memory guard" in row[kind]["error"], row
    assert "failed: memory guard" in proc.stdout


def test_row_beyond_the_budget_is_skipped_after_a_probe(tiny, plugin, tmp_path):
    """256 atoms beyond --probe-atoms 108: one step at 108 atoms per path, then the row is
    skipped with the extrapolated need instead of being run. The budget is set from a measured
    108-atom run (1.4x its larger peak), as a process's resident baseline (torch, LAMMPS, MPI
    libraries) differs between machines; 256 atoms then need ~2.4x that peak."""
    (tmp_path / "measure").mkdir()
    proc, data = _run(tiny, plugin, tmp_path / "measure", "--sizes", "108", "--ranks", "1",
                      "--steps", "1", "--warmup", "0", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = data["rows"]
    peak = max(row[kind]["peak_host_bytes"] for kind in ("ase", "lammps"))
    budget_gib = 1.4 * peak / 1024 ** 3
    proc, data = _run(tiny, plugin, tmp_path, "--sizes", "256", "--probe-atoms", "108",
                      "--memory-gib", f"{budget_gib:.3f}", "--ranks", "1", "--steps", "1",
                      "--warmup", "0", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = data["rows"]
    assert row["atoms"] == 256
    for kind in ("ase", "lammps"):
        assert row[kind]["error"].startswith("skipped: needs ~"), row
        assert "peak of a run at 108 atoms" in row[kind]["error"]
    assert "probe" in proc.stderr


def test_memory_extrapolation_and_cells():
    import importlib.util

    spec = importlib.util.spec_from_file_location("lammps_bench_script", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up
    spec.loader.exec_module(bench)
    model = bench.MemoryModel()
    for n, gib in ((1000, 1.0), (10_000, 4.0)):
        model.add(bench.Run("ase", n, 1, 3, peak_bytes=int(gib * bench.GIB)), gpu=False)
    # through the two largest sizes: 1 GiB + (n - 1000) / 3000 GiB
    assert model.predict("ase", 1, 100_000) / bench.GIB == pytest.approx(34.0)
    assert model.largest("ase", 1, 22 * bench.GIB) == pytest.approx(64_000, abs=1)
    assert model.predict("lammps", 1, 100_000) is None
    for n in (108, 1000, 10_000, 100_000):
        assert len(bench.cu_bulk_atoms(n)) == n
    with pytest.raises(ValueError, match="4 atoms per cubic cell"):
        bench.cu_bulk_atoms(1001)


def test_chunked_lammps_runs_the_same_trajectory(tiny, plugin, tmp_path):
    """--chunk-atoms: LAMMPS and ASE evaluate 108 atoms in three groups of 36 and follow the same
    trajectory to float64 round-off."""
    proc, data = _run(tiny, plugin, tmp_path, "--quick", "--ranks", "1", "--steps", "2",
                      "--warmup", "1", "--chunk-atoms", "36", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert data["chunk_atoms"] == 36
    (row,) = data["rows"]
    assert row["e_first_diff_eV_per_atom"] < 1e-10 and row["e_last_diff_eV_per_atom"] < 1e-8
    assert "chunk_atoms 36" in (tmp_path / "work" / "lammps_108_1_r0" / "in.lmp").read_text()
    spec = json.loads((tmp_path / "work" / "ase_108_1_r0" / "spec.json").read_text())
    assert spec["max_atoms"] == 36
