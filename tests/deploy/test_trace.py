"""The exported function before compiling: it equals the eager potential (energies, forces, stress
through its edge virial), and its traced graph keeps the atom and edge counts symbolic (other
sizes than the traced sample give the eager numbers), for both message blocks."""

from __future__ import annotations

import pytest
import torch

from est_calc.batch import AtomsBatch
from est_calc.deploy import EdgeEnergyModel
from est_calc.deploy.export import _plain_model, sample_inputs, trace
from est_calc.neighbors import build_graph
from est_calc.neighbors.pairing import one_direction
from est_calc.testing import predict


@pytest.fixture(params=[{}, {"layer_readouts": True}], ids=["plain", "layer-readouts"])
def function(make_potential, message, request):
    pot = make_potential(message, n_layers=2, **request.param)
    return pot, EdgeEnergyModel(_plain_model(pot, torch.float64, torch.device("cpu")),
                                pot.species)


def test_function_equals_eager_potential(function, cu_slab_co, triclinic_bulk):
    pot, f = function
    slab = cu_slab_co.copy()
    slab.cell[2, 2] += 1.0  # a full cell, for the stress
    for atoms in (slab, triclinic_bulk):
        batch = AtomsBatch.from_atoms(atoms)
        graph = build_graph(batch, pot.cutoff_A)
        want = predict(pot, batch, compute_stress=True)
        # One edge per pair, in the order of the unpaired list (the package adds the reverse).
        pairs, unit = one_direction(graph.edge_index, graph.shifts)
        assert 2 * pairs.shape[1] == graph.n_edges
        i = pairs[0]
        shifts = torch.einsum("ea,eab->eb", unit.double(), batch.cell[batch.system_idx[i]])
        mask = torch.ones(batch.n_atoms, dtype=torch.bool)
        energy, energies, forces, virial, atom_virial = f(batch.positions, batch.atomic_numbers,
                                                          pairs, shifts, mask)
        volume = abs(float(torch.linalg.det(batch.cell[0])))
        torch.testing.assert_close(energy, want.energy[0], rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(energies, want.energies, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(forces, want.forces, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(-virial / volume, want.stress[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(atom_virial.sum(0), virial, rtol=1e-12, atol=1e-12)
        # Local atoms only: the masked energy is the sum over them.
        mask[::2] = False
        part = f(batch.positions, batch.atomic_numbers, pairs, shifts, mask)[0]
        torch.testing.assert_close(part, want.energies[1::2].sum(), rtol=1e-12, atol=1e-10)


@pytest.mark.slow
def test_traced_graph_has_dynamic_sizes(make_potential):
    """The "est" message block (the compiled package of conftest.py covers "so2")."""
    pot = make_potential("est", n_layers=2)
    f = EdgeEnergyModel(_plain_model(pot, torch.float64, torch.device("cpu")), pot.species)
    inputs = sample_inputs(f.species, f.cutoff_A, dtype=torch.float64)
    program = trace(f, inputs)
    run = program.module()
    for shape, seed in (((4, 3, 2), 1), ((2, 2, 2), 2), ((5, 1, 1), 3)):
        other = sample_inputs(f.species, f.cutoff_A, shape=shape, dtype=torch.float64, seed=seed)
        assert other[0].shape[0] != inputs[0].shape[0]
        for got, want in zip(run(*other), f(*other)):
            torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)
