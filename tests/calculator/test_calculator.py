"""ESTCalculator behaviour: derivatives against finite differences, symmetries, ASE caching,
batching, loading, bad input and the ASE workflows (optimizers, cell filter, MD, file I/O).

Physics checks run on the untrained float64 "tiny" potential from ``tests/conftest.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc111, molecule
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress

from est_calc.calculator import DefaultPotentialMissing, ESTCalculator

# Rotation tolerance for the full-EST tiny preset: tests/physics measured relative errors of
# ~1e-2 (energy) and 0.05-0.07 (forces, stress) on its 30-point grid; ~4x that here.
ROT_TOL = {"energy": 0.05, "forces": 0.25, "stress": 0.25}


@pytest.fixture
def pot(make_potential):
    return make_potential("est")


@pytest.fixture
def calc(pot):
    return ESTCalculator(pot, device="cpu", dtype="float64")


def _slab_o():
    """Small rattled, fully periodic Cu(111) 2x2x1 slab with an O adatom (5 atoms)."""
    slab = fcc111("Cu", size=(2, 2, 1), vacuum=4.0)
    slab.pbc = True
    add_adsorbate(slab, "O", 1.4, "fcc")
    slab.rattle(0.05, seed=4)
    return slab


def _co():
    return Atoms("CO", positions=[[0, 0, 0], [0.1, 0.05, 1.15]])


# ----------------------------------------------------------------------- derivatives
@pytest.mark.slow
def test_forces_and_stress_match_finite_differences(calc, cu_slab_co, triclinic_bulk):
    slab = cu_slab_co
    slab.pbc = True
    for atoms, idx in ((slab, [4, 8, 9, 10]), (triclinic_bulk, [0, 1])):
        atoms.calc = calc
        forces = atoms.get_forces()
        stress = atoms.get_stress()
        assert np.abs(forces).max() > 1e-3  # not vacuous
        fd = calculate_numerical_forces(atoms, 1e-4, iatoms=idx)
        np.testing.assert_allclose(forces[idx], fd, atol=1e-6)
        fd_stress = calculate_numerical_stress(atoms, 1e-5)
        assert np.abs(stress).max() > 1e-5
        np.testing.assert_allclose(stress, fd_stress, atol=1e-6)


def test_forces_match_finite_differences_quick(calc):
    atoms = _slab_o()
    atoms.calc = calc
    forces = atoms.get_forces()
    fd = calculate_numerical_forces(atoms, 1e-4, iatoms=[4])
    assert np.abs(forces[4]).max() > 1e-3
    np.testing.assert_allclose(forces[4], fd[0], atol=1e-6)


def test_rotation_rotates_translation_changes_nothing(calc):
    atoms = _slab_o()
    atoms.calc = calc
    e0, f0, s0 = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress(voigt=False)

    rot = atoms.copy()
    rot.rotate(37.0, (1.0, 2.0, 0.5), rotate_cell=True)
    r = rot.cell.array.T @ np.linalg.inv(atoms.cell.array.T)  # positions' row form: x R^T
    assert np.allclose(r @ r.T, np.eye(3), atol=1e-10)
    rot.calc = calc
    e1, f1, s1 = rot.get_potential_energy(), rot.get_forces(), rot.get_stress(voigt=False)
    assert abs(e1 - e0) <= ROT_TOL["energy"] * abs(e0)
    assert np.abs(f1 - f0 @ r.T).max() <= ROT_TOL["forces"] * np.abs(f0).max()
    assert np.abs(s1 - r @ s0 @ r.T).max() <= ROT_TOL["stress"] * np.abs(s0).max()

    moved = atoms.copy()
    moved.translate([0.3, -1.7, 0.45])
    moved.calc = calc
    assert moved.get_potential_energy() == pytest.approx(e0, abs=1e-10)
    np.testing.assert_allclose(moved.get_forces(), f0, atol=1e-10)
    np.testing.assert_allclose(moved.get_stress(voigt=False), s0, atol=1e-10)


# ----------------------------------------------------------------------- caching
def test_caching_runs_model_only_when_needed(calc):
    """ASE's cache answers repeated questions; a fully periodic cell gets its stress from the
    forces' pass; a slab (pbc T, T, F) computes stress on request, in one more pass."""
    atoms = _slab_o()
    atoms.calc = calc
    atoms.get_forces()
    assert calc.n_model_calls == 1
    atoms.get_forces()
    atoms.get_potential_energy()
    atoms.get_potential_energies()
    atoms.get_stress()  # pbc all True: computed with the forces
    assert calc.n_model_calls == 1
    atoms.positions[0, 0] += 0.01
    atoms.get_forces()
    assert calc.n_model_calls == 2
    atoms.pbc = (True, True, False)
    atoms.get_forces()
    assert calc.n_model_calls == 3
    atoms.get_stress()  # not computed with the forces of a slab: one more pass
    assert calc.n_model_calls == 4
    atoms.get_stress()
    atoms.get_forces()
    assert calc.n_model_calls == 4


