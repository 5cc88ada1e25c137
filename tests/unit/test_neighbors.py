"""Neighbour lists against ASE: identical (i, j, shift) sets for every backend and geometry.

Pairs whose distance lies within 1e-9 Å of the cutoff may legitimately differ between
implementations (rounding of the last bit decides ``d < cutoff``); they are excluded from the
comparison on both sides. Hypothesis draws cells that are well conditioned enough for vesin and
matscipy (vesin can spin for a very long time on extremely flat non-periodic cells).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.neighborlist import neighbor_list as ase_neighbor_list
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from est_calc.batch import AtomsBatch
from est_calc.neighbors import Graph, build_graph, neighbor_list
from est_calc.neighbors._adapters import vesin_available
from est_calc.neighbors._common import prepare
from est_calc.neighbors._torch_cells import torch_neighbor_list

BACKENDS = ["torch", "matscipy"] + (["vesin"] if vesin_available() else [])
TIE_TOL = 1e-9


def _rows(i, j, shifts, keep=None) -> np.ndarray:
    """Sorted (i, j, Sx, Sy, Sz) rows as an int64 array."""
    a = np.concatenate([np.stack([np.asarray(i), np.asarray(j)], 1), np.asarray(shifts)], 1)
    a = a.astype(np.int64).reshape(-1, 5)
    if keep is not None:
        a = a[keep]
    return a[np.lexsort(a.T[::-1])]


def _not_tie(pos, cell, i, j, shifts, cutoff) -> np.ndarray:
    d = pos[np.asarray(j)] - pos[np.asarray(i)] + np.asarray(shifts) @ cell
    return np.abs(np.linalg.norm(d, axis=1) - cutoff) > TIE_TOL


def _ase_rows(pos, cell, pbc, cutoff):
    atoms = Atoms(numbers=np.ones(len(pos), dtype=int), positions=pos, cell=cell, pbc=pbc)
    i, j, s = ase_neighbor_list("ijS", atoms, cutoff)
    return _rows(i, j, s, _not_tie(pos, cell, i, j, s, cutoff))


def _our_rows(pos, cell, pbc, cutoff, backend, dtype=torch.float64, device="cpu"):
    ei, sh = neighbor_list(
        torch.tensor(pos, dtype=dtype, device=device), torch.tensor(cell, dtype=dtype),
        torch.tensor(pbc), cutoff, backend=backend,
    )
    assert ei.dtype == torch.int64 and sh.dtype == torch.int64
    assert ei.device.type == torch.device(device).type and sh.shape == (ei.shape[1], 3)
    i, j, s = ei[0].cpu().numpy(), ei[1].cpu().numpy(), sh.cpu().numpy()
    pos64 = torch.tensor(pos, dtype=dtype).double().numpy()
    return _rows(i, j, s, _not_tie(pos64, cell, i, j, s, cutoff))


@st.composite
def systems(draw):
    """A random triclinic cell, pbc mask, atoms (some far outside the cell) and cutoff."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    lengths = rng.uniform(1.5, 6.0, 3)
    cell = np.diag(lengths) + rng.uniform(-0.4, 0.4, (3, 3)) * lengths[:, None] * (1 - np.eye(3))
    pbc = np.array(draw(st.lists(st.booleans(), min_size=3, max_size=3)))
    n = draw(st.sampled_from([1, 2, 5, 12, 25]))
    frac = rng.uniform(0.0, 1.0, (n, 3))
    if draw(st.booleans()):  # atoms far outside the cell, on any axis
        frac += rng.integers(-4, 5, (n, 3)) * (rng.random((n, 3)) < 0.3)
    pos = frac @ cell
    if n > 2 and draw(st.booleans()):  # one isolated atom far away
        pos[-1] += np.array([40.0, -35.0, 30.0])
    heights = abs(np.linalg.det(cell)) / np.linalg.norm(
        np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1
    )
    cutoff = draw(st.floats(0.5, 3.0)) * heights.min()
    return pos, cell, pbc, cutoff


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(system=systems())
def test_matches_ase(backend, system):
    pos, cell, pbc, cutoff = system
    ref = _ase_rows(pos, cell, pbc, cutoff)
    got = _our_rows(pos, cell, pbc, cutoff, backend)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_atom_thin_cell_lists_its_images(backend):
    """One atom in a 1 Å cube with a 2.5 Å cutoff sees many of its own images, never itself."""
    pos, cell, pbc = np.zeros((1, 3)), np.eye(3), np.array([True, True, True])
    got = _our_rows(pos, cell, pbc, 2.5, backend)
    ref = _ase_rows(pos, cell, pbc, 2.5)
    np.testing.assert_array_equal(got, ref)
    expected = sum(1 for s in np.ndindex(5, 5, 5) if 0 < np.linalg.norm(np.array(s) - 2) < 2.5)
    assert len(got) == expected
    assert not (got[:, 2:] == 0).all(axis=1).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_periodic_zero_cell(backend):
    rng = np.random.default_rng(3)
    pos = rng.uniform(-3, 3, (30, 3))
    got = _our_rows(pos, np.zeros((3, 3)), np.array([False] * 3), 2.0, backend)
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    i, j = np.nonzero((d < 2.0) & ~np.eye(30, dtype=bool))
    np.testing.assert_array_equal(got, _rows(i, j, np.zeros((len(i), 3))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_and_empty(dtype):
    rng = np.random.default_rng(1)
    cell = np.diag([4.0, 5.0, 6.0])
    pos = rng.uniform(0, 1, (20, 3)) @ cell
    pos_seen = torch.tensor(pos, dtype=dtype).double().numpy()  # what the search works on
    ref = _ase_rows(pos_seen, cell, np.array([True] * 3), 3.0)
    got = _our_rows(pos, cell, [True] * 3, 3.0, "torch", dtype)
    np.testing.assert_array_equal(got, ref)
    ei, sh = neighbor_list(torch.zeros((0, 3), dtype=dtype), torch.eye(3), [True] * 3, 3.0,
                           backend="torch")
    assert ei.shape == (2, 0) and sh.shape == (0, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_systems_equal_each_alone(backend):
    rng = np.random.default_rng(7)
    structs = []
    pbcs = [[True] * 3, [True, False, True], [False] * 3, [True, True, False]]
    for k, n in enumerate([6, 1, 15, 9]):
        cell = np.diag(rng.uniform(2.5, 5.0, 3)) + rng.uniform(-0.5, 0.5, (3, 3))
        pos = rng.uniform(-0.2, 1.2, (n, 3)) @ cell
        structs.append(Atoms(numbers=[1] * n, positions=pos, cell=cell, pbc=pbcs[k]))
    batch = AtomsBatch.from_atoms(structs)
    graph = build_graph(batch, 3.1, backend=backend)
    assert isinstance(graph, Graph) and graph.n_edges == graph.edge_index.shape[1]
    got = _rows(graph.edge_index[0], graph.edge_index[1], graph.shifts)
    offsets = np.cumsum([0] + [len(a) for a in structs])
    ref = []
    for k, a in enumerate(structs):
        i, j, s = ase_neighbor_list("ijS", a, 3.1)
        ref.append(_rows(i + offsets[k], j + offsets[k], s))
    ref = np.concatenate(ref)
    np.testing.assert_array_equal(got, _rows(ref[:, 0], ref[:, 1], ref[:, 2:]))
    # Atoms of different systems interleaved in system_idx give the same pairs.
    perm = torch.randperm(batch.n_atoms, generator=torch.Generator().manual_seed(0))
    ei, sh = neighbor_list(batch.positions[perm], batch.cell, batch.pbc, 3.1,
                           system_idx=batch.system_idx[perm], backend=backend)
    np.testing.assert_array_equal(_rows(perm[ei[0]], perm[ei[1]], sh), got)


def test_r_ij_convention():
    """r_ij = pos[j] - pos[i] + S @ cell gives vectors shorter than the cutoff (atoms outside)."""
    rng = np.random.default_rng(5)
    cell = np.array([[3.0, 0.0, 0.0], [1.2, 3.1, 0.0], [0.4, -0.7, 2.9]])
    pos = rng.uniform(-2, 3, (10, 3)) @ cell
    ei, sh = neighbor_list(torch.tensor(pos), torch.tensor(cell), [True] * 3, 4.0,
                           backend="torch")
    d = pos[ei[1]] - pos[ei[0]] + sh.numpy() @ cell
    assert np.all(np.linalg.norm(d, axis=1) < 4.0)
    atoms = Atoms(numbers=[1] * 10, positions=pos, cell=cell, pbc=True)
    assert len(d) == len(ase_neighbor_list("i", atoms, 4.0))


def test_graph_to_and_shape_checks():
    g = Graph(torch.zeros((2, 3), dtype=torch.int64), torch.zeros((3, 3), dtype=torch.int64))
    assert g.to("cpu").n_edges == 3
    with pytest.raises(ValueError, match="shifts"):
        Graph(torch.zeros((2, 3), dtype=torch.int64), torch.zeros((2, 3), dtype=torch.int64))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(positions=torch.tensor([[0.0, float("nan"), 0.0]])), "NaN or infinite"),
        (dict(positions=torch.tensor([[0.0, float("inf"), 0.0]])), "NaN or infinite"),
        (dict(cell=torch.diag(torch.tensor([1.0, 0.0, 1.0]))), "zero lattice vector"),
        (dict(cell=torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [0, 0, 1.0]])), "linearly dependent"),
        (dict(cutoff_A=-1.0), "cutoff"),
        (dict(positions=torch.zeros((4, 2))), "positions"),
        (dict(cell=torch.eye(2)), "cell"),
        (dict(pbc=[True, True]), "pbc"),
        (dict(system_idx=torch.zeros(3, dtype=torch.int64)), "system_idx"),
        (dict(backend="nope"), "backend"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(positions=torch.zeros((4, 3)), cell=torch.eye(3) * 3, pbc=[True] * 3,
                cutoff_A=2.0)
    args.update(kwargs)
    pos, cell, pbc, cut = (args.pop(k) for k in ("positions", "cell", "pbc", "cutoff_A"))
    with pytest.raises(ValueError, match=match):
        neighbor_list(pos, cell, pbc, cut, **args)


def test_zero_cell_allowed_on_non_periodic_axis():
    cell = torch.diag(torch.tensor([3.0, 0.0, 3.0]))
    pos = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    ei, sh = neighbor_list(pos, cell, [True, False, True], 1.5, backend="torch")
    assert ei.shape[1] == 2 and bool((sh == 0).all())


def test_torch_cluster_missing_names_extra():
    try:
        import torch_cluster  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"est_calc\[cluster\]"):
            neighbor_list(torch.zeros((2, 3)), torch.zeros(3, 3), [False] * 3, 1.0,
                          backend="torch_cluster")
    else:
        pytest.skip("torch_cluster is installed")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "matscipy"])
