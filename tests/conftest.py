"""Shared fixtures: a float64 tiny potential factory and a few small structures.

Structures are returned as fresh ``ase.Atoms`` so tests may modify them freely.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

import numpy as np
import pytest
import torch

SPECIES = (1, 6, 8, 29)  # H, C, O, Cu: what the fixtures below contain

_HAS_SO2 = (Path(__file__).resolve().parent.parent / "est_calc" / "nn" / "message_so2.py").exists()
MESSAGES = [
    "est",
    pytest.param(
        "so2",
        marks=pytest.mark.skipif(not _HAS_SO2, reason="est_calc/nn/message_so2.py is absent"),
    ),
]


def _randomize_zero_parameters(module: torch.nn.Module, generator: torch.Generator) -> None:
    # Untrained models may start with zero output layers (energy identically zero), which would
    # make every physics test pass vacuously. Give such parameters small random values.
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point() and bool((p == 0).all()):
                p.copy_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))


@contextlib.contextmanager
def shared_folder(tmp_path_factory, name: str):
    """A folder that every worker of one test run sees (``make test`` runs pytest-xdist
    workers), held under an exclusive lock while the block runs: a session fixture that makes
    something expensive makes it there once, and the other workers wait, then reuse it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    folder = root / f"shared-{name}"
    folder.mkdir(exist_ok=True)
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield folder
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu,
               pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
    ),
]


@pytest.fixture(params=DEVICES)
def torch_device(request) -> torch.device:
    """The CPU, and the CUDA device where one is present: a test of a fast path that takes this
    fixture runs on the GPU in the device session too (``pytest -m gpu``)."""
    return torch.device(request.param)


@pytest.fixture(params=MESSAGES)
def message(request) -> str:
    """Each message block of the model ("est", and "so2" where it exists)."""
    return request.param


@pytest.fixture(scope="session")
def make_potential():
    """Factory ``make_potential(message="est", seed=0, dtype=torch.float64, **overrides)``.

    Returns an untrained ``Potential`` built from the "tiny" preset in eval mode, with non-zero
    per-element reference energies. Cached per arguments: do not modify the returned object.
    """
    from est_calc.model import ModelConfig
    from est_calc.potential import Potential

    cache = {}

    def factory(message="est", seed=0, dtype=torch.float64, **overrides):
        key = (message, seed, dtype, tuple(sorted(overrides.items())))
        if key not in cache:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                config = ModelConfig.preset("tiny", message=message, **overrides)
                pot = Potential.from_config(config, species=SPECIES)
            gen = torch.Generator().manual_seed(seed + 1)
            _randomize_zero_parameters(pot, gen)
            with torch.no_grad():
                ref = pot.model.element_reference
                ref[list(SPECIES)] = -torch.rand(len(SPECIES), generator=gen, dtype=ref.dtype)
            cache[key] = pot.to(dtype).eval()
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def tiny_package64(make_potential, tmp_path_factory):
    """(source .pt, package .pt2) of ``make_potential("so2", n_layers=1)`` (the one-layer "tiny"
    potential, H C O Cu, cutoff 4 Å) exported in float64 through the ``est export`` command line,
    once per session: tests/deploy, tests/lammps and tests/benchmarks/test_lammps_bench.py all
    use it (an export compiles for about a minute; made once per run, whatever the number of
    pytest-xdist workers). Read-only: copy it to change it."""
    from est_calc.cli import main
    from est_calc.potential import save_potential

    with shared_folder(tmp_path_factory, "tiny_package64") as folder:
        source, path = folder / "tiny.pt", folder / "tiny64.pt2"
        if not path.is_file():  # another worker's (est export writes the file atomically)
            save_potential(make_potential("so2", n_layers=1), source)
            assert main(["export", str(source), "-o", str(path), "--dtype", "float64"]) == 0
    return source, path


@pytest.fixture(scope="session")
def plugin(tmp_path_factory):
    """The LAMMPS plugin (est_lammps/), built with cmake as `make lammps` builds it, or reused
    when up to date; once per session for tests/lammps and tests/benchmarks/test_lammps_bench.py.
    Skips, saying why, where a tool is missing; a failed build fails with cmake's output."""
    import subprocess
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent / "lammps"))
    from lammps_cases import build_plugin, missing_tools

    why = missing_tools()
    if why:
        pytest.skip(why)
    try:
        with shared_folder(tmp_path_factory, "lammps-plugin"):  # one cmake build at a time
            return build_plugin()
    except subprocess.CalledProcessError as err:
        pytest.fail(f"building the LAMMPS plugin failed:\n{err.stdout[-3000:]}\n{err.stderr[-3000:]}")


@pytest.fixture
def cu_slab_co():
    """Rattled Cu(111) 2x2x2 slab, C-down CO on top and an H adatom (11 atoms: Cu8 C O H);
    pbc (T, T, F), 12 Å vacuum."""
    from ase import Atoms
    from ase.build import add_adsorbate, fcc111

    slab = fcc111("Cu", size=(2, 2, 2), vacuum=6.0)  # atom 4 is the top-layer atom under CO
    add_adsorbate(slab, Atoms("CO", positions=[[0, 0, 0], [0, 0, 1.15]]), 1.9, "ontop")
    add_adsorbate(slab, "H", 1.0, "fcc")
    slab.rattle(0.05, seed=1)
    return slab


@pytest.fixture
def triclinic_bulk():
    """Strained, rattled triclinic Cu cell (4 atoms, one C substituted); pbc (T, T, T)."""
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.6).repeat((2, 2, 1))
    rng = np.random.default_rng(2)
    strain = np.eye(3) + 0.04 * rng.standard_normal((3, 3))
    atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
    atoms.numbers[1] = 6
    atoms.rattle(0.05, seed=3)
    return atoms
