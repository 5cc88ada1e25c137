"""What the deployment tests share, built once per session (compiling takes minutes on a CPU).

* ``package64``: a compiled float64 package of an untrained so2 potential of one layer (the
  "tiny" preset, H C O Cu), written through the ``est export`` command line (so its success path
  is tested by every test that uses it), about a minute and a half on two cores; the session's
  ``tiny_package64`` (tests/conftest.py), which the LAMMPS tests share;
* ``traced32``: the shipped potential's float32 function traced (the graph AOTInductor compiles)
  and run by a DeployedPotential without compiling, against ``ESTCalculator()``.

Compiling the shipped potential itself takes about three minutes: test_shipped_package.py, run
with ``EST_TEST_SHIPPED_EXPORT=1``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from deploy_cases import POTENTIAL


@pytest.fixture(scope="session")
def tiny(make_potential):
    """The potential of ``package64`` (float64, eval mode; do not modify)."""
    return make_potential("so2", n_layers=1)


@pytest.fixture(scope="session")
def package64(tiny_package64):
    """The package of ``tiny``."""
    return tiny_package64[1]


@pytest.fixture(scope="session")
def traced32():
    from est_calc.deploy import DeployedPotential
    from est_calc.deploy.export import prepare, sample_inputs, trace
    from est_calc.potential import load_potential

    function, metadata = prepare(load_potential(POTENTIAL), torch.float32, "cpu", POTENTIAL)
    inputs = sample_inputs(function.species, function.cutoff_A, dtype=torch.float32)
    return DeployedPotential(Path("traced32.pt2"), trace(function, inputs).module(), metadata)
