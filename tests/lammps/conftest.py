"""What the LAMMPS tests share, made once per session: the plugin (built with cmake as
`make lammps` builds it, or reused when up to date) and a float64 package of the one-layer
"tiny" potential (``est export``, about a minute of compiling on two cores, made once per session
for these tests and tests/deploy)."""

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
def package(plugin, request):
    """A float64 package of an untrained one-layer so2 potential (H C O Cu), cutoff 4 Å: the
    session's ``tiny_package64`` (tests/conftest.py, shared with tests/deploy).

    EST_TEST_LAMMPS_PACKAGE=path reuses a package exported the same way (for working on the
    plugin) instead."""
    import os
    from pathlib import Path

    if os.environ.get("EST_TEST_LAMMPS_PACKAGE"):
        return Path(os.environ["EST_TEST_LAMMPS_PACKAGE"])
    return request.getfixturevalue("tiny_package64")[1]
