"""DFT-D3(BJ) dispersion (est_calc.dispersion) and its place in ESTCalculator.

References are tad-dftd3's own evaluation (``tad_dftd3.dftd3`` with the same parameters, in
Bohr and Hartree, converted here): for a molecule directly; for periodic cells on an explicit
cluster holding every periodic image within reach (pair cutoff + CN cutoff) of the cell, whose
atom-resolved energies of the cell's own atoms are the periodic energy. Forces and stress of that
reference come from autograd through the cluster (its positions are the cell's positions plus
lattice shifts, strained with them). Everything runs in float64.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.mixing import SumCalculator

tad_dftd3 = pytest.importorskip("tad_dftd3")

from est_calc.batch import AtomsBatch
from est_calc.calculator import ESTCalculator, UnknownArgumentError
from est_calc.dispersion import (
    AA2AU,
    AU2EV,
    DEFAULT_CN_CUTOFF_A,
    DEFAULT_CUTOFF_A,
    D3PairList,
    DispersionD3,
    bj_parameters,
    functionals,
)
from est_calc.forces import energy_forces_stress

F64 = torch.float64
SMALL = {"cutoff_A": 6.0, "cn_cutoff_A": 5.0}  # periodic references stay a few hundred atoms


# ---------------------------------------------------------------------------- the reference
def _library_param(functional: str) -> dict:
    param = tad_dftd3.param.get_functional_params(functional, damping="bj", dtype=F64)
    param["s9"] = torch.tensor(0.0, dtype=F64)  # two-body D3(BJ), as est_calc's "d3bj"
    return param


def _cluster(atoms: Atoms, reach_A: float):
    """Indices and integer shifts of every image within ``reach_A`` of the cell's atoms, the
    cell's own atoms first (shift 0)."""
    cell = atoms.cell.array
    pos = atoms.positions
    n = len(atoms)
    ranges = []
    for k in range(3):
        if atoms.pbc[k]:
            others = [cell[(k + 1) % 3], cell[(k + 2) % 3]]
            normal = np.cross(*others)
            height = abs(np.dot(cell[k], normal)) / np.linalg.norm(normal)
            m = math.ceil(reach_A / height) + 1
            ranges.append(range(-m, m + 1))
        else:
            ranges.append(range(1))
    shifts = np.array([(a, b, c) for a in ranges[0] for b in ranges[1] for c in ranges[2]])
    shifts = shifts[np.argsort(np.abs(shifts).sum(axis=1), kind="stable")]  # (0, 0, 0) first
    idx = np.tile(np.arange(n), len(shifts))
    sh = np.repeat(shifts, n, axis=0)
    images = pos[idx] + sh @ cell
    dist = np.linalg.norm(images[:, None, :] - pos[None, :, :], axis=-1).min(axis=1)
    keep = dist < reach_A
    keep[:n] = True
    return idx[keep], sh[keep]


def library_d3(atoms: Atoms, functional: str, cutoff_A: float = DEFAULT_CUTOFF_A,
               cn_cutoff_A: float = DEFAULT_CN_CUTOFF_A, derivatives: bool = False):
    """tad-dftd3's D3(BJ) of ``atoms``: (energy eV, per-atom energies eV[, forces eV/Å,
    stress (3, 3) eV/Å^3 or None])."""
    n = len(atoms)
    pbc = bool(atoms.pbc.any())
    reach = cutoff_A + cn_cutoff_A
    idx, sh = _cluster(atoms, reach) if pbc else (np.arange(n), np.zeros((n, 3), dtype=int))
    pos = torch.tensor(atoms.positions, dtype=F64, requires_grad=derivatives)
    cell = torch.tensor(atoms.cell.array, dtype=F64)
    strain = torch.zeros(3, 3, dtype=F64, requires_grad=derivatives and pbc)
    deform = torch.eye(3, dtype=F64) + 0.5 * (strain + strain.T)
    cluster = (pos[torch.as_tensor(idx)] + torch.as_tensor(sh, dtype=F64) @ cell) @ deform
    numbers = torch.as_tensor(atoms.numbers[idx])
    cutoff = tad_dftd3.Cutoff(disp2=cutoff_A * AA2AU, cn=cn_cutoff_A * AA2AU, dtype=F64)
    per_atom = tad_dftd3.dftd3(numbers, cluster * AA2AU, _library_param(functional),
                               cutoff=cutoff)[:n] * AU2EV
    energy = per_atom.sum()
    if not derivatives:
        return float(energy.detach()), per_atom.detach().numpy()
    inputs = [pos, strain] if pbc else [pos]
    grads = torch.autograd.grad(energy, inputs)
    forces = -grads[0].numpy()
    stress = grads[1].numpy() / abs(np.linalg.det(atoms.cell.array)) if pbc else None
    return float(energy.detach()), per_atom.detach().numpy(), forces, stress


