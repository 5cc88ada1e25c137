"""The shipped potential compiled (float32, about three minutes on two cores): ESTCalculator
(model="x.pt2") gives what ESTCalculator() gives. Opt-in, EST_TEST_SHIPPED_EXPORT=1, as it costs
more than the deployment tests' share of the suite; the traced float32 function is tested by
test_export.py in every run."""

from __future__ import annotations

import os

import numpy as np
import pytest
from deploy_cases import POTENTIAL, structures

from est_calc.calculator import ESTCalculator

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("EST_TEST_SHIPPED_EXPORT") != "1",
                       reason="compiles the shipped potential (minutes); "
                              "EST_TEST_SHIPPED_EXPORT=1"),
]


@pytest.fixture(scope="module")
def package32(tmp_path_factory):
    from est_calc.deploy import export_potential

    path = tmp_path_factory.mktemp("shipped") / "small32.pt2"
    return export_potential(POTENTIAL, path, dtype="float32").path


@pytest.mark.parametrize("name", list(structures()))
def test_shipped_package_equals_default_calculator(package32, name):
    atoms = structures()[name]
    props = ["energy", "energies", "forces"] + (["stress"] if atoms.pbc.any() else [])
    deployed, eager = ESTCalculator(model=str(package32)), ESTCalculator(device="cpu")
    reference = ESTCalculator(POTENTIAL, dtype="float64", device="cpu")
    for calc in (deployed, eager, reference):
        calc.calculate(atoms.copy(), props)
    for key in props:
        ref = reference.results[key]
        scale = max(1.0, float(np.abs(ref).max()))
        err_eager = float(np.abs(eager.results[key] - ref).max()) / scale
        err_package = float(np.abs(deployed.results[key] - ref).max()) / scale
        assert err_package <= max(4 * err_eager, 2e-6), (key, err_package, err_eager)
