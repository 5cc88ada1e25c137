"""Verlet skin: the stored-and-filtered pair list equals a fresh build at every step, and MD with a
skin follows exactly the trajectory of MD that rebuilds the list every step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import units
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc111
from ase.md.verlet import VelocityVerlet

from est_calc.batch import AtomsBatch
from est_calc.calculator import ESTCalculator
from est_calc.neighbors import build_graph
from est_calc.neighbors.verlet import VerletNeighborList


def _pair_set(graph):
    rows = torch.cat([graph.edge_index.t(), graph.shifts], dim=1).tolist()
    return sorted(map(tuple, rows))


def test_filtered_list_equals_fresh_build_along_a_random_walk():
    atoms = bulk("Cu", "fcc", a=3.6).repeat((3, 3, 3))
    rng = np.random.default_rng(0)
    nl = VerletNeighborList(3.0, skin_A=0.8, backend="torch")
    for step in range(40):
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        batch = AtomsBatch.from_atoms(atoms, dtype=torch.float64)
        got = nl(batch)
        ref = build_graph(batch, 3.0, backend="torch")
        assert _pair_set(got) == _pair_set(ref), f"pair sets differ at step {step}"
    # Random-walk steps of ~0.09 Å per atom: several rebuilds, but far fewer than calls.
    assert 1 < nl.n_builds < nl.n_calls == 40


def test_rebuilds_on_cell_numbers_and_large_moves():
    atoms = bulk("Cu", "fcc", a=3.6).repeat((2, 2, 2))
    nl = VerletNeighborList(3.0, skin_A=1.0, backend="torch")
    nl(AtomsBatch.from_atoms(atoms))
    nl(AtomsBatch.from_atoms(atoms))
    assert nl.n_builds == 1
    strained = atoms.copy()
    strained.set_cell(atoms.cell * 1.001, scale_atoms=True)
    nl(AtomsBatch.from_atoms(strained))
    assert nl.n_builds == 2  # any cell change rebuilds
    moved = strained.copy()
    moved.positions[0] += [0.6, 0.0, 0.0]  # more than skin / 2
    got = nl(AtomsBatch.from_atoms(moved))
    assert nl.n_builds == 3
    assert _pair_set(got) == _pair_set(build_graph(AtomsBatch.from_atoms(moved), 3.0))
    swapped = moved.copy()
    swapped.numbers[0] = 28
    nl(AtomsBatch.from_atoms(swapped))
    assert nl.n_builds == 4


@pytest.mark.parametrize("kwargs, match", [
    (dict(cutoff_A=-1.0), "cutoff_A"),
    (dict(cutoff_A=3.0, skin_A=-0.1), "skin_A"),
    (dict(cutoff_A=3.0, skin_A=float("nan")), "skin_A"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VerletNeighborList(**kwargs)


def test_calculator_rejects_negative_skin(make_potential):
    with pytest.raises(ValueError, match="skin"):
        ESTCalculator(make_potential(), dtype="float64", skin=-1.0)


def test_md_with_skin_follows_the_rebuild_every_step_trajectory(make_potential):
    """Same start, same integrator: positions agree to float64 round-off after 150 steps, while
    the skinned calculator rebuilt its list only a few times."""
    pot = make_potential(seed=3)
    slab = fcc111("Cu", (2, 2, 3), vacuum=5.0)
    add_adsorbate(slab, Atoms("CO", positions=[(0, 0, 0), (0, 0, 1.15)]), 1.9, "ontop")  # C down
    rng = np.random.default_rng(1)
    masses = slab.get_masses()[:, None]
    slab.set_momenta(rng.normal(size=(len(slab), 3)) * np.sqrt(masses * units.kB * 600))
    runs = {}
    for skin in (0.0, 0.6):
        atoms = slab.copy()
        atoms.set_momenta(slab.get_momenta())
        calc = ESTCalculator(pot, dtype="float64", skin=skin)
        atoms.calc = calc
        VelocityVerlet(atoms, timestep=1.0 * units.fs).run(150)
        runs[skin] = (atoms.get_positions(), atoms.get_forces(), calc)
    pos0, f0, _ = runs[0.0]
    pos1, f1, calc1 = runs[0.6]
    np.testing.assert_allclose(pos1, pos0, rtol=0, atol=1e-9)
    np.testing.assert_allclose(f1, f0, rtol=0, atol=1e-8)
    assert calc1.neighbor_list.n_builds < calc1.neighbor_list.n_calls / 5


def test_batched_relaxation_with_skin_follows_the_rebuild_every_step_path(torch_device):
    """relax_many through calculate_batch's own Verlet list: the same FIRE path (steps, energies,
    positions to float64 round-off) as rebuilding the batch graph every step, with fewer builds,
    also when structures leave the active set (converged at step 0 and 16, the last at 25)."""
    import warnings

    from est_calc.model import ModelConfig
    from est_calc.potential import Potential
    from md_recipes import relax_many

    torch.manual_seed(5)
    pot = Potential.from_config(ModelConfig.preset("tiny"), species=[1, 6, 8, 29]).double().eval()
    pot.model.energy_scale.fill_(20.0)  # forces of order 0.3 eV/Å: the relaxations move
    starts = []
    for k, ads in enumerate(("O", "CO", "H")):
        slab = fcc111("Cu", (2, 2, 2), vacuum=5.0)
        add_adsorbate(slab, Atoms("CO", positions=[(0, 0, 0), (0, 0, 1.15)]) if ads == "CO" else ads, 1.8, "ontop")
        slab.pbc = True
        slab.rattle(0.05, seed=k)
        starts.append(slab)
    runs = {}
    for skin in (0.0, 1.0):
        calc = ESTCalculator(pot, device=torch_device, dtype="float64", skin=skin)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the third structure stops at the step limit
            runs[skin] = (relax_many(starts, calc, fmax_eV_per_A=0.3, max_steps=25), calc)
    (ref, _), (got, calc) = runs[0.0], runs[1.0]
    assert len({r.steps for r in ref}) == 3  # the active set shrinks twice
    for a, b in zip(ref, got):
        assert a.steps == b.steps and a.converged == b.converged
        np.testing.assert_allclose(b.energies, a.energies, rtol=0, atol=1e-9)
        np.testing.assert_allclose(b.atoms.positions, a.atoms.positions, rtol=0, atol=1e-9)
    nl = calc.batch_neighbor_list
    assert nl.n_calls == calc.n_model_calls
    assert 2 < nl.n_builds < nl.n_calls / 2
    assert calc.neighbor_list.n_calls == 0  # the single-structure list is not involved