@settings(max_examples=20, deadline=None)
@given(system=systems())
def test_cuda_matches_ase(backend, system):
    pos, cell, pbc, cutoff = system
    got = _our_rows(pos, cell, pbc, cutoff, backend, device="cuda")
    np.testing.assert_array_equal(got, _ase_rows(pos, cell, pbc, cutoff))


@pytest.mark.parametrize("pbc", [[True, True, True], [True, False, True], [False, True, False]])
def test_torch_many_bins_matches_ase(pbc):
    """Hundreds of atoms in a skewed cell: many bins per axis, ghosts and bounding-box bins."""
    rng = np.random.default_rng(11)
    cell = np.array([[11.0, 0.0, 0.0], [3.5, 10.0, 0.0], [-2.0, 1.5, 9.0]])
    pos = rng.uniform(-0.1, 1.1, (400, 3)) @ cell
    pbc = np.array(pbc)
    ref = _ase_rows(pos, cell, pbc, 2.7)
    np.testing.assert_array_equal(_our_rows(pos, cell, pbc, 2.7, "torch"), ref)
    # Tiny chunks split the candidate rows everywhere; the pairs must not change.
    prep = prepare(torch.tensor(pos), torch.tensor(cell), torch.tensor(pbc), 2.7)
    ei, sh = torch_neighbor_list(prep, max_candidates=997)
    got = _rows(ei[0], ei[1], sh, _not_tie(pos, cell, ei[0], ei[1], sh.numpy(), 2.7))
    np.testing.assert_array_equal(got, ref)


