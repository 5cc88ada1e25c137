"""ZBL short-range repulsion: its formula, where it ends, and that models feel it."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from ase import Atoms

from est_calc.model import ModelConfig
from est_calc.nn.repulsion import COULOMB_EV_A, ZBLRepulsion
from est_calc.potential import Potential


def _pair_energy(zbl, z1, z2, r, dtype=torch.float64):
    z = torch.tensor([z1, z2])
    edge_index = torch.tensor([[0, 1], [1, 0]])
    rr = torch.as_tensor(r, dtype=dtype).reshape(1).repeat(2)
    return zbl(z, edge_index, rr)


def test_screened_coulomb_limit_at_short_range():
    """E_ij -> k_e Z_i Z_j / r as r -> 0 (phi(0) = 1, envelope(0) = 1), split half per atom."""
    zbl = ZBLRepulsion()
    for z1, z2 in [(1, 1), (8, 29), (79, 79)]:
        r = 1e-4
        e = _pair_energy(zbl, z1, z2, r)
        assert torch.allclose(e[0], e[1])
        ratio = float(e.sum()) * r / (COULOMB_EV_A * z1 * z2)
        assert ratio == pytest.approx(1.0, abs=2e-3)


def test_universal_screening_value():
    """At r = a_ij (x = 1) and half the outer radius, E equals the closed form written out."""
    zbl = ZBLRepulsion(radius_factor=0.65)
    z1, z2 = 29, 8
    r_out = 0.65 * float(zbl.covalent_radii[z1] + zbl.covalent_radii[z2])
    r = 0.5 * r_out
    a = 0.46850 / (z1**0.23 + z2**0.23)
    x = r / a
    phi = (0.18175 * math.exp(-3.19980 * x) + 0.50986 * math.exp(-0.94229 * x)
           + 0.28022 * math.exp(-0.40290 * x) + 0.02817 * math.exp(-0.20162 * x))
    d = 0.5
    u = 1 - 28 * d**6 + 48 * d**7 - 21 * d**8
    expected = 14.399645478425668 * z1 * z2 / r * phi * u
    assert float(_pair_energy(zbl, z1, z2, r).sum()) == pytest.approx(expected, rel=1e-12)


def test_zero_with_zero_gradient_past_the_outer_radius():
    zbl = ZBLRepulsion()
    for z1, z2 in [(1, 6), (29, 29), (8, 78)]:
        r_out = float(zbl.outer_radius(torch.tensor(z1), torch.tensor(z2)))
        for r in (r_out, r_out * 1.01, 3.0):
            rr = torch.tensor([r, r], dtype=torch.float64, requires_grad=True)
            e = zbl(torch.tensor([z1, z2]), torch.tensor([[0, 1], [1, 0]]), rr).sum()
            (g,) = torch.autograd.grad(e, rr)
            assert float(e.detach()) == 0.0 and float(g.abs().max()) == 0.0
        # and smooth (C^2) as it arrives there: value and slope tend to zero
        rr = torch.tensor([r_out * 0.9999] * 2, dtype=torch.float64, requires_grad=True)
        e = zbl(torch.tensor([z1, z2]), torch.tensor([[0, 1], [1, 0]]), rr).sum()
        (g,) = torch.autograd.grad(e, rr)
        assert abs(float(e.detach())) < 1e-7 and float(g.abs().max()) < 1e-2


def test_equilibrium_bonds_feel_none_of_it():
    """The term ends inside every bond of the training chemistry: C-H, O-H, C-O, N-N, Cu-Cu, Pt-C."""
    zbl = ZBLRepulsion()
    for z1, z2, bond in [(6, 1, 1.09), (8, 1, 0.96), (6, 8, 1.13), (7, 7, 1.10), (29, 29, 2.55),
                         (78, 6, 1.85), (1, 1, 0.74)]:
        assert float(_pair_energy(zbl, z1, z2, bond * 0.9).sum()) == 0.0


def _dimer_model(seed=0, **overrides):
    config = ModelConfig.preset("tiny", n_layers=2, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pot = Potential.from_config(config, species=[1, 6, 8, 29, 79])
    return pot.to(torch.float64).eval()


def test_model_forces_are_the_gradient_with_repulsion():
    """Central differences of the model energy (ZBL inside) on a compressed dimer and a triclinic
    cell with a close pair, float64."""
    from est_calc.calculator import ESTCalculator

    pot = _dimer_model()
    calc = ESTCalculator(pot, device="cpu", dtype="float64")
    dimer = Atoms("CuO", positions=[[0, 0, 0], [0.4, 0.3, 0.2]])
    cell = Atoms("Cu2AuH", positions=[[0, 0, 0], [1.0, 0.2, 0.1], [1.9, 1.9, 0.2], [2.3, 2.2, 0.5]],
                 cell=[[3.6, 0.1, 0.0], [0.2, 3.5, 0.1], [0.0, 0.3, 3.7]], pbc=True)
    for atoms in (dimer, cell):
        atoms.calc = calc
        forces = atoms.get_forces()
        h = 1e-5
        for i, k in itertools.product(range(len(atoms)), range(3)):
            e = []
            for s in (1, -1):
                moved = atoms.copy()
                moved.positions[i, k] += s * h
                moved.calc = calc
                e.append(moved.get_potential_energy())
            assert forces[i, k] == pytest.approx(-(e[0] - e[1]) / (2 * h), abs=1e-5 * max(1, abs(forces[i, k])))


def test_repulsion_dominates_at_close_contact_and_can_be_switched_off():
    """With ZBL, two atoms 0.1-0.3 Å apart repel with hundreds of eV/Å whatever the learned part
    says; the same model built without it does not (issue 21: 0.33 eV/Å at 0.1 Å)."""
    from est_calc.calculator import ESTCalculator

    with_zbl, without = _dimer_model(), _dimer_model(zbl=False)
    for z1, z2 in [(29, 29), (1, 8), (6, 79)]:
        for r in (0.1, 0.2, 0.3):
            f = {}
            for name, pot in (("zbl", with_zbl), ("none", without)):
                atoms = Atoms(numbers=[z1, z2], positions=[[0, 0, 0], [0, 0, r]])
                atoms.calc = ESTCalculator(pot, device="cpu", dtype="float64")
                f[name] = atoms.get_forces()[1, 2]  # +z pushes atom 1 away from atom 0
            assert f["zbl"] > 20.0, (z1, z2, r, f)
        assert abs(f["none"]) < 20.0


def test_legacy_configs_load_without_repulsion():
    """A stored config without the key was trained without ZBL and keeps it off."""
    cfg = ModelConfig.preset("tiny").to_dict()
    for key in ("zbl", "vector_norm", "zbl_radius_factor"):
        cfg.pop(key)
    legacy = ModelConfig.from_dict(cfg)
    assert legacy.zbl is False and legacy.vector_norm == "separate"
    assert ModelConfig.preset("tiny").zbl is True
    assert ModelConfig.from_dict(ModelConfig.preset("tiny").to_dict()) == ModelConfig.preset("tiny")


def test_shipped_potential_repels_every_pair_of_its_elements():
    """The default potential: for every pair of its elements, the force at 0.05-0.5 of the ZBL
    outer radius pushes the atoms apart and the energy rises as they approach."""
    from est_calc.calculator import ESTCalculator
    from est_calc.potential import load_potential

    pot = load_potential("default")
    if not pot.model.config.zbl:
        pytest.skip("the shipped default predates the ZBL term")
    calc = ESTCalculator(pot, device="cpu", dtype="float64")
    zbl = pot.model.repulsion
    for z1, z2 in itertools.combinations_with_replacement(pot.species, 2):
        r_out = float(zbl.outer_radius(torch.tensor(z1), torch.tensor(z2)))
        energies = []
        for r in np.linspace(0.05, 0.5, 6) * r_out:
            atoms = Atoms(numbers=[z1, z2], positions=[[0, 0, 0], [0, 0, r]])
            atoms.calc = calc
            assert atoms.get_forces()[1, 2] > 1.0, (z1, z2, r)
            energies.append(atoms.get_potential_energy())
        assert all(np.diff(energies) < 0), (z1, z2, energies)
