"""The MACE peer as one long-lived process (``PeerSession``) and the round-alternating inference
benchmark, with a stand-in peer (CI has no MACE env): the protocol, error reporting, and that
each ratio is taken within its own round."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _common  # noqa: E402
import inference  # noqa: E402

# A stand-in for "<MACE python> _peer_mace.py serve OPTIONS": ignores the script path, says
# ready, then answers each request with 1 ms per atom times the round number (so the peer gets
# slower every round), or exits with an error on a request with repeats < 0.
FAKE_PEER = textwrap.dedent("""
    import json, sys
    from ase.io import read
    assert sys.argv[2] == "serve", sys.argv
    print("a library banner that is not JSON")
    print(json.dumps({"ready": True, "params": 7}), flush=True)
    for k, line in enumerate(sys.stdin, start=1):
        req = json.loads(line)
        if req["repeats"] < 0:
            print("boom: bad request", file=sys.stderr)
            sys.exit(3)
        frames = read(req["structures"], index=":")
        print(json.dumps({"model": "fake", "params": 7, "results": [
            {"n_atoms": len(a), "median_s": 1e-3 * len(a) * k} for a in frames]}), flush=True)
""")


@pytest.fixture
def fake_peer(tmp_path, monkeypatch):
    script = tmp_path / "fake_peer.py"
    script.write_text(FAKE_PEER)
    launcher = tmp_path / "python"
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    launcher.chmod(0o755)
    monkeypatch.setenv("EST_BENCH_MACE_PYTHON", str(launcher))
    return launcher


def _structures(tmp_path):
    from ase.build import bulk, molecule

    return _common.write_structures(tmp_path / "s.extxyz",
                                    [molecule("H2O"), bulk("Cu", "fcc", a=3.6, cubic=True)])


def test_session_answers_requests_and_reports_a_crash(fake_peer, tmp_path):
    path = _structures(tmp_path)
    with _common.PeerSession("cpu", "float32") as peer:
        assert peer.error is None and peer.params == 7
        first = peer.infer(path, repeats=2)
        second = peer.infer(path, repeats=2)
        assert [r["n_atoms"] for r in first["results"]] == [3, 4]
        assert second["results"][1]["median_s"] == pytest.approx(2 * first["results"][1]["median_s"])
        crashed = peer.infer(path, repeats=-1)
        assert "exited with 3" in crashed["error"] and "boom" in crashed["error"]
        assert peer.infer(path, repeats=1) == {"error": peer.error}   # stays failed


def test_session_without_mace_env_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("EST_BENCH_MACE_PYTHON", str(tmp_path / "missing" / "python"))
    with _common.PeerSession("cpu", "float32") as peer:
        assert "no MACE env" in peer.error
        assert "error" in peer.infer(tmp_path / "x.extxyz", repeats=1)


def test_inference_ratios_are_taken_within_rounds(fake_peer, monkeypatch):
    from ase.build import bulk, molecule

    monkeypatch.setattr(inference, "systems", lambda: {"water": molecule("H2O"),
                                                       "Cu cell": bulk("Cu", "fcc", a=3.6, cubic=True)})
    est_calls = []

    def fake_time(calc, atoms, repeats, device):
        est_calls.append(len(atoms))
        return 1e-3 * len(est_calls)     # EST gets slower call by call

    monkeypatch.setattr(inference, "time_calculator", fake_time)
    args = inference.base_parser("x").parse_args(["--quick", "--device", "cpu"])
    args.repeats, args.rounds, args.compile = 1, 3, False
    text = inference.run(args)
    # 2 presets x 2 systems per round, system by system: in round r the EST calls are water
    # (tiny, small), then Cu (tiny, small), and the peer answers water as its request 2r - 1
    # (k ms per atom for its k-th request) right after EST's water calls.
    assert len(est_calls) == 12
    assert est_calls[:4] == [3, 3, 4, 4]
    small_water = [1e-3 * 3 * (2 * r - 1) / (1e-3 * (4 * (r - 1) + 2)) for r in (1, 2, 3)]
    expected = sorted(small_water)[1]
    row = next(line for line in text.splitlines() if "| water |" in line and "EST-small" in line)
    assert f"{expected:.2f}x" in row
    assert f"{min(small_water):.2f}-{max(small_water):.2f}x" in row
    assert "MACE-small (untrained) | 7 |" in text