class LibraryD3(Calculator):
    """A minimal ASE calculator around tad-dftd3 (``library_d3``)."""

    implemented_properties = ("energy", "free_energy", "forces", "stress")

    def __init__(self, functional: str, **cutoffs):
        super().__init__()
        self.functional, self.cutoffs = functional, cutoffs

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        e, _, f, s = library_d3(self.atoms, self.functional, derivatives=True, **self.cutoffs)
        self.results = {"energy": e, "free_energy": e, "forces": f}
        if s is not None:
            self.results["stress"] = s.reshape(9)[[0, 4, 8, 5, 2, 1]]


def ours(atoms: Atoms, functional: str = "pbe", dtype=F64, device="cpu", **cutoffs):
    """est_calc's D3 energy (eV), per-atom energies, forces and (periodic) stress."""
    d3 = DispersionD3(functional, **cutoffs).to(device)
    batch = AtomsBatch.from_atoms(atoms, dtype=dtype, device=device)
    pbc = bool(atoms.pbc.any())

    class Only(torch.nn.Module):
        def forward(self, b, graph):
            return d3(b)

    out = energy_forces_stress(Only(), batch, None, compute_stress=pbc)
    stress = out.stress[0].cpu().numpy() if pbc else None
    return (float(out.energy[0]), out.energies.cpu().numpy(), out.forces.cpu().numpy(), stress)


# ---------------------------------------------------------------------------- structures
def ethanol_water() -> Atoms:
    from ase.build import molecule

    a = molecule("CH3CH2OH")
    w = molecule("H2O")
    w.translate([3.2, 0.4, 0.3])
    a += w
    a.rattle(0.02, seed=4)
    return a


def cu_cluster_co() -> Atoms:
    """A Cu4 cluster with CO nearby (pbc False): four elements, both Cu and C-O ranges."""
    from ase.build import molecule

    a = Atoms("Cu4", positions=[[0, 0, 0], [2.5, 0, 0], [1.25, 2.1, 0], [1.25, 0.7, 2.0]])
    co = molecule("CO")
    co.translate([1.3, 0.8, 4.4])
    a += co
    a += Atoms("H", positions=[[-1.5, 0.2, 0.3]])
    a.rattle(0.02, seed=5)
    return a


# ---------------------------------------------------------------------------- library equality
@pytest.mark.parametrize("make", [ethanol_water, cu_cluster_co])
def test_molecule_equals_library(make):
    atoms = make()
    e_ref, per_ref = library_d3(atoms, "pbe")
    e, per, _, _ = ours(atoms, "pbe")
    assert e < 0
    assert abs(e - e_ref) < 1e-8
    np.testing.assert_allclose(per, per_ref, rtol=0, atol=1e-10)


