"""CapturedStep (est_calc.accel.graphs): the padded step is the unpadded one.

On the CPU the padded step runs eagerly (``capture=False``), the code a CUDA graph records: its
energy, per-atom energies, forces and stress equal ``energy_forces_stress`` of the unpadded
structure to 1e-12 in float64 (round-off in float32) for a bulk, a slab and a molecule, with the
shipped potential and two-layer models of either message block (accelerated or plain), with
paired and unpaired edge lists, whatever the padding. The capacities grow, refit and keep their
capture as the module docstring says. The captured replays themselves run where CUDA is
(``pytest -m gpu``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk, molecule
from ase.md.verlet import VelocityVerlet

from est_calc.accel import accelerate
from est_calc.accel.graphs import CapturedStep
from est_calc.batch import AtomsBatch
from est_calc.calculator import ESTCalculator, _check_cuda_graph
from est_calc.forces import energy_forces_stress
from est_calc.neighbors import build_graph
from est_calc.potential import load_potential

F64, F32 = torch.float64, torch.float32


def on_cuda(test):
    """Run ``test`` only where CUDA is (``pytest -m gpu`` in the device session)."""
    test = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test)
    return pytest.mark.gpu(test)


@pytest.fixture(scope="module")
def shipped():
    """The shipped potential (SO(2) messages, two layers, ZBL), accelerated as the calculator
    runs it, per dtype."""
    return {dtype: accelerate(load_potential("est-emt-small", dtype=dtype), inference=True)
            for dtype in (F64, F32)}


@pytest.fixture
def models(shipped, make_potential):
    """name -> float64 potential: the shipped one, an untrained two-layer model with the
    full-EST message block (accelerated) and a plain two-layer SO(2) one (not accelerated)."""
    return {"shipped": shipped[F64],
            "two-layer-est": accelerate(make_potential(message="est", n_layers=2),
                                        inference=True),
            "two-layer-so2-plain": make_potential(message="so2", n_layers=2)}


def _cu_bulk(n_rep=2, seed=0):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(n_rep)
    atoms.numbers[3] = 6  # a second species
    atoms.rattle(0.08, seed=seed)
    return atoms


def _molecule():
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.03, seed=4)
    return atoms


@pytest.fixture
def structures(cu_slab_co):
    """name -> (atoms, stress wanted)."""
    return {"bulk": (_cu_bulk(), True), "slab": (cu_slab_co, True),
            "molecule": (_molecule(), False)}


def _inputs(atoms, potential, paired=True, device="cpu"):
    dtype = potential.dtype
    batch = AtomsBatch.from_atoms(atoms, device=device, dtype=dtype)
    graph = build_graph(batch, potential.cutoff_A, backend="torch", paired=paired)
    return batch, graph


def _assert_same(got, ref, rel):
    for key in ("energy", "energies", "forces", "stress"):
        a, b = getattr(got, key), getattr(ref, key)
        if b is None:
            assert a is None, key
            continue
        assert a.shape == b.shape, key
        scale = max(1.0, float(b.abs().max()))
        err = float((a - b).abs().max())
        assert err <= rel * scale, f"{key}: max |diff| {err:.2e} (scale {scale:.2e})"


def _check(step, potential, atoms, stress, rel, paired=True, device="cpu"):
    batch, graph = _inputs(atoms, potential, paired, device)
    ref = energy_forces_stress(potential, batch, graph, compute_stress=stress)
    got = step(batch, graph, compute_stress=stress)
    _assert_same(got, ref, rel)
    return got, ref


@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize("name", ["bulk", "slab", "molecule"])
@pytest.mark.parametrize("model", ["shipped", "two-layer-est", "two-layer-so2-plain"])
def test_padded_step_equals_the_unpadded_one_in_float64(model, name, paired, structures,
                                                        models):
    potential = models[model]
    atoms, stress = structures[name]
    step = CapturedStep(potential, capture=False)
    got, _ = _check(step, potential, atoms, stress, 1e-12, paired)
    n_atoms, n_edges = step.capacity
    assert n_atoms == len(atoms) + 2 and n_edges > 0
    assert got.forces.abs().max() > 1e-3  # a real force field, not zeros on both sides


@pytest.mark.parametrize("name", ["bulk", "slab", "molecule"])
def test_padded_step_equals_the_unpadded_one_in_float32(name, structures, shipped):
    atoms, stress = structures[name]
    _check(CapturedStep(shipped[F32], capture=False), shipped[F32], atoms, stress, 2e-5)


@pytest.mark.parametrize("headroom", [1.0, 4.0])
def test_the_amount_of_padding_does_not_matter(headroom, shipped):
    potential, atoms = shipped[F64], _cu_bulk()
    step = CapturedStep(potential, capture=False, headroom=headroom)
    _, graph = _inputs(atoms, potential)
    _check(step, potential, atoms, True, 1e-12)
    assert step.capacity[1] >= headroom * graph.n_edges


def test_an_atom_without_neighbours_and_a_structure_without_edges(shipped):
    potential = shipped[F64]
    pair = Atoms("CuO", positions=[[0, 0, 0], [1.9, 0, 0]], cell=[30, 30, 30], pbc=True)
    lone = Atoms("CuCuO", positions=[[0, 0, 0], [1.9, 0, 0], [15, 15, 15]],
                 cell=[30, 30, 30], pbc=True)
    step = CapturedStep(potential, capture=False)
    got, _ = _check(step, potential, lone, True, 1e-12)
    assert float(got.forces[2].abs().max()) == 0.0
    gas = Atoms("CuO", positions=[[0, 0, 0], [15, 15, 15]], cell=[30, 30, 30], pbc=True)
    _check(step, potential, gas, True, 1e-12)  # no real edge at all: pad edges only
    _check(step, potential, pair, True, 1e-12)


def test_capacities_grow_refit_and_keep_their_capture(shipped):
    potential = shipped[F64]
    step = CapturedStep(potential, capture=False)
    atoms = _cu_bulk()
    _check(step, potential, atoms, True, 1e-12)
    first = step.capacity
    assert step.n_captures == 1

    moved = atoms.copy()
    moved.rattle(0.02, seed=7)  # the same layout: no new capture
    _check(step, potential, moved, True, 1e-12)
    assert step.n_captures == 1 and step.capacity == first

    dense = atoms.copy()  # 0.85 x the lattice: the third shell comes inside the cutoff
    dense.set_cell(atoms.cell * 0.85, scale_atoms=True)
    _check(step, potential, dense, True, 1e-12)
    assert step.n_captures == 2 and step.capacity[1] >= 1.25 * first[1]
    assert step.capacity[0] == first[0]

    _check(step, potential, atoms, True, 1e-12)  # far below the grown capacity: refitted
    assert step.n_captures == 3 and step.capacity == first

    _check(step, potential, atoms, False, 1e-12)  # no stress: another graph
    assert step.n_captures == 4

    swapped = atoms.copy()  # other atomic numbers, the same species: buffers rewritten only
    swapped.numbers[[0, 5]] = [6, 6]
    _check(step, potential, swapped, False, 1e-12)
    assert step.n_captures == 4

    fewer = atoms[:-1]  # one atom less fits the capacity
    _check(step, potential, fewer, False, 1e-12)
    assert step.n_captures == 4 and step.capacity[0] == first[0]

    more = atoms.copy()  # a new species node, then more atoms than the capacity
    more.numbers[1] = 8
    _check(step, potential, more, False, 1e-12)
    assert step.n_captures == 5
    bigger = atoms.repeat((2, 1, 1))
    _check(step, potential, bigger, False, 1e-12)
    assert step.n_captures == 6 and step.capacity[0] == len(bigger) + 2


@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize("model", ["shipped", "two-layer-est"])
def test_the_padded_step_reads_no_tensor_value_on_the_host(model, paired, models, monkeypatch):
    """What a CUDA graph records may not read a tensor value back to the host: on the "meta"
    device, which has no values, any such read raises. The padded step (forward, forces,
    stress) runs there once the two checks that step aside during a capture do so and the
    attention's logit bound, cached by the warm-up passes before a capture, is given."""
    import copy

    import est_calc.forces
    import est_calc.nn.embedding
    from est_calc.accel.so2_message import FastSO2MessageBlock
    from est_calc.neighbors import Graph

    def volumes(cell):  # _check_volumes while capturing
        a, b, c = cell.detach().unbind(-2)
        return (a * torch.linalg.cross(b, c, dim=-1)).sum(-1).abs()

    monkeypatch.setattr(est_calc.nn.embedding, "check_atomic_numbers", lambda z: None)
    monkeypatch.setattr(est_calc.forces, "_check_volumes", volumes)
    monkeypatch.setattr(FastSO2MessageBlock, "_logit_bound", lambda self: 1.0)
    atoms = _cu_bulk()
    batch, graph = _inputs(atoms, models[model], paired)
    step = CapturedStep(copy.deepcopy(models[model]).to("meta"), capture=False)
    step._build(step._fit(len(atoms), graph.n_edges, paired, 2, True))
    step._set_atoms(atoms.numbers, np.unique(atoms.numbers))
    step._set_inputs(batch.to(device="meta"),
                     Graph(graph.edge_index.to("meta"), graph.shifts.to("meta"), paired))
    out = step._run()
    assert out.forces.device.type == "meta" and out.stress.shape == (1, 3, 3)
    assert out.forces.shape == (len(atoms) + 2, 3)


