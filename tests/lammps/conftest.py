"""What the LAMMPS tests share, made once per session: the plugin (built with cmake as
`make lammps` builds it, or reused when up to date) and a float64 package of the one-layer
"tiny" potential (``est export``, about a minute of compiling on two cores)."""

from __future__ import annotations

import subprocess

import pytest
from lammps_cases import build_plugin, missing_tools


@pytest.fixture(scope="session")
def plugin():
    why = missing_tools()
    if why:
        pytest.skip(why)
    try:
        return build_plugin()
    except subprocess.CalledProcessError as err:
        pytest.fail(f"building the LAMMPS plugin failed:\n{err.stdout[-3000:]}\n{err.stderr[-3000:]}")


@pytest.fixture(scope="session")
def package(plugin, make_potential, tmp_path_factory):
    """A float64 package of an untrained one-layer so2 potential (H C O Cu), cutoff 4 Å.

    EST_TEST_LAMMPS_PACKAGE=path reuses a package exported the same way (for working on the
    plugin); by default it is exported afresh."""
    import os
    from pathlib import Path

    if os.environ.get("EST_TEST_LAMMPS_PACKAGE"):
        return Path(os.environ["EST_TEST_LAMMPS_PACKAGE"])
    from est_calc.cli import main
    from est_calc.potential import save_potential

    folder = tmp_path_factory.mktemp("lammps_package")
    source = save_potential(make_potential("so2", n_layers=1), folder / "tiny.pt")
    path = folder / "tiny64.pt2"
    assert main(["export", str(source), "-o", str(path), "--dtype", "float64"]) == 0
    return path