def test_torch_dense_crystal_counts_and_symmetry():
    """fcc Cu: every atom has the same shell count and each pair (i, j, S) has (j, i, -S)."""
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((3, 4, 5))
    pos, cell = atoms.positions, atoms.cell.array
    ei, sh = neighbor_list(torch.tensor(pos), torch.tensor(cell), [True] * 3, 5.0,
                           backend="torch")
    # fcc shells within 5 Å at a = 3.61: 12 (2.55), 6 (3.61), 24 (4.42).
    assert np.all(np.bincount(ei[0].numpy(), minlength=len(atoms)) == 42)
    fwd = _rows(ei[0], ei[1], sh)
    back = _rows(ei[1], ei[0], -sh)
    np.testing.assert_array_equal(fwd, back)
    np.testing.assert_array_equal(fwd, _ase_rows(pos, cell, np.array([True] * 3), 5.0))


def test_auto_backend_choice_follows_the_measurements():
    from est_calc.neighbors import resolve_backend

    from est_calc.neighbors import VESIN_CPU_MAX_ATOMS, vesin_available

    # CPU: vesin measured faster for one small system, the torch cell list for large ones at
    # 6 Å and for batches (one vectorised call).
    small = "vesin" if vesin_available() else "torch"
    assert resolve_backend("auto", "cpu", 1, n_atoms=66) == small
    assert resolve_backend("auto", "cpu", 1, n_atoms=VESIN_CPU_MAX_ATOMS) == small
    assert resolve_backend("auto", "cpu", 1, n_atoms=VESIN_CPU_MAX_ATOMS + 1) == "torch"
    assert resolve_backend("auto", "cpu", 1) == "torch"          # size unknown
    assert resolve_backend("auto", "cpu", 8, n_atoms=66) == "torch"
    # Many systems on CUDA: one vectorised torch call instead of one vesin call per system.
    assert resolve_backend("auto", "cuda", 8) == "torch"
    with pytest.raises(ValueError, match="unknown neighbour-list backend"):
        resolve_backend("fastest")