def test_padded_calculator_follows_the_eager_md():
    """ESTCalculator serves ``calculate`` through its captured step (here the padded eager one,
    set by hand as the CPU has no graphs): an MD run with a Verlet skin matches the eager
    calculator's forces and stress at every step, with one layout for the whole run."""
    potential = load_potential("est-emt-small", dtype=F64)
    graph_calc = ESTCalculator(potential, device="cpu", dtype="float64", skin=1.0)
    graph_calc.captured_step = CapturedStep(graph_calc.potential, capture=False)
    eager = ESTCalculator(potential, device="cpu", dtype="float64", skin=1.0)
    atoms = _cu_bulk()
    rng = np.random.default_rng(3)
    atoms.set_velocities(rng.normal(scale=0.02, size=(len(atoms), 3)))
    atoms.calc = graph_calc
    dyn = VelocityVerlet(atoms, timestep=2.0 * units.fs)
    for _ in range(4):
        dyn.run(1)
        probe = atoms.copy()
        probe.calc = eager
        np.testing.assert_allclose(atoms.get_forces(), probe.get_forces(), rtol=0, atol=1e-11)
        np.testing.assert_allclose(atoms.get_stress(), probe.get_stress(), rtol=0, atol=1e-13)
        assert abs(atoms.get_potential_energy() - probe.get_potential_energy()) < 1e-10
    assert graph_calc.captured_step.n_captures == 1
    assert graph_calc.neighbor_list.n_builds == 1


