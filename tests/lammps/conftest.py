"""What the LAMMPS tests share, made once per session: the plugin (the ``plugin`` fixture of
tests/conftest.py, built with cmake as `make lammps` builds it) and a float64 package of the one-layer
"tiny" potential (``est export``, about a minute of compiling on two cores, made once per session
for these tests and tests/deploy)."""

from __future__ import annotations

import pytest


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