# ------------------------------------------------------------------ cells too thin for the cutoff
def _sliver_cell(eps: float) -> np.ndarray:
    """a3 = a1 + a2 + eps z: a nearly singular cell whose heights are all about eps Å."""
    a1, a2 = np.array([2.5, 0.0, 0.0]), np.array([0.0, 2.5, 0.0])
    return np.stack([a1, a2, a1 + a2 + np.array([0.0, 0.0, eps])])


def _reported_height(message: str) -> float:
    import re

    found = re.search(r"height ([-+0-9.eE]+) Å", message)
    assert found, message
    return float(found.group(1))


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@pytest.mark.parametrize("eps", [1e-4, 1e-2])
def test_nearly_singular_cell_is_refused_at_once(backend, eps):
    """Without the check each backend ran for seconds to minutes (1e-4: over 200 s)."""
    import time

    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"cutoff 4\.2 Å") as err:
        neighbor_list(torch.zeros((1, 3), dtype=torch.float64), torch.tensor(_sliver_cell(eps)),
                      [True] * 3, 4.2, backend=backend)
    assert time.perf_counter() - start < 1.0
    assert _reported_height(str(err.value)) == pytest.approx(eps, rel=1e-2)
    assert "system 0" in str(err.value)


def test_thin_cell_in_a_batch_names_the_system():
    good = Atoms("H2", positions=[[0, 0, 0], [0.0, 0.0, 0.8]], cell=np.eye(3) * 5, pbc=True)
    thin = Atoms("H", positions=[[0, 0, 0]], cell=_sliver_cell(1e-3), pbc=True)
    batch = AtomsBatch.from_atoms([good, good, thin])
    with pytest.raises(ValueError, match=r"system 2: .*height .*cutoff 3 Å"):
        build_graph(batch, 3.0, backend="auto")