def test_cuda_graph_is_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        ESTCalculator(load_potential("est-emt-small"), device="cpu", cuda_graph=True)
    cuda = torch.device("cuda")  # the checks themselves touch no device
    with pytest.raises(ValueError, match="low_memory"):
        _check_cuda_graph(True, cuda, True, None)
    with pytest.raises(ValueError, match="dispersion"):
        _check_cuda_graph(True, cuda, False, object())
    with pytest.raises(ValueError, match="True or False"):
        _check_cuda_graph("yes", cuda, False, None)
    _check_cuda_graph(False, torch.device("cpu"), True, object())


def test_capture_needs_cuda_and_sane_capacities(shipped):
    with pytest.raises(ValueError, match="CUDA device"):
        CapturedStep(shipped[F64], capture=True)
    for kwargs in ({"headroom": 0.5}, {"growth": 1.0}, {"warmup": 0}):
        with pytest.raises(ValueError):
            CapturedStep(shipped[F64], capture=False, **kwargs)


def test_one_structure_per_call_in_eval_mode(shipped, cu_slab_co):
    potential = shipped[F64]
    step = CapturedStep(potential, capture=False)
    batch = AtomsBatch.from_atoms([cu_slab_co, _molecule()], dtype=F64)
    graph = build_graph(batch, potential.cutoff_A)
    with pytest.raises(ValueError, match="one structure"):
        step(batch, graph)


# ----------------------------------------------------------------------------- CUDA graphs


@on_cuda
@pytest.mark.parametrize("dtype, atol", [(F64, 1e-10), (F32, 2e-4)])
@pytest.mark.parametrize("paired", [True, False])
def test_captured_replays_equal_the_eager_step_on_cuda(dtype, atol, paired, cu_slab_co):
    potential = accelerate(load_potential("est-emt-small", device="cuda", dtype=dtype),
                           inference=True)
    step = CapturedStep(potential)
    assert step.captures
    cases = [(_cu_bulk(3, seed=s), True) for s in range(3)]
    cases += [(cu_slab_co, True), (_molecule(), False)]
    for atoms, stress in cases:
        _check(step, potential, atoms, stress, atol, paired, device="cuda")
    assert step.n_captures == 3  # the bulk three times in one capture, then slab and molecule
    assert step.captures and step.failure is None  # every call was a replay


@on_cuda
@pytest.mark.parametrize("dtype, atol", [("float64", 1e-10), ("float32", 2e-4)])
def test_cuda_graph_calculator_md_matches_eager(dtype, atol):
    potential = load_potential("est-emt-small", device="cuda")
    graph_calc = ESTCalculator(potential, device="cuda", dtype=dtype, skin=1.0, cuda_graph=True)
    eager = ESTCalculator(potential, device="cuda", dtype=dtype, skin=1.0)
    atoms = _cu_bulk(3)
    rng = np.random.default_rng(5)
    atoms.set_velocities(rng.normal(scale=0.02, size=(len(atoms), 3)))
    atoms.calc = graph_calc
    dyn = VelocityVerlet(atoms, timestep=2.0 * units.fs)
    for _ in range(5):
        dyn.run(2)
        probe = atoms.copy()
        probe.calc = eager
        np.testing.assert_allclose(atoms.get_forces(), probe.get_forces(), rtol=0, atol=atol)
        np.testing.assert_allclose(atoms.get_stress(), probe.get_stress(), rtol=0, atol=atol)
    assert graph_calc.captured_step.n_captures == 1
    assert graph_calc.captured_step.captures and graph_calc.captured_step.failure is None
    dense = atoms.copy()  # more edges than the capacity: captured again, still the eager forces
    dense.set_cell(atoms.cell * 0.85, scale_atoms=True)
    dense.calc = graph_calc
    probe = dense.copy()
    probe.calc = eager
    np.testing.assert_allclose(dense.get_forces(), probe.get_forces(), rtol=0,
                               atol=atol * max(1.0, float(np.abs(probe.get_forces()).max())))
    assert graph_calc.captured_step.n_captures == 2
