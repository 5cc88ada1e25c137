"""`est export` writes its file atomically: never a partial file, never over an existing file
without --overwrite; each failure is one line on stderr. (Its success path writes the session's
float64 package, tests/deploy/conftest.py.)"""

from __future__ import annotations

import pytest
import torch
from deploy_cases import POTENTIAL

import est_calc.deploy.export as export_module
from est_calc.cli import main


def _error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_existing_file_is_kept_without_overwrite(tmp_path, capsys):
    out = tmp_path / "model.pt2"
    out.write_bytes(b"keep me")
    assert main(["export", POTENTIAL, "-o", str(out)]) == 2
    line = _error(capsys)
    assert line.startswith("est export: error: ") and "--overwrite" in line
    assert out.read_bytes() == b"keep me"


@pytest.mark.parametrize("args, match", [
    (["no-such-potential", "-o", "x.pt2"], "unknown potential"),
    ([POTENTIAL, "-o", "x.pt"], "ends in .pt2"),
    pytest.param([POTENTIAL, "-o", "x.pt2", "--device", "cuda"], "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")),
])
def test_bad_arguments(tmp_path, capsys, monkeypatch, args, match):
    monkeypatch.chdir(tmp_path)
    assert main(["export", *args]) == 2
    assert match in _error(capsys)
    assert list(tmp_path.iterdir()) == []


def _fake_steps(monkeypatch, compile_fn):
    """Replace tracing, compiling and the check (minutes of work) by stand-ins."""
    monkeypatch.setattr(export_module, "trace", lambda function, inputs: object())
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_fn)
    monkeypatch.setattr(export_module, "_check", lambda path, function, inputs: 0.0)


@pytest.mark.parametrize("overwrite", [False, True])
def test_failed_compile_leaves_no_file(tmp_path, capsys, monkeypatch, overwrite):
    def half_written(program, package_path, inductor_configs):
        with open(package_path, "wb") as fh:
            fh.write(b"PK partial")
        raise RuntimeError("the C++ compiler died\nwith details")

    _fake_steps(monkeypatch, half_written)
    out = tmp_path / "model.pt2"
    if overwrite:
        out.write_bytes(b"old")
    argv = ["export", POTENTIAL, "-o", str(out)] + (["--overwrite"] if overwrite else [])
    assert main(argv) == 2
    assert "compiler died" in _error(capsys)
    assert (out.read_bytes() == b"old") if overwrite else not out.exists()
    assert _leftovers(tmp_path) == []


def test_interrupted_compile_leaves_no_file(tmp_path, monkeypatch):
    def interrupted(program, package_path, inductor_configs):
        with open(package_path, "wb") as fh:
            fh.write(b"PK partial")
        raise KeyboardInterrupt

    _fake_steps(monkeypatch, interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["export", POTENTIAL, "-o", str(tmp_path / "model.pt2")])
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_a_file(tmp_path, capsys, monkeypatch):
    seen = {}

    def complete(program, package_path, inductor_configs):
        seen.update(inductor_configs["aot_inductor.metadata"])
        with open(package_path, "wb") as fh:
            fh.write(b"new package")

    _fake_steps(monkeypatch, complete)
    out = tmp_path / "model.pt2"
    out.write_bytes(b"old")
    assert main(["export", POTENTIAL, "-o", str(out), "--overwrite", "--dtype", "float64"]) == 0
    assert out.read_bytes() == b"new package"
    assert _leftovers(tmp_path) == []
    assert "wrote" in capsys.readouterr().out
    assert seen["dtype"] == "float64" and seen["est_format"] == "est_calc.deploy"
    assert seen["source"] == POTENTIAL