def test_results_are_consistent(calc):
    atoms = _slab_o()
    atoms.calc = calc
    energy = atoms.get_potential_energy()
    assert atoms.get_potential_energies().sum() == pytest.approx(energy, abs=1e-10)
    assert calc.results["free_energy"] == energy
    assert atoms.get_stress().shape == (6,)
    full = atoms.get_stress(voigt=False)
    np.testing.assert_allclose(full, full.T, atol=1e-12)
    # The model's stress is exactly symmetric, so ASE's Voigt form (which averages the
    # off-diagonal pairs) is its upper triangle, bit for bit.
    from est_calc.batch import AtomsBatch
    from est_calc.forces import energy_forces_stress
    from est_calc.neighbors import build_graph

    batch = AtomsBatch.from_atoms(atoms)
    graph = build_graph(batch, calc.cutoff_A, paired=True)
    raw = energy_forces_stress(calc.potential, batch, graph, compute_stress=True).stress[0]
    raw = raw.numpy()
    assert np.array_equal(raw, raw.T)
    np.testing.assert_allclose(atoms.get_stress(), raw[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]],
                               rtol=1e-12, atol=1e-15)


def test_stress_not_offered_for_molecules(calc):
    mol = _co()
    mol.calc = calc
    assert np.isfinite(mol.get_forces()).all()
    with pytest.raises(PropertyNotImplementedError):
        mol.get_stress()