def test_slab_equals_library(cu_slab_co):
    assert list(cu_slab_co.pbc) == [True, True, False]  # mixed periodicity
    e_ref, per_ref, f_ref, s_ref = library_d3(cu_slab_co, "rpbe", derivatives=True, **SMALL)
    e, per, f, s = ours(cu_slab_co, "rpbe", **SMALL)
    assert abs(e - e_ref) < 1e-8
    np.testing.assert_allclose(per, per_ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(f, f_ref, rtol=0, atol=1e-9)
    np.testing.assert_allclose(s, s_ref, rtol=0, atol=1e-10)


def test_bulk_equals_library(triclinic_bulk):
    e_ref, per_ref, f_ref, s_ref = library_d3(triclinic_bulk, "pbe", derivatives=True, **SMALL)
    e, per, f, s = ours(triclinic_bulk, "pbe", **SMALL)
    assert abs(e - e_ref) < 1e-8
    np.testing.assert_allclose(per, per_ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(f, f_ref, rtol=0, atol=1e-9)
    np.testing.assert_allclose(s, s_ref, rtol=0, atol=1e-10)


def test_one_atom_cell_default_cutoffs():
    """A one-atom fcc cell at the default cutoffs (each atom pairs with its own images only):
    no force, cubic stress, and the same energy per atom as the conventional 4-atom cell."""
    from ase.build import bulk

    e, _, f, s = ours(bulk("Cu", "fcc", a=3.6), "pbe")
    np.testing.assert_allclose(f, 0.0, atol=1e-10)  # every atom a centre of inversion
    assert s[0, 0] == pytest.approx(s[1, 1], abs=1e-12) and abs(s[0, 1]) < 1e-12
    e4 = ours(bulk("Cu", "fcc", a=3.6, cubic=True), "pbe")[0]
    assert e == pytest.approx(e4 / 4, abs=1e-10)


def test_units_match_ase():
    from ase import units

    assert 1.0 / AA2AU == pytest.approx(units.Bohr, rel=1e-8)
    assert AU2EV == pytest.approx(units.Hartree, rel=1e-8)


# ---------------------------------------------------------------------------- in the calculator
def _sum_calculator(pot, **cutoffs):
    return SumCalculator([ESTCalculator(pot, dtype="float64", device="cpu"),
                          LibraryD3("pbe", **cutoffs)])


@pytest.mark.parametrize("kind", ["molecule", "slab", "bulk"])
def test_calculator_equals_sum_of_potential_and_library(make_potential, kind, cu_slab_co,
                                                        triclinic_bulk):
    pot = make_potential()
    if kind == "molecule":
        atoms, cutoffs = cu_cluster_co(), {}
        calc = ESTCalculator(pot, dtype="float64", device="cpu", dispersion="d3bj",
                             functional="pbe")
    else:
        atoms = cu_slab_co if kind == "slab" else triclinic_bulk
        cutoffs = SMALL
        calc = ESTCalculator(pot, dtype="float64", device="cpu",
                             dispersion=DispersionD3("pbe", **SMALL))
    ref = _sum_calculator(pot, **cutoffs)
    props = ["energy", "forces"] + (["stress"] if kind != "molecule" else [])
    calc.calculate(atoms, props, all_changes)
    ref.calculate(atoms, props, all_changes)
    assert calc.results["energy"] == pytest.approx(ref.results["energy"], abs=1e-8)
    np.testing.assert_allclose(calc.results["forces"], ref.results["forces"], atol=1e-8)
    if kind != "molecule":
        np.testing.assert_allclose(calc.results["stress"], ref.results["stress"], atol=1e-9)
    # per-atom energies: the model's plus each atom's share of D3
    plain = ESTCalculator(pot, dtype="float64", device="cpu")
    plain.calculate(atoms, ["energy"], all_changes)
    _, d3_atoms = library_d3(atoms, "pbe", **cutoffs)
    np.testing.assert_allclose(calc.results["energies"], plain.results["energies"] + d3_atoms,
                               atol=1e-9)


def _total_energy(calc, atoms) -> float:
    calc.calculate(atoms, ["energy"], all_changes)
    return calc.results["energy"]


@pytest.mark.parametrize("kind", ["molecule", "slab", "bulk"])
def test_forces_are_finite_differences(make_potential, kind, cu_slab_co, triclinic_bulk):
    atoms = {"molecule": cu_cluster_co(), "slab": cu_slab_co, "bulk": triclinic_bulk}[kind]
    calc = ESTCalculator(make_potential(), dtype="float64", device="cpu", dispersion="d3bj",
                         functional="rpbe")
    calc.calculate(atoms, ["energy", "forces"], all_changes)
    forces = calc.results["forces"].copy()
    h = 1e-4
    for a in range(len(atoms)):
        for k in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[a, k] += h
            minus.positions[a, k] -= h
            fd = -(_total_energy(calc, plus) - _total_energy(calc, minus)) / (2 * h)
            assert forces[a, k] == pytest.approx(fd, abs=2e-6), (a, k)


@pytest.mark.parametrize("kind", ["slab", "bulk"])
def test_stress_is_finite_strain_difference(make_potential, kind, cu_slab_co, triclinic_bulk):
    atoms = cu_slab_co if kind == "slab" else triclinic_bulk
    calc = ESTCalculator(make_potential(), dtype="float64", device="cpu", dispersion="d3bj",
                         functional="pbe")
    calc.calculate(atoms, ["energy", "stress"], all_changes)
    voigt = calc.results["stress"]
    stress = np.array([[voigt[0], voigt[5], voigt[4]], [voigt[5], voigt[1], voigt[3]],
                       [voigt[4], voigt[3], voigt[2]]])
    volume = atoms.get_volume()
    h = 1e-5
    for a in range(3):
        for b in range(3):
            eps = np.zeros((3, 3))
            eps[a, b] += 0.5 * h
            eps[b, a] += 0.5 * h
            ends = []
            for sign in (1, -1):
                s = atoms.copy()
                s.set_cell(atoms.cell.array @ (np.eye(3) + sign * eps), scale_atoms=True)
                ends.append(_total_energy(calc, s))
            fd = (ends[0] - ends[1]) / (2 * h) / volume
            assert stress[a, b] == pytest.approx(fd, abs=1e-7), (a, b)


def test_dispersion_alone_matches_its_finite_differences(cu_slab_co):
    """The D3 term on its own (the model cannot hide a wrong D3 derivative)."""
    _, _, forces, stress = ours(cu_slab_co, "pbe")
    h = 1e-5
    for a in (0, 8, 10):
        for k in range(3):
            plus, minus = cu_slab_co.copy(), cu_slab_co.copy()
            plus.positions[a, k] += h
            minus.positions[a, k] -= h
            fd = -(ours(plus)[0] - ours(minus)[0]) / (2 * h)
            assert forces[a, k] == pytest.approx(fd, abs=1e-8)
    eps = np.zeros((3, 3))
    eps[0, 1] = eps[1, 0] = 0.5 * h
    ends = []
    for sign in (1, -1):
        s = cu_slab_co.copy()
        s.set_cell(cu_slab_co.cell.array @ (np.eye(3) + sign * eps), scale_atoms=True)
        ends.append(ours(s)[0])
    assert stress[0, 1] == pytest.approx((ends[0] - ends[1]) / (2 * h) / cu_slab_co.get_volume(),
                                         abs=1e-9)


# ---------------------------------------------------------------------------- physics, paths
def test_negative_and_decaying_with_separation():
    energies = []
    for d in (3.0, 4.0, 6.0, 8.0, 9.9):
        dimer = Atoms("CuO", positions=[[0, 0, 0], [d, 0, 0]])
        energies.append(ours(dimer)[0])
    assert all(e < 0 for e in energies)
    assert all(abs(b) < abs(a) for a, b in itertools.pairwise(energies))
    beyond = Atoms("CuO", positions=[[0, 0, 0], [DEFAULT_CUTOFF_A + 0.5, 0, 0]])
    assert ours(beyond)[0] == 0.0


def test_images_and_wrapping(triclinic_bulk):
    """Atoms given far outside the cell (large shifts) and a rigid translation change nothing;
    a wire (pbc T, F, F) too."""
    e, _, f, st = ours(triclinic_bulk)
    moved = triclinic_bulk.copy()
    moved.positions += np.array([3, -2, 5]) @ moved.cell.array + [0.3, -1.1, 0.7]
    moved.positions[0] -= 4 * moved.cell.array[1]
    e2, _, f2, st2 = ours(moved)
    assert e2 == pytest.approx(e, abs=1e-10)
    np.testing.assert_allclose(f2, f, atol=1e-10)
    np.testing.assert_allclose(st2, st, atol=1e-12)
    wire = triclinic_bulk.copy()
    wire.pbc = [True, False, False]
    e_ref, _ = library_d3(wire, "pbe", **SMALL)
    assert ours(wire, **SMALL)[0] == pytest.approx(e_ref, abs=1e-8)


def test_no_pairs_no_energy():
    assert ours(Atoms("Cu", positions=[[0, 0, 0]]))[0] == 0.0
    lone = Atoms("Cu", positions=[[0, 0, 0]], cell=[30, 30, 30], pbc=True)
    e, _, f, s = ours(lone)  # nothing within the cutoff, not even its own images
    assert e == 0.0 and not f.any() and not s.any()


def test_pairs_must_fit(triclinic_bulk, cu_slab_co):
    d3 = DispersionD3("pbe")
    batch = AtomsBatch.from_atoms(triclinic_bulk, dtype=F64)
    with pytest.raises(ValueError, match="pair_list"):
        d3(batch, DispersionD3("pbe", cutoff_A=5.0, cn_cutoff_A=5.0).pair_list()(batch))
    with pytest.raises(ValueError, match="pair_list"):
        d3(batch, d3.pair_list()(AtomsBatch.from_atoms(cu_slab_co, dtype=F64)))


def test_longer_cutoffs_converge(triclinic_bulk):
    """Energy per atom against s-dftd3's own cutoffs (60 and 40 Bohr): the default's shortfall
    is the r^-6 tail, and it shrinks as the cutoff grows."""
    big = {"cutoff_A": 60 / AA2AU, "cn_cutoff_A": 40 / AA2AU}
    n = len(triclinic_bulk)
    ref = ours(triclinic_bulk, **big)[0] / n
    gaps = [ours(triclinic_bulk, cutoff_A=r, cn_cutoff_A=r)[0] / n - ref for r in (8.0, 10.0, 14.0)]
    assert all(g > 0 for g in gaps)
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[1] < 0.05 * abs(ref)  # the default (10 Å) keeps > 95 % of the energy


def _cu_only() -> Atoms:
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.6).repeat((2, 2, 1))
    atoms.rattle(0.05, seed=6)
    return atoms


PATHS = [True, False]  # image table or direct offsets


@pytest.mark.parametrize("make", ["slab", "cu_only"])
def test_code_paths_agree(monkeypatch, make, cu_slab_co):
    """Image table versus direct offsets give the same energy, with four elements and with
    one."""
    import est_calc.dispersion as disp

    atoms = cu_slab_co if make == "slab" else _cu_only()
    ref = ours(atoms)
    for image in PATHS:
        monkeypatch.setattr(disp, "_IMAGE_TABLE_MIN", 0 if image else -10**9)
        got = ours(atoms)
        assert got[0] == pytest.approx(ref[0], abs=1e-10)
        np.testing.assert_allclose(got[2], ref[2], atol=1e-10)
        np.testing.assert_allclose(got[3], ref[3], atol=1e-12)


def test_code_paths_agree_on_a_batch(monkeypatch, cu_slab_co, triclinic_bulk):
    """Several structures in one batch: each energy as on its own, on every path."""
    import est_calc.dispersion as disp

    structures = [cu_cluster_co(), cu_slab_co, triclinic_bulk, _cu_only()]
    singles = [ours(a)[0] for a in structures]
    batch = AtomsBatch.from_atoms(structures, dtype=F64)
    for image in PATHS:
        monkeypatch.setattr(disp, "_IMAGE_TABLE_MIN", 0 if image else -10**9)
        out = DispersionD3("pbe")(batch)
        np.testing.assert_allclose(out.energy.numpy(), singles, rtol=0, atol=1e-10)
        sums = torch.zeros(4, dtype=F64).index_add(0, batch.system_idx, out.energies)
        np.testing.assert_allclose(sums.numpy(), singles, rtol=0, atol=1e-10)


@pytest.mark.parametrize("backend", ["auto", "torch", "vesin", "matscipy"])
def test_half_lists_hold_each_pair_once(backend, triclinic_bulk):
    """Against the full list: every pair once, its own images (i = j) included, for a cell
    thinner than the cutoff; the energy is the same with every backend."""
    from est_calc.dispersion import half_neighbor_list
    from est_calc.neighbors import neighbor_list

    batch = AtomsBatch.from_atoms(triclinic_bulk, dtype=F64)
    ei, sh = half_neighbor_list(batch, 7.0, backend)
    full_ei, full_sh = neighbor_list(batch.positions, batch.cell, batch.pbc, 7.0,
                                     system_idx=batch.system_idx, backend="torch")
    half = {(a, b, *s) for a, b, s in zip(*ei.tolist(), sh.tolist())}
    assert len(half) == ei.shape[1] == full_ei.shape[1] // 2
    both = half | {(b, a, *(-x for x in s)) for a, b, *s in half}
    assert both == {(a, b, *s) for a, b, s in zip(*full_ei.tolist(), full_sh.tolist())}
    assert any(a == b for a, b, *_ in half)
    d3 = DispersionD3("pbe", neighbor_backend=backend)
    assert float(d3(batch).energy[0]) == pytest.approx(ours(triclinic_bulk)[0], abs=1e-10)


def test_matches_s_dftd3(cu_slab_co, triclinic_bulk):
    """s-dftd3 (the dftd3 project's reference code, native periodic boundary conditions), where
    its Python API is installed (it is not a dependency: skipped elsewhere)."""
    interface = pytest.importorskip("dftd3.interface")
    for atoms in (cu_cluster_co(), cu_slab_co, triclinic_bulk):
        p = bj_parameters("pbe")
        param = interface.RationalDampingParam(s9=0.0, **p)
        periodic = bool(atoms.pbc.any())
        model = interface.DispersionModel(
            atoms.numbers, atoms.positions * AA2AU, atoms.cell.array * AA2AU if periodic else None,
            np.array(atoms.pbc) if periodic else None)
        model.set_realspace_cutoff(DEFAULT_CUTOFF_A * AA2AU, DEFAULT_CUTOFF_A * AA2AU,
                                   DEFAULT_CN_CUTOFF_A * AA2AU)
        res = model.get_dispersion(param, grad=True)
        e, _, forces, stress = ours(atoms)
        assert e == pytest.approx(res["energy"] * AU2EV, abs=1e-8)
        np.testing.assert_allclose(forces, -res["gradient"] * AU2EV * AA2AU, atol=1e-7)
        if periodic:
            np.testing.assert_allclose(stress, res["virial"] * AU2EV / atoms.get_volume(),
                                       atol=1e-8)


def test_batch_equals_single_calls(make_potential, cu_slab_co, triclinic_bulk):
    pot = make_potential()
    calc = ESTCalculator(pot, dtype="float64", device="cpu", dispersion="d3bj", functional="pbe")
    structures = [cu_cluster_co(), cu_slab_co, triclinic_bulk]
    batch = calc.calculate_batch(structures, ["energy", "forces", "stress"])
    for atoms, res in zip(structures, batch):
        calc.calculate(atoms, ["energy", "forces"] + (["stress"] if atoms.pbc.any() else []),
                       all_changes)
        assert res["energy"] == pytest.approx(calc.results["energy"], abs=1e-9)
        np.testing.assert_allclose(res["forces"], calc.results["forces"], atol=1e-9)
        if atoms.pbc.any():
            np.testing.assert_allclose(res["stress"], calc.results["stress"], atol=1e-10)


def test_skin_reuses_pairs_exactly(triclinic_bulk):
    d3 = DispersionD3("pbe", **SMALL)
    reused, fresh = D3PairList(d3.list_cutoff_A, 1.0), D3PairList(d3.list_cutoff_A, 0.0)
    atoms = triclinic_bulk.copy()
    rng = np.random.default_rng(0)
    for _ in range(4):
        atoms.positions += rng.uniform(-0.1, 0.1, atoms.positions.shape)
        batch = AtomsBatch.from_atoms(atoms, dtype=F64)
        e1 = float(d3(batch, reused(batch)).energy[0])
        e2 = float(d3(batch, fresh(batch)).energy[0])
        assert e1 == pytest.approx(e2, abs=1e-12)
    assert reused.n_builds == 1 and fresh.n_builds == 4


def test_twice_differentiable(triclinic_bulk):
    """Second derivatives (force training, Hessians): the autograd Hessian-vector product in
    positions and cell equals the finite difference of the gradient along the vector."""
    d3 = DispersionD3("pbe", cutoff_A=4.5, cn_cutoff_A=4.0)
    base = AtomsBatch.from_atoms(triclinic_bulk, dtype=F64)
    pairs = d3.pair_list(skin_A=0.5)(base)  # both cutoff masks on the way
    x0 = torch.cat([base.positions.reshape(-1), base.cell.reshape(-1)])
    n = base.positions.numel()

    def gradient(x, create_graph=False):
        x = x.detach().requires_grad_(True)
        batch = base.replace(positions=x[:n].reshape(-1, 3), cell=x[n:].reshape(1, 3, 3))
        (g,) = torch.autograd.grad(d3(batch, pairs).energy.sum(), x, create_graph=create_graph)
        return x, g

    v = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    x, g = gradient(x0, create_graph=True)
    (hv,) = torch.autograd.grad(g, x, grad_outputs=v)
    h = 1e-5
    fd = (gradient(x0 + h * v)[1] - gradient(x0 - h * v)[1]) / (2 * h)
    np.testing.assert_allclose(hv.numpy(), fd.numpy(), atol=1e-7)


def test_float32_close_to_float64(cu_slab_co):
    e64, _, f64, _ = ours(cu_slab_co)
    e32, _, f32, _ = ours(cu_slab_co, dtype=torch.float32)
    assert e32 == pytest.approx(e64, rel=1e-5)
    np.testing.assert_allclose(f32, f64, atol=1e-5)


def test_cuda_matches_cpu(torch_device, cu_slab_co, triclinic_bulk):
    for atoms in (cu_slab_co, triclinic_bulk, cu_cluster_co()):
        ref = ours(atoms)
        got = ours(atoms, device=torch_device)
        assert got[0] == pytest.approx(ref[0], abs=1e-9)
        np.testing.assert_allclose(got[2], ref[2], atol=1e-9)
        if ref[3] is not None:
            np.testing.assert_allclose(got[3], ref[3], atol=1e-10)


# ---------------------------------------------------------------------------- options
def test_parameters_from_the_library_table():
    p = bj_parameters("RPBE")
    assert p == pytest.approx({"s6": 1.0, "s8": 0.8318, "a1": 0.1820, "a2": 4.0094})
    assert "pbe" in functionals() and "rpbe" in functionals()


@pytest.mark.parametrize("name", ["nonsense-functional", "", "slaterdirac"])
def test_unknown_functional_is_refused(name):
    with pytest.raises(ValueError, match="pbe, rpbe"):
        bj_parameters(name)
    with pytest.raises(ValueError, match="functional"):
        DispersionD3(name)


def test_calculator_options_are_checked(make_potential):
    pot = make_potential()
    with pytest.raises(ValueError, match="no D3.BJ. parameters for functional 'pbx'.*pbe"):
        ESTCalculator(pot, device="cpu", dispersion="d3bj", functional="pbx")
    with pytest.raises(ValueError, match="needs functional"):
        ESTCalculator(pot, device="cpu", dispersion="d3bj")
    with pytest.raises(ValueError, match="pass dispersion='d3bj'"):
        ESTCalculator(pot, device="cpu", functional="pbe")
    with pytest.raises(ValueError, match="dispersion must be"):
        ESTCalculator(pot, device="cpu", dispersion="d4", functional="pbe")
    with pytest.raises(ValueError, match="differs"):
        ESTCalculator(pot, device="cpu", dispersion=DispersionD3("pbe"), functional="rpbe")
    with pytest.raises(UnknownArgumentError, match="dispersion"):
        ESTCalculator(pot, device="cpu", dispersoin="d3bj")
    calc = ESTCalculator(pot, device="cpu", dispersion="D3BJ", functional="rPBE")
    assert calc.dispersion.functional == "rpbe"
    assert ESTCalculator(pot, device="cpu").dispersion is None


def test_bad_cutoffs_are_refused():
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="cutoff_A"):
            DispersionD3("pbe", cutoff_A=bad)


