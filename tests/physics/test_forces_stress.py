"""Forces and stress are the exact derivatives of the energy (central finite differences)."""

from __future__ import annotations

import pytest
import torch

from est_calc.batch import AtomsBatch
from est_calc.forces import energy_forces_stress
from est_calc.testing import check_forces_fd, check_stress_fd, predict


@pytest.fixture
def pot(make_potential, message):
    return make_potential(message)


def test_forces_are_not_trivial(pot, cu_slab_co):
    # Guards every other test here against an energy that does not depend on positions.
    out = predict(pot, AtomsBatch.from_atoms(cu_slab_co))
    assert torch.isfinite(out.forces).all()
    assert out.forces.abs().max() > 1e-4
    assert torch.allclose(out.energies.sum(), out.energy[0])


def test_forces_match_finite_differences_slab(pot, cu_slab_co):
    n = len(cu_slab_co)
    # C and O of the adsorbate and the Cu atom under it (all atoms: the slow test below).
    err = check_forces_fd(pot, cu_slab_co, h_A=1e-5, atom_indices=[4, n - 3, n - 2])
    assert err <= 1e-6


@pytest.mark.slow
def test_forces_match_finite_differences_all_atoms(pot, cu_slab_co, triclinic_bulk):
    assert check_forces_fd(pot, cu_slab_co, h_A=1e-5) <= 1e-6
    assert check_forces_fd(pot, triclinic_bulk, h_A=1e-5) <= 1e-6


def test_stress_matches_strain_finite_differences_triclinic(pot, triclinic_bulk):
    assert check_stress_fd(pot, triclinic_bulk, h=1e-5) <= 1e-6


def test_stress_matches_strain_finite_differences_mixed_pbc_slab(pot, cu_slab_co):
    assert tuple(cu_slab_co.pbc) == (True, True, False)
    assert check_stress_fd(pot, cu_slab_co, h=1e-5) <= 1e-6


def test_stress_is_symmetric_and_batched(pot, triclinic_bulk, cu_slab_co):
    batch = AtomsBatch.from_atoms([triclinic_bulk, cu_slab_co])
    out = predict(pot, batch, compute_stress=True)
    assert out.stress.shape == (2, 3, 3)
    assert torch.allclose(out.stress, out.stress.transpose(1, 2), atol=1e-14, rtol=0)
    assert out.stress.abs().max() > 1e-6


def test_caller_batch_has_no_grad_side_effects(pot, triclinic_bulk):
    from est_calc.testing import _default_graph_fn

    batch = AtomsBatch.from_atoms(triclinic_bulk)
    graph = _default_graph_fn(pot)(batch)
    pos_before = batch.positions.clone()
    out = energy_forces_stress(pot, batch, graph, compute_stress=True)
    assert not batch.positions.requires_grad and batch.positions.grad is None
    assert not batch.cell.requires_grad
    assert torch.equal(batch.positions, pos_before)
    # Without create_graph the outputs are plain tensors, with no graph kept alive.
    for t in (out.energy, out.energies, out.forces, out.stress):
        assert not t.requires_grad
    # Works under no_grad too (the calculator's inference path).
    with torch.no_grad():
        again = energy_forces_stress(pot, batch, graph, compute_stress=True)
    assert torch.equal(again.forces, out.forces)


def test_energy_only_skips_derivatives(pot, triclinic_bulk):
    out = predict(pot, AtomsBatch.from_atoms(triclinic_bulk), compute_forces=False)
    assert out.forces is None and out.stress is None


def test_create_graph_allows_force_training(pot, cu_slab_co):
    from est_calc.testing import _default_graph_fn

    batch = AtomsBatch.from_atoms(cu_slab_co)
    graph = _default_graph_fn(pot)(batch)
    out = energy_forces_stress(pot, batch, graph, compute_stress=True, create_graph=True)
    loss = out.forces.square().sum() + out.stress.square().sum() + out.energy.sum()
    params = [p for p in pot.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    assert any(g is not None and g.abs().max() > 0 for g in grads)


def test_stress_of_zero_volume_cell_is_refused(pot):
    from ase import Atoms

    molecule = Atoms("CO", positions=[[0, 0, 0], [0, 0, 1.13]])  # no cell at all
    batch = AtomsBatch.from_atoms(molecule)
    assert predict(pot, batch).forces.shape == (2, 3)  # forces are fine
    with pytest.raises(ValueError, match="zero"):
        predict(pot, batch, compute_stress=True)


def test_structures_without_edges_get_zero_forces_and_stress():
    """An energy that depends on nothing (no neighbours anywhere) has zero derivatives."""
    import torch
    from ase import Atoms

    from est_calc.batch import AtomsBatch
    from est_calc.forces import energy_forces_stress
    from est_calc.neighbors import build_graph
    from est_calc.potential import Potential

    pot = Potential.from_config("tiny", species=[29]).to(torch.float64)
    atoms = Atoms("Cu2", positions=[(0, 0, 0), (9, 9, 9)], cell=[20, 20, 20], pbc=True)
    batch = AtomsBatch.from_atoms(atoms)
    graph = build_graph(batch, pot.cutoff_A)
    assert graph.n_edges == 0
    pred = energy_forces_stress(pot, batch, graph, compute_stress=True)
    assert torch.equal(pred.forces, torch.zeros_like(batch.positions))
    assert torch.equal(pred.stress, torch.zeros(1, 3, 3, dtype=torch.float64))
