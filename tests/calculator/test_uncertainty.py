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


def _pooled_part(path, radius=3.0, self_weight=4.0):
    """The fixture's part (fitted without pooling) with neighbour pooling switched on."""
    part, _ = load_uncertainty(path)
    part.pool_radius, part.self_weight = radius, self_weight
    return part


def test_pooling_is_the_cosine_weighted_mean_of_squared_distances():
    """D_i = sqrt((w0 d_i^2 + sum_j c_ij d_j^2) / (w0 + sum_j c_ij)), pairs beyond R ignored."""
    from est_calc.uncertainty import LatentDistance

    part = LatentDistance(torch.tensor([29]), torch.zeros(1, 1, 2), torch.tensor([1]),
                          torch.zeros(1, 2), torch.eye(2)[None], force_a=1.0, force_b=1.0,
                          energy_kappa=1.0, unknown_distance=1.0, pool_radius=4.0,
                          self_weight=2.0)
    d = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    i = torch.tensor([0, 1, 0, 2, 1, 2])
    j = torch.tensor([1, 0, 2, 0, 2, 1])
    r = torch.tensor([2.0, 2.0, 5.0, 5.0, 1.0, 1.0], dtype=torch.float64)  # 0-2 beyond R

    def c(x):
        return 0.5 * (1 + np.cos(np.pi * x / 4.0))

    want = [np.sqrt((2 * 1 + c(2) * 4) / (2 + c(2))),
            np.sqrt((2 * 4 + c(2) * 1 + c(1) * 9) / (2 + c(2) + c(1))),
            np.sqrt((2 * 9 + c(1) * 4) / (2 + c(1)))]
    np.testing.assert_allclose(part.pooled(d, (i, j, r)).numpy(), want, rtol=1e-12)
    with pytest.raises(ValueError, match="needs the pairs"):
        part(torch.tensor([29, 29, 29]), torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), 1)
    part.pool_radius = 0.0
    np.testing.assert_array_equal(part.pooled(d, (i, j, r)).numpy(), d.numpy())


def test_pooled_std_in_the_calculator(latent_potential, tmp_path):
    """The calculator's forces_std is a * D^b with D pooled over ASE's neighbour list; a Verlet
    skin (pairs beyond R in the graph) and batching change nothing; the pooling is saved."""
    from ase.neighborlist import neighbor_list

    path = tmp_path / "pooled.pt"
    path.write_bytes(latent_potential.read_bytes())
    save_uncertainty(_pooled_part(latent_potential), path)
    part, _ = load_uncertainty(path)
    assert (part.pool_radius, part.self_weight) == (3.0, 4.0)
    calc = ESTCalculator(str(path), device="cpu", dtype="float64", uncertainty=True)
    unpooled = ESTCalculator(str(latent_potential), device="cpu", dtype="float64",
                             uncertainty=True)
    cells = _cells()
    for atoms in cells:
        got = _calc_results(calc, atoms)["forces_std"]
        own = (_calc_results(unpooled, atoms)["forces_std"] / part.force_a) ** (1 / part.force_b)
        i, j, r = neighbor_list("ijd", atoms, 3.0)
        c = 0.5 * (1 + np.cos(np.pi * r / 3.0))
        pooled = np.sqrt((4 * own ** 2 + np.bincount(i, c * own[j] ** 2, len(atoms)))
                         / (4 + np.bincount(i, c, len(atoms))))
        np.testing.assert_allclose(got, part.force_a * pooled ** part.force_b, rtol=1e-6)
        assert not np.allclose(got, part.force_a * own ** part.force_b, rtol=1e-3)
        skinned = ESTCalculator(str(path), device="cpu", dtype="float64", uncertainty=True,
                                skin=1.0)
        np.testing.assert_allclose(_calc_results(skinned, atoms)["forces_std"], got, rtol=1e-12)
    batch = calc.calculate_batch(cells, ("energy", "forces", "forces_std"))
    for atoms, res in zip(cells, batch):
        np.testing.assert_allclose(res["forces_std"], _calc_results(calc, atoms)["forces_std"],
                                   rtol=1e-12)


def test_format_1_sidecar_loads_without_pooling(latent_potential, tmp_path):
    """A sidecar written before the pooling (no pool_radius) still loads, unpooled."""
    path = tmp_path / "old.pt"
    path.write_bytes(latent_potential.read_bytes())
    payload = torch.load(sidecar_path(latent_potential), weights_only=True)
    payload.pop("pool_radius", None)
    payload.pop("self_weight", None)
    payload["format_version"] = 1
    torch.save(payload, sidecar_path(path))
    part, reason = load_uncertainty(path)
    assert reason is None and part.pool_radius == 0.0 and part.self_weight == 1.0


def test_flag_thresholds_round_trip_and_older_sidecars_have_none(latent_potential, tmp_path):
    from est_calc.uncertainty import LatentDistance

    part, _ = load_uncertainty(latent_potential)
    assert part.thresholds == {}  # fitted without calibration frames: none stored
    state = part.state()
    state["thresholds"] = {"max": 0.2, "rms": 0.1}
    assert LatentDistance.from_state(state).thresholds == {"max": 0.2, "rms": 0.1}
    state.pop("thresholds")  # a sidecar written before they were stored
    assert LatentDistance.from_state(state).thresholds == {}
    for bad in ({"max": 0.0}, {"mean": 0.1}, {"rms": -1.0}):
        state["thresholds"] = bad
        with pytest.raises(ValueError, match="thresholds"):
            LatentDistance.from_state(state)


def test_shipped_part_stores_its_flag_thresholds():
    part = ESTCalculator(device="cpu", uncertainty=True).potential.uncertainty
    assert set(part.thresholds) == {"max", "rms"}
    assert 0 < part.thresholds["rms"] < part.thresholds["max"] < 1.0


def test_pooling_beyond_the_cutoff_is_refused(latent_potential, tmp_path):
    """Pairs beyond the cutoff are not in the graph (or only a skin's share of them)."""
    path = tmp_path / "wide.pt"
    path.write_bytes(latent_potential.read_bytes())
    cutoff = load_potential(str(path)).cutoff_A
    save_uncertainty(_pooled_part(latent_potential, radius=cutoff + 1.0), path)
    calc = ESTCalculator(str(path), device="cpu", dtype="float64", uncertainty=True)
    with pytest.raises(ValueError, match="beyond the potential's cutoff"):
        _calc_results(calc, _cells()[0])


def test_reference_frames_are_evaluated_without_their_pairs():
    """The fit reads only the reference frames' features: evaluate_frames(pairs=False) skips
    the neighbour pairs and gives the same features and frame indices."""
    from est_calc.model import ModelConfig
    from est_calc.training.datasets import frame_from_atoms

    torch.manual_seed(0)
    pot = Potential.from_config(ModelConfig.preset("tiny"), species=(1, 6, 8, 29)).double().eval()
    frames = [frame_from_atoms(a) for a in (fcc111("Cu", (2, 2, 2), vacuum=5.0),
                                            bulk("Cu", "fcc", a=3.6, cubic=True))]
    full, bare = (evaluate_frames(pot, frames, forces=False, pairs=p) for p in (True, False))
    assert bare.pairs is None and len(full.pairs[0]) > 0
    np.testing.assert_array_equal(bare.features, full.features)
    np.testing.assert_array_equal(bare.frame, full.frame)
