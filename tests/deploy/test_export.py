"""An exported package equals the eager potential: through the calculator (ASE's unit shifts) and
called directly with ghost atoms (LAMMPS's real positions and zero shifts); float64 compiled,
float32 traced (the graph AOTInductor compiles) for the shipped potential.

The package is compiled once per session (tests/deploy/conftest.py); the module is slow.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from deploy_cases import POTENTIAL, ghost_inputs, structures

from est_calc.calculator import ESTCalculator
from est_calc.deploy import load_package, read_metadata

pytestmark = pytest.mark.slow

STRUCTURES = structures()
#: float64: the package (plain blocks, traced and compiled) against the calculator's accelerated
#: eager model: both exact to round-off.
TOL64 = {"rtol": 1e-10, "atol": 1e-10}


def _props(atoms: Atoms) -> list[str]:
    return ["energy", "energies", "forces"] + (["stress"] if atoms.pbc.any() else [])


@pytest.fixture(scope="module")
def eager64(tiny):
    return ESTCalculator(tiny, dtype="float64", device="cpu")


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_float64_package_equals_eager(package64, eager64, name):
    atoms = STRUCTURES[name]
    props = _props(atoms)
    deployed = ESTCalculator(model=str(package64), dtype="float64")
    eager64.calculate(atoms.copy(), props)
    deployed.calculate(atoms.copy(), props)
    for key in props:
        np.testing.assert_allclose(deployed.results[key], eager64.results[key], err_msg=key,
                                   **TOL64)


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_float32_function_equals_default_calculator(traced32, name):
    """The shipped potential's float32 function, traced, run through ESTCalculator, gives what
    ESTCalculator() gives to float32 round-off: its deviation from the float64 reference is of
    the size of the eager float32 one."""
    atoms = STRUCTURES[name]
    props = _props(atoms)
    calcs = {"traced": ESTCalculator(model=traced32), "eager32": ESTCalculator(device="cpu"),
             "eager64": ESTCalculator(POTENTIAL, dtype="float64", device="cpu")}
    for calc in calcs.values():
        calc.calculate(atoms.copy(), props)
    for key in props:
        ref = calcs["eager64"].results[key]
        scale = max(1.0, float(np.abs(ref).max()))
        err_eager = float(np.abs(calcs["eager32"].results[key] - ref).max()) / scale
        err_traced = float(np.abs(calcs["traced"].results[key] - ref).max()) / scale
        assert err_traced <= max(4 * err_eager, 2e-6), (key, err_traced, err_eager)


def test_batch_of_mixed_structures(package64, eager64):
    """calculate_batch: energies and virials summed per structure from the per-atom outputs."""
    batch = list(STRUCTURES.values())
    deployed = ESTCalculator(model=str(package64), dtype="float64")
    got = deployed.calculate_batch(batch, ["energy", "forces", "stress"])
    want = eager64.calculate_batch(batch, ["energy", "forces", "stress"])
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for key in w:
            np.testing.assert_allclose(g[key], w[key], err_msg=key, **TOL64)


def test_atoms_without_neighbours(package64, eager64):
    """No edge at all (E = 0): reference energies and zero forces, as the eager model gives."""
    lone = Atoms("CuO", positions=[[0, 0, 0], [9, 0, 0]], cell=[20, 20, 20], pbc=True)
    deployed = ESTCalculator(model=str(package64), dtype="float64")
    deployed.calculate(lone, ["energy", "forces", "stress"])
    eager64.calculate(lone, ["energy", "forces", "stress"])
    assert np.all(deployed.results["forces"] == 0)
    for key in ("energy", "energies", "stress"):
        np.testing.assert_allclose(deployed.results[key], eager64.results[key], err_msg=key,
                                   **TOL64)


@pytest.mark.parametrize("name, skin", [("triclinic", 0.0), ("slab", 1.0)])
def test_ghost_atoms_with_zero_shifts(package64, eager64, name, skin):
    """The package called as the LAMMPS plugin will: local atoms first, ghost atoms out to
    (n_layers + 1) x cutoff with their own edges, zero shifts, energy over the local atoms only;
    ghost forces summed onto their owners (LAMMPS's reverse communication) give the periodic
    forces, and the virial is the periodic one. Edges beyond the cutoff (a neighbour list with
    a skin) change nothing."""
    atoms = STRUCTURES[name]
    pot = load_package(package64)
    meta = read_metadata(package64)
    cutoff, reach = float(meta["cutoff_A"]), float(meta["interaction_range_A"])
    assert reach == pytest.approx((int(meta["n_layers"]) + 1) * cutoff)
    pos, numbers, edge_index, owner = ghost_inputs(atoms, reach, cutoff, skin)
    n = len(atoms)
    assert len(pos) > 5 * n
    mask = np.arange(len(pos)) < n
    out = pot(torch.tensor(pos), torch.tensor(numbers), torch.tensor(edge_index),
              torch.zeros(edge_index.shape[1], 3, dtype=torch.float64), torch.tensor(mask))
    energy, energies, forces, virial, atom_virial = (t.numpy() for t in out)
    np.testing.assert_allclose(atom_virial.sum(0), virial, rtol=1e-12, atol=1e-12)

    eager64.calculate(atoms.copy(), ["energy", "energies", "forces", "stress"])
    want = eager64.results
    folded = np.zeros((n, 3))
    np.add.at(folded, owner, forces)
    stress = np.zeros((3, 3))
    v = want["stress"]
    stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]] = v
    stress[[1, 2, 2], [0, 0, 1]] = v[[5, 4, 3]]
    np.testing.assert_allclose(energy, want["energy"], **TOL64)
    np.testing.assert_allclose(energies[:n], want["energies"], **TOL64)
    np.testing.assert_allclose(folded, want["forces"], **TOL64)
    np.testing.assert_allclose(virial, -atoms.get_volume() * stress, **TOL64)


def test_package_metadata(package64, tiny):
    import est_calc

    meta = read_metadata(package64)
    assert meta["est_format"] == "est_calc.deploy" and meta["est_format_version"] == "2"
    assert meta["dtype"] == "float64" and meta["device"] == "cpu"
    assert meta["est_calc_version"] == est_calc.__version__
    assert meta["torch_version"] == torch.__version__
    assert meta["symbols"] == "H C O Cu" and meta["species"] == "1 6 8 29"
    assert float(meta["cutoff_A"]) == tiny.cutoff_A and meta["n_layers"] == "1"
    assert meta["inputs"].split() == ["positions", "atomic_numbers", "edge_index",
                                      "edge_shifts", "local_mask"]
    assert meta["outputs"].split() == ["energy", "energies", "forces", "virial", "atom_virial"]
    assert meta["source"].endswith("tiny.pt")
    # What the C++ loader reads (AOTIModelPackageLoader::get_metadata) is the same map.
    runner = torch._inductor.aoti_load_package(str(package64))
    assert {k: v for k, v in runner.get_metadata().items() if k in meta} == meta


def test_dispersion_added_to_a_package(package64, tiny):
    """An extra energy term (DFT-D3) is differentiated by autograd and added to the package's
    own derivatives: the same numbers as the eager potential with the term in its pass."""
    atoms = STRUCTURES["slab"]
    props = ["energy", "energies", "forces", "stress"]
    kw = {"dtype": "float64", "device": "cpu", "dispersion": "d3bj", "functional": "pbe"}
    deployed, eager = ESTCalculator(model=str(package64), **kw), ESTCalculator(tiny, **kw)
    for calc in (deployed, eager):
        calc.calculate(atoms.copy(), props)
    for key in props:
        np.testing.assert_allclose(deployed.results[key], eager.results[key], err_msg=key,
                                   **TOL64)