# ----------------------------------------------------------------------- batching
def test_calculate_batch_equals_single_calls(calc):
    slab, mol, bulk_cu = _slab_o(), _co(), bulk("Cu", "fcc", a=3.7).repeat((1, 1, 2))
    bulk_cu.rattle(0.03, seed=7)
    structures = [mol, slab, bulk_cu]
    calls = calc.n_model_calls
    batch = calc.calculate_batch(structures, ["energy", "forces", "stress"])
    assert calc.n_model_calls == calls + 1
    assert "stress" not in batch[0]
    for atoms, res in zip(structures, batch):
        single = ESTCalculator(calc.potential, device="cpu", dtype="float64")
        atoms.calc = single
        assert res["energy"] == pytest.approx(atoms.get_potential_energy(), abs=1e-10)
        np.testing.assert_allclose(res["forces"], atoms.get_forces(), atol=1e-10)
        np.testing.assert_allclose(res["energies"], atoms.get_potential_energies(), atol=1e-10)
        if atoms.pbc.any():
            np.testing.assert_allclose(res["stress"], atoms.get_stress(), atol=1e-10)
    assert calc.calculate_batch([], ["energy"]) == []
    with pytest.raises(ValueError, match="magmoms"):
        calc.calculate_batch([mol], ["magmoms"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(pot):
    atoms = _slab_o()
    cpu = ESTCalculator(pot, device="cpu", dtype="float64")
    gpu = ESTCalculator(pot, device="auto", dtype="float64")
    assert gpu.device.type == "cuda"
    ref = cpu.calculate_batch([atoms, _co()], ["energy", "forces", "stress"])
    out = gpu.calculate_batch([atoms, _co()], ["energy", "forces", "stress"])
    for a, b in zip(ref, out):
        assert a["energy"] == pytest.approx(b["energy"], abs=1e-8)
        np.testing.assert_allclose(a["forces"], b["forces"], atol=1e-8)
    np.testing.assert_allclose(ref[0]["stress"], out[0]["stress"], atol=1e-8)


# ----------------------------------------------------------------------- loading
def test_default_missing_gives_clear_error(monkeypatch, tmp_path):
    import est_calc.potential as potential_mod

    monkeypatch.setattr(potential_mod, "potential_dirs", lambda: [tmp_path])
    with pytest.raises(DefaultPotentialMissing, match="no default potential") as info:
        ESTCalculator(device="cpu")
    assert isinstance(info.value, FileNotFoundError)
    # One clear message, no chained traceback of internal errors.
    err = info.value
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    with pytest.raises(FileNotFoundError, match="nonexistent"):
        ESTCalculator("nonexistent", device="cpu")


def test_path_loads_and_float32_agrees_with_float64(pot, tmp_path):
    from est_calc.potential import save_potential

    path = save_potential(pot, tmp_path / "tiny.pt")
    atoms = _slab_o()
    c64 = ESTCalculator(str(path), device="cpu", dtype="float64")
    c32 = ESTCalculator(path, device="cpu", dtype="float32")
    r64 = c64.calculate_batch([atoms], ["energy", "forces", "stress"])[0]
    r32 = c32.calculate_batch([atoms], ["energy", "forces", "stress"])[0]
    atoms.calc = ESTCalculator(pot, device="cpu", dtype="float64")
    assert r64["energy"] == pytest.approx(atoms.get_potential_energy(), abs=1e-12)
    assert r32["energy"] == pytest.approx(r64["energy"], rel=1e-5, abs=1e-5)
    np.testing.assert_allclose(r32["forces"], r64["forces"], atol=1e-4)
    np.testing.assert_allclose(r32["stress"], r64["stress"], atol=1e-5)
    assert pot.dtype == torch.float64  # the caller's potential was not converted in place
    assert c32.supported_elements() == ["H", "C", "O", "Cu"]


def test_bad_options(pot):
    with pytest.raises(ValueError, match="dtype"):
        ESTCalculator(pot, device="cpu", dtype="float16")
    with pytest.raises(ValueError, match="backend"):
        ESTCalculator(pot, device="cpu", neighbor_backend="nope")


# ----------------------------------------------------------------------- bad input
def test_bad_input_raises_clear_errors(calc):
    gold = Atoms("AuCu", positions=[[0, 0, 0], [0, 0, 2.5]])
    gold.calc = calc
    with pytest.raises(ValueError, match=r"Au.*supports H, C, O, Cu"):
        gold.get_potential_energy()

    nan = _co()
    nan.positions[1, 2] = np.nan
    nan.calc = calc
    with pytest.raises(ValueError, match="NaN or infinite"):
        nan.get_forces()

    flat = Atoms("Cu2", positions=[[0, 0, 0], [1.2, 1.2, 0]],
                 cell=[[3, 0, 0], [0, 3, 0], [1, 1, 0]], pbc=True)
    flat.calc = calc
    with pytest.raises(ValueError, match="zero-volume"):
        flat.get_potential_energy()

    empty = Atoms()
    empty.calc = calc
    with pytest.raises(ValueError, match="empty"):
        empty.get_potential_energy()
    with pytest.raises(ValueError, match=r"structure 1"):
        calc.calculate_batch([_co(), gold], ["energy"])



def test_batch_checks_name_the_failing_structure_with_the_single_call_message(calc):
    """calculate_batch checks all structures at once; a bad one is reported by index with the
    message a single call gives, whichever check fails and wherever it sits in the batch."""
    good = [_co(), _slab_o(), _co()]
    nan_pos = _co()
    nan_pos.positions[0, 1] = np.inf
    nan_cell = _slab_o()
    nan_cell.cell[2, 2] = np.nan
    flat = Atoms("Cu2", positions=[[0, 0, 0], [1.2, 1.2, 0]],
                 cell=[[3, 0, 0], [0, 3, 0], [1, 1, 0]], pbc=True)
    # degenerate only along the periodic axes: a zero third vector with pbc (T, T, F) is fine
    slab2d = Atoms("Cu2", positions=[[0, 0, 0], [1.3, 1.3, 1.0]],
                   cell=[[2.6, 0, 0], [0, 2.6, 0], [0, 0, 0]], pbc=[True, True, False])
    line = Atoms("Cu2", positions=[[0, 0, 0], [1.3, 0, 0]], cell=[[2.6, 0, 0], [2.6, 0, 0],
                                                                  [0, 0, 5]], pbc=[True, True, False])
    gold = Atoms("AuCu", positions=[[0, 0, 0], [0, 0, 2.5]])
    cases = [(nan_pos, "NaN or infinite"), (nan_cell, "cell.*NaN or infinite"),
             (flat, "zero-volume"), (line, "zero-volume"), (gold, r"Au.*supports H, C, O, Cu"),
             (Atoms(), "empty")]
    for bad, message in cases:
        for k in (0, 2):
            structures = good[:k] + [bad] + good[k:]
            with pytest.raises(ValueError, match=message) as err:
                calc.calculate_batch(structures, ["energy"])
            assert f"(structure {k})" in str(err.value)
    results = calc.calculate_batch(good + [slab2d], ["energy", "forces"])
    assert len(results) == 4 and all(np.isfinite(r["energy"]) for r in results)

def test_isolated_atom_gets_reference_energy(pot):
    calc = ESTCalculator(pot, device="cpu", dtype="float64")
    model = calc.potential.model
    saved = model.element_reference.clone(), model.energy_shift.clone()
    try:
        with torch.no_grad():
            model.element_reference[29] = -3.25
            model.energy_shift.fill_(0.5)
        single = Atoms("Cu", positions=[[1.0, 2.0, 3.0]])
        single.calc = calc
        assert single.get_potential_energy() == -3.25 + 0.5
        assert np.all(single.get_forces() == 0.0)
        # Two atoms farther apart than the cutoff: no neighbours, so the same per atom.
        pair = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, calc.cutoff_A + 0.5]])
        pair.calc = calc
        assert pair.get_potential_energy() == pytest.approx(2 * (-3.25 + 0.5), abs=1e-12)
        assert np.all(pair.get_forces() == 0.0)
    finally:
        with torch.no_grad():
            model.element_reference.copy_(saved[0])
            model.energy_shift.copy_(saved[1])


