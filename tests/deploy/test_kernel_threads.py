"""Serial and OpenMP packages (est_calc/deploy/export.py, "Serial or OpenMP kernels").

A package's C++ kernels are serial (plain loops; a scatter is ``+=``) unless ``--openmp`` asks
for OpenMP loops (every scattered element an atomic add). Both give the eager potential's
numbers; the metadata says which one a file holds.
"""

from __future__ import annotations

import os
import shutil
import zipfile

import numpy as np
import pytest
import torch
from ase.build import bulk

from est_calc import ESTCalculator
from est_calc.cli import main
from est_calc.deploy.package import read_metadata


def _kernel_source(path) -> str:
    with zipfile.ZipFile(path) as z:
        return "".join(z.read(n).decode() for n in z.namelist() if n.endswith(".cpp"))


def _cu_bulk():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.05, seed=3)
    return atoms


def test_default_package_has_serial_kernels(package64):
    assert read_metadata(package64)["threads"] == "serial"
    source = _kernel_source(package64)
    assert "#pragma omp" not in source and "atomic_add" not in source
    # The scatters are there, as plain accumulations.
    assert "+=" in source


@pytest.mark.parametrize("flag, threads, kind", [([], 1, "serial"), (["--openmp"], 2, "openmp")])
def test_codegen_threads_follow_the_flag(tiny_package64, tmp_path, monkeypatch, flag, threads,
                                          kind):
    """Inductor's choice is made from torch's thread count while it compiles: 1 for serial
    kernels, at least 2 for OpenMP ones, the caller's count restored after (the compile itself
    stubbed: the session's package is copied)."""
    import est_calc.deploy.export as export_module

    seen = {}

    def compile_stub(program, package_path, inductor_configs):
        seen["threads"] = torch.get_num_threads()
        seen["meta"] = inductor_configs["aot_inductor.metadata"]
        shutil.copyfile(tiny_package64[1], package_path)

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_stub)
    monkeypatch.setattr(export_module, "_check", lambda path, function, inputs: 0.0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path / "m.pt2"
        assert main(["export", str(tiny_package64[0]), "-o", str(out), *flag]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert seen["threads"] == threads and seen["meta"]["threads"] == kind


@pytest.mark.skipif(os.environ.get("EST_TEST_OPENMP_EXPORT") != "1",
                    reason="compiles a second package (about 90 s); EST_TEST_OPENMP_EXPORT=1")
def test_openmp_package_equals_eager_on_two_threads(tiny_package64, tmp_path):
    source, _ = tiny_package64
    path = tmp_path / "tiny64_omp.pt2"
    assert main(["export", str(source), "-o", str(path), "--dtype", "float64",
                 "--openmp"]) == 0
    assert read_metadata(path)["threads"] == "openmp"
    kernels = _kernel_source(path)
    assert "#pragma omp parallel" in kernels and "atomic_add" in kernels

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        atoms = _cu_bulk()
        atoms.calc = ESTCalculator(model=str(path), dtype="float64")
        got = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        atoms.calc = ESTCalculator(model=str(source), dtype="float64", threads=2)
        want = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    finally:
        torch.set_num_threads(old)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-8, atol=1e-10)