def test_too_many_neighbours_per_atom_is_refused():
    """A thousand atoms in a 2.5 x 2.5 x 0.1 Å box (few images, ~5e5 pairs per atom)."""
    pos = torch.rand((1000, 3), dtype=torch.float64) * torch.tensor([2.5, 2.5, 0.1])
    with pytest.raises(ValueError, match=r"neighbours per atom.*cutoff 4\.2 Å"):
        neighbor_list(pos, torch.diag(torch.tensor([2.5, 2.5, 0.1])), [True] * 3, 4.2,
                      backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cutoff", [6.0, 12.0])
def test_primitive_cell_with_a_large_cutoff_still_works(backend, cutoff):
    """One-atom fcc primitive cell: 343 images at 6 Å, 2,197 at 12 Å."""
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.61)
    pos, cell, pbc = atoms.positions, atoms.cell.array, np.array([True] * 3)
    got = _our_rows(pos, cell, pbc, cutoff, backend)
    np.testing.assert_array_equal(got, _ase_rows(pos, cell, pbc, cutoff))
    if cutoff == 6.0:  # shells at 2.55, 3.61, 4.42, 5.11, 5.71 Å: 12 + 6 + 24 + 12 + 24
        assert len(got) == 78


def test_large_supercell_and_thin_periodic_film_still_work():
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((8, 8, 8))  # 2,048 atoms
    ei, _ = neighbor_list(torch.tensor(atoms.positions), torch.tensor(atoms.cell.array),
                          [True] * 3, 6.0, backend="torch")
    assert np.all(np.bincount(ei[0].numpy(), minlength=len(atoms)) == 78)
    # One fcc (001) layer pair, 3-D periodic without vacuum: thinner than the cutoff along z.
    film = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((10, 10, 1))
    ei, _ = neighbor_list(torch.tensor(film.positions), torch.tensor(film.cell.array),
                          [True] * 3, 6.0, backend="torch")
    assert np.all(np.bincount(ei[0].numpy(), minlength=len(film)) == 78)


def test_cell_problem_reports_the_first_bad_system():
    """The shared validator (also used by ESTCalculator): None, or (system, reason)."""
    from est_calc.neighbors import cell_problem

    cell = torch.eye(3, dtype=torch.float64).repeat(4, 1, 1) * 10
    pbc = torch.ones((4, 3), dtype=torch.bool)
    counts = torch.full((4,), 66)
    assert cell_problem(cell, pbc, 6.0, counts) is None
    cell[1, 2] = cell[1, 0]
    cell[3] = torch.tensor(_sliver_cell(1e-3))
    system, reason = cell_problem(cell, pbc, 6.0, counts)
    assert system == 1 and "zero-volume" in reason and "linearly dependent" in reason
    system, reason = cell_problem(cell[2:], pbc[2:], 6.0, counts[2:])
    assert system == 1 and "height" in reason and "cutoff 6 Å" in reason
    # Non-periodic axes are not checked: a zero or tiny vector there is fine.
    pbc[:] = torch.tensor([True, True, False])
    assert cell_problem(cell[3:], pbc[3:], 6.0, counts[3:]) is None