# ----------------------------------------------------------------------- ASE workflows
@pytest.mark.slow
@pytest.mark.parametrize("name", ["BFGS", "FIRE", "LBFGS"])
def test_optimizers_lower_the_energy(calc, name):
    import ase.optimize

    atoms = _slab_o()
    atoms.calc = calc
    e0 = atoms.get_potential_energy()
    opt = getattr(ase.optimize, name)(atoms, logfile=None, maxstep=0.05)
    # The first step of each optimizer is a short step along the calculator's forces, so it must
    # lower the energy; later steps on this untrained landscape need not, but must run.
    opt.run(fmax=1e-3, steps=1)
    assert atoms.get_potential_energy() < e0
    opt.run(fmax=1e-3, steps=2)
    assert np.isfinite(atoms.get_forces()).all()


@pytest.mark.slow
def test_cell_filter_and_md(calc):
    from ase import units
    from ase.filters import FrechetCellFilter
    from ase.md.velocitydistribution import thermalize_momenta
    from ase.md.verlet import VelocityVerlet
    from ase.optimize import FIRE

    atoms = bulk("Cu", "fcc", a=3.7).repeat((1, 1, 2))
    atoms.rattle(0.05, seed=3)
    atoms.calc = calc
    e0 = atoms.get_potential_energy()
    FIRE(FrechetCellFilter(atoms), logfile=None).run(fmax=1e-3, steps=3)
    assert atoms.get_potential_energy() < e0

    thermalize_momenta(atoms, 300, rng=np.random.default_rng(0))
    start = atoms.get_total_energy()
    VelocityVerlet(atoms, timestep=0.5 * units.fs).run(4)
    assert abs(atoms.get_total_energy() - start) < 1e-3 * len(atoms)


@pytest.mark.parametrize("fmt", ["traj", "extxyz"])
def test_results_survive_file_round_trip(calc, tmp_path, fmt):
    from ase.io import read, write

    atoms = _slab_o()
    atoms.calc = calc
    energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    path = tmp_path / f"out.{fmt}"
    write(path, atoms)
    back = read(path)
    assert back.get_potential_energy() == pytest.approx(energy, rel=1e-12, abs=1e-7)
    # extxyz stores 8 decimals; traj stores the float64 values themselves.
    atol = 1e-7 if fmt == "extxyz" else 1e-14
    np.testing.assert_allclose(back.get_forces(), forces, rtol=0, atol=atol)
    np.testing.assert_allclose(back.get_stress(), stress, rtol=0, atol=atol)
    assert set(back.calc.results) <= {"energy", "free_energy", "forces", "stress", "energies"}


def test_callers_potential_keeps_trainable_parameters_and_gets_no_gradients(pot):
    """The calculator freezes a caller's parameters only for the duration of a call: the results
    equal those of a frozen copy, and afterwards the parameters still require gradients and have
    none accumulated (a potential can be trained further and evaluated in turn)."""
    import copy

    frozen = copy.deepcopy(pot)
    for p in frozen.parameters():
        p.requires_grad_(False)
    assert all(p.requires_grad for p in pot.parameters())
    atoms = _slab_o()
    calc = ESTCalculator(pot, device="cpu", dtype="float64")
    want = ESTCalculator(frozen, device="cpu", dtype="float64")
    for c in (calc, want):
        c.calculate(atoms, ["energy", "forces", "stress"])
    for key in ("energy", "forces", "stress"):
        np.testing.assert_array_equal(calc.results[key], want.results[key])
    assert all(p.requires_grad and p.grad is None for p in pot.parameters())
    # a training step on the same object still reaches every parameter used by the energy
    from est_calc.batch import AtomsBatch
    from est_calc.neighbors import build_graph

    batch = AtomsBatch.from_atoms(atoms, dtype=torch.float64)
    pot(batch, build_graph(batch, pot.cutoff_A)).energy.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pot.parameters())
