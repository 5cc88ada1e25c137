"""compile=True (torch.compile of the network) gives the eager model's energy, forces and stress.

Compiling takes a while on CPU (tens of seconds for the tiny preset), so one compiled calculator
serves every check of the module, and the whole module is marked slow (it runs in CI all the same).
"""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms

from est_calc.calculator import ESTCalculator

pytestmark = pytest.mark.slow

PROPS = ["energy", "forces", "stress"]


@pytest.fixture(scope="module")
def pair(make_potential):
    pot = make_potential(message="so2", n_layers=2)
    return ESTCalculator(pot, dtype="float64"), ESTCalculator(pot, dtype="float64", compile=True), pot


def _compare(eager, compiled, atoms, props=PROPS):
    eager.calculate(atoms, props)
    compiled.calculate(atoms, props)
    for key in props:
        np.testing.assert_allclose(compiled.results[key], eager.results[key], rtol=1e-10,
                                   atol=1e-10, err_msg=key)


def test_compiled_equals_eager_across_sizes_and_edge_counts(pair, cu_slab_co, triclinic_bulk):
    eager, compiled, pot = pair
    assert compiled.potential.model.is_compiled
    assert not pot.model.is_compiled  # the caller's potential is left as it was
    vacuum_slab = cu_slab_co.copy()
    vacuum_slab.cell[2, 2] += 1.0  # stress of a slab needs the full cell; pbc stays (T, T, F)
    _compare(eager, compiled, vacuum_slab)
    _compare(eager, compiled, triclinic_bulk)
    # Other atom and edge counts run through the same dynamic-shape graph, not only the first.
    bigger = triclinic_bulk.repeat((2, 1, 1))
    bigger.rattle(0.1, seed=7)
    _compare(eager, compiled, bigger)
    moved = cu_slab_co.copy()
    moved.positions[-1, 2] += 0.7  # the H adatom loses and gains neighbours
    _compare(eager, compiled, moved, ["energy", "forces"])


def test_compiled_batch_and_isolated_atoms(pair, cu_slab_co, triclinic_bulk):
    eager, compiled, _ = pair
    lone = Atoms("CuO", positions=[[0, 0, 0], [20, 0, 0]], cell=[40, 40, 40], pbc=False)
    structures = [cu_slab_co, triclinic_bulk, lone]
    ref = eager.calculate_batch(structures, ["energy", "forces"])
    got = compiled.calculate_batch(structures, ["energy", "forces"])
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g["energy"], r["energy"], rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(g["forces"], r["forces"], rtol=1e-10, atol=1e-10)
    # Atoms without any neighbour: reference energies, zero forces, on the compiled path too.
    compiled.calculate(lone, ["energy", "forces"])
    assert np.all(compiled.results["forces"] == 0)
    eager.calculate(lone, ["energy"])
    assert compiled.results["energy"] == pytest.approx(eager.results["energy"], abs=1e-12)


def test_compiled_calculator_rejects_bad_elements(pair):
    _, compiled, _ = pair
    atoms = Atoms("CuU", positions=[[0, 0, 0], [2.0, 0, 0]], cell=[10, 10, 10], pbc=True)
    with pytest.raises(ValueError, match="U"):
        compiled.calculate(atoms, ["energy"])


def test_training_mode_and_low_memory_keep_the_eager_path(make_potential, cu_slab_co):
    """Second derivatives (force training) and activation checkpointing never reach the compiled
    graph: enable_compile() only serves eval-mode calls without checkpointing."""
    import copy

    import torch

    from est_calc.batch import AtomsBatch
    from est_calc.forces import energy_forces_stress
    from est_calc.neighbors import build_graph

    pot = copy.deepcopy(make_potential(message="so2", n_layers=2))
    pot.model.enable_compile()

    def refuse(*args, **kwargs):
        raise AssertionError("the compiled path was used")

    pot.model._compiled_network = refuse
    batch = AtomsBatch.from_atoms([cu_slab_co], dtype=torch.float64)
    graph = build_graph(batch, pot.cutoff_A)
    pot.train()
    with pot.model.fixed_grid():
        pred = energy_forces_stress(pot, batch, graph, create_graph=True)
    (pred.forces ** 2).sum().backward()  # double backward through the eager model
    assert any(p.grad is not None for p in pot.parameters())
    pot.eval()
    calc = ESTCalculator(pot, dtype="float64", low_memory=True)
    calc.potential.model._compiled_network = refuse
    calc.calculate(cu_slab_co, ["energy", "forces"])
    with pytest.raises(AssertionError, match="compiled path"):
        energy_forces_stress(pot, batch, graph)  # eval mode without checkpointing: compiled
