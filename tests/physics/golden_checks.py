"""Checks shared by the golden tests of the shipped potentials (test_default_potential.py,
test_3bpa_potential.py): the file is the pinned one, and its values are the pinned values."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_pinned_file(path: Path, golden: dict, test_file: Path, root: Path) -> None:
    """``path`` is the file ``golden`` names, under 20 MB, with the pinned sha256."""
    assert path.name == golden["file"]
    assert path.stat().st_size < 20 * 2**20, "a shipped potential must stay under 20 MB"
    assert sha256(path) == golden["sha256"], (
        f"{path} changed; if intended, rerun `python {Path(test_file).relative_to(root)} --write`")


def assert_golden_values(got: dict, golden: dict) -> None:
    """Energies and forces to 1e-6 (eV, eV/Å), stress to 1e-7 eV/Å^3 where pinned."""
    assert set(got) == set(golden["values"])
    for name, want in golden["values"].items():
        np.testing.assert_allclose(got[name]["energy"], want["energy"], rtol=0, atol=1e-6,
                                   err_msg=name)
        np.testing.assert_allclose(got[name]["forces"], want["forces"], rtol=0, atol=1e-6,
                                   err_msg=name)
        if "stress" in want:
            np.testing.assert_allclose(got[name]["stress"], want["stress"], rtol=0, atol=1e-7,
                                       err_msg=name)