def test_command_line_options(monkeypatch, tmp_path, capsys):
    from md_recipes import cli

    parser = cli.argparse.ArgumentParser()
    cli._add_calc_args(parser)
    args = parser.parse_args(["--dispersion", "D3BJ", "--functional", "rpbe"])
    assert (args.dispersion, args.functional) == ("d3bj", "rpbe")
    with pytest.raises(ValueError, match="needs --functional"):
        cli.check_dispersion("d3bj", None)
    with pytest.raises(ValueError, match="add --dispersion d3bj"):
        cli.check_dispersion(None, "pbe")
    with pytest.raises(ValueError, match="not --calc emt"):
        cli.check_dispersion("d3bj", "pbe", "emt")
    with pytest.raises(ValueError, match="no D3.BJ. parameters"):
        cli.check_dispersion("d3bj", "pbx")
    seen = {}

    class Fake:
        def __init__(self, model="default", **kw):
            seen.update(kw)

    import est_calc.calculator

    monkeypatch.setattr(est_calc.calculator, "ESTCalculator", Fake)
    cli.make_calculator("est", "cpu", 1.0, False, "d3bj", "rpbe")
    assert (seen["dispersion"], seen["functional"]) == ("d3bj", "rpbe")
    from md_recipes.relax import default_calculator

    default_calculator(dispersion="d3bj", functional="pbe")
    assert (seen["dispersion"], seen["functional"]) == ("d3bj", "pbe")
    # a bad option ends the command before the structure is read
    code = cli.main_relax([str(tmp_path / "missing.xyz"), "--dispersion", "d3bj"])
    assert code == 2
    assert "needs --functional" in capsys.readouterr().err
