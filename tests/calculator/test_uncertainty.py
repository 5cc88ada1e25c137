"""ESTCalculator(uncertainty=True): committees, the latent-distance part, its sidecar file, and the
shipped default potential's estimate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk, fcc111

from est_calc.calculator import ESTCalculator
from est_calc.potential import Potential, load_potential, save_potential
from est_calc.training.uncertainty import FrameErrors, evaluate_frames, latent_distance_from
from est_calc.uncertainty import load_uncertainty, save_uncertainty, sidecar_path


def _cells():
    a = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 1, 1)
    a.rattle(0.05, seed=3)
    b = fcc111("Cu", (2, 2, 2), vacuum=5.0)
    b.pbc = True
    b.rattle(0.05, seed=4)
    return [a, b]


def _calc_results(calc, atoms):
    atoms = atoms.copy()
    atoms.calc = calc
    return {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(),
            "stress": atoms.get_stress(), **{k: calc.results[k] for k in ("energy_std",
                                                                          "forces_std")
                                             if k in calc.results}}


def test_committee_of_identical_members_has_zero_std_and_equals_the_member(make_potential):
    pot = make_potential()
    single = ESTCalculator(pot, device="cpu", dtype="float64")
    committee = ESTCalculator([pot, pot, pot], device="cpu", dtype="float64", uncertainty=True)
    for atoms in _cells():
        want, got = _calc_results(single, atoms), _calc_results(committee, atoms)
        for key in ("energy", "forces", "stress"):
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        assert got["energy_std"] == 0.0
        assert got["forces_std"].shape == (len(atoms),)
        np.testing.assert_array_equal(got["forces_std"], 0.0)


def test_committee_spread_is_the_sample_std_of_its_members(make_potential):
    pots = [make_potential(seed=s) for s in (0, 1, 2)]
    committee = ESTCalculator(pots, device="cpu", dtype="float64", uncertainty=True)
    members = [ESTCalculator(p, device="cpu", dtype="float64") for p in pots]
    atoms = _cells()[0]
    got = _calc_results(committee, atoms)
    each = [_calc_results(m, atoms) for m in members]
    energies = np.array([r["energy"] for r in each])
    forces = np.array([r["forces"] for r in each])  # (K, n, 3) eV/Å
    np.testing.assert_allclose(got["energy"], energies.mean(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(got["forces"], forces.mean(0), rtol=0, atol=1e-10)
    np.testing.assert_allclose(got["stress"], np.mean([r["stress"] for r in each], 0),
                               rtol=0, atol=1e-10)
    np.testing.assert_allclose(got["energy_std"], energies.std(ddof=1), rtol=1e-8)
    want = np.sqrt(forces.var(axis=0, ddof=1).sum(-1))  # RMS length of the spread, eV/Å
    np.testing.assert_allclose(got["forces_std"], want, rtol=1e-8, atol=1e-12)
    assert got["forces_std"].max() > 0


def test_committee_batched_equals_single(make_potential):
    pots = [make_potential(seed=s) for s in (0, 1)]
    calc = ESTCalculator(pots, device="cpu", dtype="float64", uncertainty=True)
    cells = _cells()
    batch = calc.calculate_batch(cells, ("energy", "forces", "forces_std", "energy_std"))
    for atoms, res in zip(cells, batch):
        one = _calc_results(calc, atoms)
        np.testing.assert_allclose(res["forces_std"], one["forces_std"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(res["energy_std"], one["energy_std"], rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def latent_potential(tmp_path_factory):
    """A tiny float64 potential with a LatentDistance part fitted to a few Cu frames, and its
    file (with the sidecar)."""
    from est_calc.model import ModelConfig
    from est_calc.training.datasets import frame_from_atoms

    torch.manual_seed(0)
    pot = Potential.from_config(ModelConfig.preset("tiny"), species=(1, 6, 8, 29))
    pot = pot.double().eval()
    frames = []
    for k in range(4):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 1, 1)
        atoms.rattle(0.05, seed=k)
        frames.append(frame_from_atoms(atoms))
    ref = evaluate_frames(pot, frames, forces=False)
    part = latent_distance_from(pot, ref, n_reference=16)
    path = tmp_path_factory.mktemp("latent") / "tiny.pt"
    save_potential(pot, path)
    save_uncertainty(part, path)
    return path


def test_latent_part_leaves_energy_forces_stress_unchanged(latent_potential):
    plain = ESTCalculator(str(latent_potential), device="cpu", dtype="float64")
    watched = ESTCalculator(str(latent_potential), device="cpu", dtype="float64",
                            uncertainty=True)
    assert watched.potential.uncertainty is not None
    for atoms in _cells():
        want, got = _calc_results(plain, atoms), _calc_results(watched, atoms)
        for key in ("energy", "forces", "stress"):
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        assert got["forces_std"].shape == (len(atoms),) and np.all(got["forces_std"] > 0)
        assert np.isfinite(got["energy_std"]) and got["energy_std"] > 0


def test_latent_std_grows_away_from_the_reference_and_batches(latent_potential):
    calc = ESTCalculator(str(latent_potential), device="cpu", dtype="float64",
                         uncertainty=True)
    near = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 1, 1)
    near.rattle(0.05, seed=9)
    far = near.copy()
    far.set_cell(far.cell * 0.9, scale_atoms=True)  # 10 % compressed: never seen
    std_near = _calc_results(calc, near)["forces_std"].max()
    std_far = _calc_results(calc, far)["forces_std"].max()
    assert std_far > std_near
    batch = calc.calculate_batch([near, far], ("energy", "forces", "forces_std"))
    np.testing.assert_allclose(batch[1]["forces_std"], _calc_results(calc, far)["forces_std"],
                               rtol=1e-9)


def test_sidecar_of_another_file_is_not_used(latent_potential, tmp_path):
    other = tmp_path / "tiny.pt"
    pot = load_potential(str(latent_potential), dtype=torch.float64)
    with torch.no_grad():
        pot.model.element_reference[29] += 1.0
    save_potential(pot, other)
    sidecar_path(other).write_bytes(sidecar_path(latent_potential).read_bytes())
    part, reason = load_uncertainty(other)
    assert part is None and "sha256" in reason
    with pytest.raises(ValueError, match="fitted for another version"):
        ESTCalculator(str(other), device="cpu", uncertainty=True)


def test_uncertainty_without_a_part_names_the_problem(make_potential, tmp_path):
    with pytest.raises(ValueError, match="has no uncertainty part"):
        ESTCalculator(make_potential(), device="cpu", uncertainty=True)
    path = tmp_path / "plain.pt"
    save_potential(make_potential(), path)
    with pytest.raises(ValueError, match=r"plain\.pt has no uncertainty part.*plain\.uncertainty"):
        ESTCalculator(str(path), device="cpu", uncertainty=True)


@pytest.mark.parametrize("bad, match", [
    ("one", "at least two potentials"),
    ("mixed", "another architecture"),
    ("flag", "uncertainty must be True or False"),
])
def test_bad_committee_arguments(make_potential, bad, match):
    pot = make_potential()
    kwargs = {"one": dict(model=[pot]),
              "mixed": dict(model=[pot, make_potential(message="so2")]),
              "flag": dict(model=[pot, pot], uncertainty="yes")}[bad]
    with pytest.raises(ValueError, match=match):
        ESTCalculator(device="cpu", **kwargs)


def test_std_properties_only_with_uncertainty(make_potential):
    plain = ESTCalculator(make_potential(), device="cpu")
    assert "forces_std" not in plain.implemented_properties
    with pytest.raises(ValueError, match="unknown properties"):
        plain.calculate_batch(_cells(), ("energy", "forces_std"))


def test_default_potential_ships_an_uncertainty_part():
    """ESTCalculator(uncertainty=True) works out of the box, changes nothing else, and a strained
    Au-Cu cell at the Cu lattice constant (outside the training data) gets a larger force std
    than an fcc(111) Cu slab like those it was trained on."""
    from est_calc.training.synthetic import emt_lattice_constant

    plain = ESTCalculator(device="cpu")
    watched = ESTCalculator(device="cpu", uncertainty=True)
    slab = fcc111("Cu", (3, 3, 3), vacuum=6.0)
    slab.rattle(0.05, seed=1)
    want, got = _calc_results(plain, slab), _calc_results(watched, slab)
    for key in ("energy", "forces", "stress"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    alloy = bulk("Cu", "fcc", a=emt_lattice_constant("Cu"), cubic=True).repeat(2)
    alloy.numbers[np.random.default_rng(0).permutation(32)[:16]] = 79
    alloy.rattle(0.05, seed=2)
    assert _calc_results(watched, alloy)["forces_std"].max() > got["forces_std"].max()


def test_latent_std_with_low_memory_is_the_same(latent_potential):
    """Recomputing the layers in the backward pass does not record the features twice."""
    atoms = _cells()[0]
    base = ESTCalculator(str(latent_potential), device="cpu", dtype="float64", uncertainty=True)
    low = ESTCalculator(str(latent_potential), device="cpu", dtype="float64", uncertainty=True,
                        low_memory=True)
    np.testing.assert_allclose(_calc_results(low, atoms)["forces_std"],
                               _calc_results(base, atoms)["forces_std"], rtol=1e-12)


def test_dispersion_shifts_the_committee_mean_not_its_spread(make_potential):
    pots = [make_potential(seed=s) for s in (0, 1)]
    plain = ESTCalculator(pots, device="cpu", dtype="float64", uncertainty=True)
    d3 = ESTCalculator(pots, device="cpu", dtype="float64", uncertainty=True,
                       dispersion="d3bj", functional="pbe")
    atoms = _cells()[0]
    a, b = _calc_results(plain, atoms), _calc_results(d3, atoms)
    assert b["energy"] < a["energy"]  # dispersion binds
    np.testing.assert_allclose(b["forces_std"], a["forces_std"], rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(b["energy_std"], a["energy_std"], rtol=1e-8)
