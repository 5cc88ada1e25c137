"""DFT-D3(BJ) dispersion as a differentiable energy term over an :class:`AtomsBatch`.

The two-body DFT-D3 energy with Becke-Johnson (rational) damping (Grimme, Antony, Ehrlich,
Krieg, J. Chem. Phys. 132, 154104 (2010); Grimme, Ehrlich, Goerigk, J. Comput. Chem. 32, 1456
(2011)), in the atomic units of the reference implementation (Bohr, Hartree):

    CN_i  = sum_{j,T: 0 < r_ijT < R_cn} 1 / (1 + exp(-k1 (Rcov_i + Rcov_j) / r_ijT + k1)),  k1 = 16
    w_ia  = exp(-4 (CN_i - CNref_ia)^2) / sum_b exp(-4 (CN_i - CNref_ib)^2)
    C6_ij = sum_ab w_ia w_jb C6ref(Z_i, Z_j)_ab,     qq_ij = 3 Q_i Q_j,     C8_ij = qq_ij C6_ij
    R0_ij = a1 sqrt(qq_ij) + a2
    E     = -1/2 sum_{i,j,T: 0 < r_ijT < R_disp} [ s6 C6_ij / (r^6 + R0^6) + s8 C8_ij / (r^8 + R0^8) ]

where r_ijT = |r_j - r_i + T|, T runs over the lattice translations along the periodic axes
(the atom's own images included, T != 0 for i = j; none for a molecule), Q is the
<r^4>/<r^2> table and (a1, a2, s6, s8) are the BJ parameters of the DFT functional. Atom i's
share of the energy is half of each of its pair terms; the shares sum to E. The result is
returned in eV (E_h = ``AU2EV`` eV; positions enter in Bohr, 1 Å = ``AA2AU`` Bohr; both are the
CODATA 2014 constants of tad-mctc, the ones tad-dftd3 uses).

Everything tabulated comes from tad-dftd3 (the dftd3 project's PyTorch implementation): the
reference C6 coefficients and coordination numbers, the covalent radii, Q, the functional's BJ
parameters (its copy of s-dftd3's parameter table), the counting, weighting and damping
functions. tad-dftd3 evaluates finite systems with dense N x N pair matrices; the lattice sum
over T, the pair list (each pair once) and the per-edge evaluation are est_calc's, so that
periodic and mixed-periodic (slab) cells cost O(N) and run on any device.

The three-body (Axilrod-Teller-Muto) term is not included: "d3bj" is the two-body D3(BJ)
energy (what Grimme's dftd3 program computes without ``-abc``, and VASP's IVDW = 12);
s-dftd3's and tad-dftd3's parameter tables switch it on by default (s9 = 1), so compare with
those libraries with ``s9 = 0``.

Equation -> code (:meth:`DispersionD3.forward`):

| equation                        | code                                                  |
|---------------------------------|-------------------------------------------------------|
| r_j + T - r_i, each pair once   | ``images[:, image] + neg_pos[:, i]`` (:class:`D3Pairs`) |
| CN_i                            | ``sigmoid(k1 Rcov / r - k1)``, ``index_add`` to i, j  |
| w_ia                            | ``tad_dftd3.model.weight_references``                 |
| C6_ij = w_i^T C6ref w_j         | ``sum_b (w C6ref)_b[i] w_b[j]``                       |
| pair term, halves to i and j    | ``e = c6 * damp``, ``index_add`` to i and j           |

Forces and stress are not computed here: the term is a function of the positions and the cell,
and :func:`est_calc.forces.energy_forces_stress` differentiates it together with the model
(``extra_energy``).

Cutoffs (Å; pairs strictly closer count): ``cutoff_A`` for the pair energy and ``cn_cutoff_A``
for the coordination number. s-dftd3's defaults, 60 and 40 Bohr (31.75 and 21.17 Å), mean
about 11,000 and 3,400 neighbours per atom in a close-packed metal, some 100 times the model's
own pairs, so the defaults here are shorter (:data:`DEFAULT_CUTOFF_A`); ``DispersionD3(...,
cutoff_A=60 / AA2AU, cn_cutoff_A=40 / AA2AU)`` gives s-dftd3's.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from est_calc.batch import AtomsBatch

__all__ = ["AA2AU", "AU2EV", "DEFAULT_CN_CUTOFF_A", "DEFAULT_CUTOFF_A", "DISPERSION_METHODS",
           "D3PairList", "D3Pairs", "DispersionD3", "DispersionEnergy", "bj_parameters",
           "functionals", "half_neighbor_list"]

#: Dispersion corrections ESTCalculator knows by name.
DISPERSION_METHODS = ("d3bj",)

#: Pair-energy cutoff, Å. Against s-dftd3's cutoffs (60 / 40 Bohr) the energy misses the r^-6
#: tail beyond it, nearly uniform per atom: rattled fcc Cu (108 atoms, PBE) +19.5 meV/atom of
#: -590, forces within 0.3 meV/Å, stress within 0.55 GPa of the D3 stress of 8.4 GPa; a
#: CO/Cu(111) slab (66 atoms) +6.3 meV/atom, forces within 1.6 meV/Å; the D3 part of the CO
#: adsorption energy there -0.269 eV instead of -0.277 eV. Molecules smaller than the cutoff:
#: exact. (At 12 Å: +11.0 and +3.1 meV/atom, 0.07 and 0.5 meV/Å, 0.31 GPa.)
DEFAULT_CUTOFF_A = 10.0
#: Coordination-number cutoff, Å. The counting function has decayed to its e^-16 floor per
#: neighbour long before: 10 Å and 21.17 Å (s-dftd3's) give energies within 2e-6 eV/atom (Cu,
#: CO/Cu(111), a periodic ethanol-water cell).
DEFAULT_CN_CUTOFF_A = 10.0

#: Pair vectors from a table of periodic images while (images x atoms) is at most this times
#: the pairs plus _IMAGE_TABLE_MIN.
_IMAGE_TABLE_RATIO = 4
_IMAGE_TABLE_MIN = 2**16
_K1 = 16.0  # steepness of the D3 counting function (tad_mctc.ncoord.defaults.KCN_D3)


def _units() -> tuple[float, float]:
    from tad_mctc.units import AA2AU, AU2EV

    return float(AA2AU), float(AU2EV)


#: Bohr per Å and eV per Hartree: tad-mctc's CODATA 2014 values (ASE uses CODATA 2014 as well).
AA2AU, AU2EV = _units()


def _parameter_table() -> dict:
    """s-dftd3's parameter table as shipped inside tad-dftd3."""
    from importlib.resources import files

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    with (files("tad_dftd3.param") / "parameters.toml").open("rb") as fh:
        return tomllib.load(fh)


def functionals() -> list[str]:
    """Names of the functionals with D3(BJ) parameters in tad-dftd3's table (lower case)."""
    table = _parameter_table()["parameter"]
    return sorted(name for name, entry in table.items() if "bj" in entry.get("d3", {}))


def bj_parameters(functional: str) -> dict[str, float]:
    """The D3(BJ) parameters ``s6, s8, a1, a2`` (a2 in Bohr) of ``functional``.

    Names are looked up as s-dftd3 does (case and hyphens ignored, its aliases resolved, e.g.
    "PBE", "rPBE", "b3lyp5" -> "b3lyp").

    Raises:
        ValueError: a functional without D3(BJ) parameters; the message names some valid ones.
    """
    from tad_dftd3.param import get_functional_params

    try:
        if not isinstance(functional, str) or not functional.strip():
            raise KeyError(functional)
        param = get_functional_params(functional.strip(), damping="bj", dtype=torch.float64,
                                      device=torch.device("cpu"))
    except (KeyError, ValueError):
        names = functionals()
        common = [n for n in ("pbe", "rpbe", "revpbe", "pbesol", "b3lyp", "pbe0", "r2scan",
                              "scan", "tpss", "b97d") if n in names]
        raise ValueError(
            f"no D3(BJ) parameters for functional {functional!r}; tad-dftd3 has them for "
            f"{len(names)} functionals, e.g. {', '.join(common)} (all: "
            "est_calc.dispersion.functionals())") from None
    out = {key: float(param[key]) for key in ("a1", "a2", "s8")}
    out["s6"] = float(param.get("s6", 1.0))
    return out


class DispersionEnergy(NamedTuple):
    """Output of :class:`DispersionD3`: ``energy`` (n_systems,) and ``energies`` (n_atoms,),
    eV, the per-atom shares summing to the system energies."""

    energy: Tensor
    energies: Tensor


class D3Pairs(NamedTuple):
    """Every pair of atoms closer than ``radius_A``, once (a half neighbour list).

    Attributes:
        i, j: (E,) int64 atoms of each pair; r_ij = pos[j] - pos[i] + shifts @ cell[system].
        shifts: (E, 3) int64 lattice shifts (zero along non-periodic axes).
        shift_table: (K, 3) int64, every shift in the box spanned by ``shifts``.
        image: (E,) int64, ``k * n_atoms + j`` with ``shift_table[k] == shifts``: the column
            of atom j's periodic image in a (3, K * n_atoms) table of image positions.
        radius_A: the pairs are those closer than this at the build, Å.
        n_atoms: atoms of the batch the list belongs to.
    """

    i: Tensor
    j: Tensor
    shifts: Tensor
    shift_table: Tensor
    image: Tensor
    radius_A: float
    n_atoms: int

    @classmethod
    def from_half_list(cls, edge_index: Tensor, shifts: Tensor, n_atoms: int,
                       radius_A: float) -> D3Pairs:
        """Pairs from a half list (``edge_index`` (2, E) and ``shifts`` (E, 3))."""
        i, j = edge_index[0], edge_index[1]
        dev = shifts.device
        if shifts.shape[0]:
            lo, hi = (t.tolist() for t in torch.aminmax(shifts, dim=0))
        else:
            lo = hi = [0, 0, 0]
        span = [b - a + 1 for a, b in zip(lo, hi)]
        axes = [torch.arange(a, a + n, device=dev) for a, n in zip(lo, span)]
        table = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
        # image = k n + j with k = sum_c (S_c - lo_c) stride_c, the row of S in the table
        stride = (span[1] * span[2], span[2], 1)
        base = sum(a * b for a, b in zip(lo, stride))
        k = shifts[:, 0] * stride[0] + shifts[:, 1] * stride[1] + shifts[:, 2]
        image = (k - base) * n_atoms + j
        return cls(i, j, shifts, table, image, float(radius_A), int(n_atoms))


def _half_list(edge_index: Tensor, shifts: Tensor) -> tuple[Tensor, Tensor]:
    """One edge of each pair of a full list: the first half when the list is in reversed-pair
    order (:func:`est_calc.neighbors.pairing.is_paired`), else the edges with i < j, or i == j
    and the first non-zero shift component positive."""
    from est_calc.neighbors.pairing import is_paired

    if is_paired(edge_index, shifts):
        half = edge_index.shape[1] // 2
        return edge_index[:, :half], shifts[:half]
    i, j = edge_index[0], edge_index[1]
    nz = shifts != 0
    first = nz.to(torch.int8).argmax(dim=1)  # 0 for all-zero rows, which never have i == j
    positive = shifts.gather(1, first[:, None]).squeeze(1) > 0
    keep = ((i < j) | ((i == j) & positive)).nonzero().squeeze(1)
    return edge_index[:, keep], shifts[keep]


def _vesin_half_list(prep) -> tuple[Tensor, Tensor]:
    """Each pair once, from vesin-torch's own half list (one call per system)."""
    from est_calc.neighbors._adapters import _collect, _import_vesin, _per_system

    vt = _import_vesin()
    calc = vt.NeighborList(cutoff=prep.cutoff, full_list=False)
    parts = []
    for s, idx in _per_system(prep):
        pos = prep.positions if idx is None else prep.positions[idx]
        try:
            i, j, sh = calc.compute(pos, prep.cell[s], prep.pbc[s], quantities="ijS", copy=True)
        except RuntimeError:  # some builds want the periodic flags on the CPU
            i, j, sh = calc.compute(pos, prep.cell[s], prep.pbc[s].cpu(), quantities="ijS",
                                    copy=True)
        ei = torch.stack([i.to(torch.int64), j.to(torch.int64)]).to(prep.device)
        if idx is not None:
            ei = idx[ei]
        parts.append((ei, sh.to(device=prep.device, dtype=torch.int64)))
    return _collect(parts, prep.device)


#: With backend "auto": one structure below this many atoms uses vesin's half list; anything
#: else the torch cell list (a mirrored half list, the faster one at D3's cutoffs for large
#: cells and for many structures at once).
_TORCH_LIST_MIN_ATOMS = 256


def half_neighbor_list(batch: AtomsBatch, cutoff_A: float, backend: str = "auto"):
    """Every pair of atoms of ``batch`` closer than ``cutoff_A``, once: ``(edge_index (2, E),
    shifts (E, 3))`` with r_ij = pos[j] - pos[i] + shifts @ cell, as
    :func:`est_calc.neighbors.neighbor_list` (same checks and errors) but without the reverse
    edges."""
    from est_calc.neighbors import neighbor_list
    from est_calc.neighbors._adapters import vesin_available
    from est_calc.neighbors._common import prepare

    if backend == "auto":
        small = (batch.n_systems == 1 and batch.n_atoms < _TORCH_LIST_MIN_ATOMS
                 and batch.device.type in ("cpu", "cuda"))
        backend = "vesin" if small and vesin_available() else "torch"
    if backend == "vesin":
        prep = prepare(batch.positions.detach(), batch.cell.detach(), batch.pbc, cutoff_A,
                       batch.system_idx)
        return _vesin_half_list(prep)
    ei, sh = neighbor_list(batch.positions.detach(), batch.cell.detach(), batch.pbc, cutoff_A,
                           system_idx=batch.system_idx, backend=backend)
    return _half_list(ei, sh)


class D3PairList:
    """Pairs for :class:`DispersionD3` (:class:`D3Pairs`), with a Verlet skin.

    The list holds every pair closer than ``cutoff_A + skin_A`` at the last build; it is rebuilt
    under the rules of :class:`~est_calc.neighbors.verlet.VerletNeighborList` (an atom moved by
    more than skin / 2, or the cell, pbc, atoms or layout changed). It is not filtered between
    builds: :class:`DispersionD3` applies its cutoffs to the distances it computes anyway.

    Args:
        cutoff_A: the largest cutoff of the dispersion term, Å.
        skin_A: Verlet skin, Å (0: rebuild on every call).
        backend: neighbour-list backend (:func:`est_calc.neighbors.neighbor_list`).
    """

    def __init__(self, cutoff_A: float, skin_A: float = 0.0, *, backend: str = "auto"):
        from est_calc.neighbors import resolve_backend
        from est_calc.neighbors.verlet import VerletNeighborList

        resolve_backend(backend)  # ValueError for unknown names
        self._verlet = VerletNeighborList(cutoff_A, skin_A, backend=backend)  # validates
        self.cutoff_A, self.skin_A, self.backend = float(cutoff_A), float(skin_A), backend

    @property
    def n_builds(self) -> int:
        """Number of neighbour searches so far."""
        return self._verlet.n_builds

    def __call__(self, batch: AtomsBatch) -> D3Pairs:
        """The pairs of ``batch`` (rebuilt when needed)."""
        v = self._verlet
        v.n_calls += 1
        if v._needs_rebuild(batch):
            radius = self.cutoff_A + self.skin_A
            ei, sh = half_neighbor_list(batch, radius, self.backend)
            pairs = D3Pairs.from_half_list(ei, sh, batch.n_atoms, radius)
            v.n_builds += 1
            if self.skin_A == 0.0:  # rebuilt on every call: nothing to keep
                return pairs
            v._graph = pairs
            v._ref = (batch.positions.detach().clone(), batch.cell.detach().clone(),
                      batch.pbc.clone(), batch.atomic_numbers.clone(), batch.system_idx.clone())
        return v._graph


class DispersionD3(torch.nn.Module):
    """Two-body DFT-D3(BJ) energy of every structure of a batch (module docstring for the
    maths), differentiable in positions and cell to any order, on any device.

    Args:
        functional: the DFT functional whose D3(BJ) parameters apply (:func:`bj_parameters`),
            normally the one that made the potential's training data.
        cutoff_A: pair-energy cutoff, Å (:data:`DEFAULT_CUTOFF_A`).
        cn_cutoff_A: coordination-number cutoff, Å (:data:`DEFAULT_CN_CUTOFF_A`).
        neighbor_backend: backend of the pair search.

    Raises:
        ValueError: an unknown functional, or a cutoff that is not positive and finite.

    The reference tables (C6 of every element pair, reference CNs, radii, Q) are loaded once
    and kept as float64 buffers; each call gathers the rows of the elements present. Energies
    are computed in the batch's dtype (the CN weights in float64, as tad-dftd3 does).
    """

    def __init__(self, functional: str, *, cutoff_A: float = DEFAULT_CUTOFF_A,
                 cn_cutoff_A: float = DEFAULT_CN_CUTOFF_A, neighbor_backend: str = "auto"):
        super().__init__()
        for name, value in (("cutoff_A", cutoff_A), ("cn_cutoff_A", cn_cutoff_A)):
            if isinstance(value, bool) or not (math.isfinite(float(value)) and value > 0):
                raise ValueError(f"DispersionD3: {name} must be positive and finite, got "
                                 f"{value!r}")
        self.functional = functional.strip().lower() if isinstance(functional, str) else functional
        self.param = bj_parameters(functional)
        self.cutoff_A, self.cn_cutoff_A = float(cutoff_A), float(cn_cutoff_A)
        self.neighbor_backend = neighbor_backend

        from tad_dftd3 import data
        from tad_dftd3.reference import Reference
        from tad_mctc.data import radii

        dd = {"dtype": torch.float64, "device": torch.device("cpu")}
        ref = Reference(**dd)
        self.register_buffer("c6_ref", ref.c6, persistent=False)  # (Z, Z, 7, 7) Hartree Bohr^6
        self.register_buffer("cn_ref", ref.cn, persistent=False)  # (Z, 7); -1 marks no reference
        self.register_buffer("rcov", radii.COV_D3(**dd), persistent=False)  # (Z,) Bohr
        self.register_buffer("r4r2", data.R4R2(**dd), persistent=False)  # (Z,) Q
        # Valid reference systems come first in each row of cn_ref (the rest are -1).
        self.register_buffer("n_ref", (ref.cn >= 0).sum(dim=-1), persistent=False)

    @property
    def list_cutoff_A(self) -> float:
        """Radius of the pair search, Å: the larger cutoff."""
        return max(self.cutoff_A, self.cn_cutoff_A)

    def pair_list(self, skin_A: float = 0.0) -> D3PairList:
        """A :class:`D3PairList` for this term's cutoffs."""
        return D3PairList(self.list_cutoff_A, skin_A, backend=self.neighbor_backend)

    def extra_repr(self) -> str:
        return (f"functional={self.functional!r}, cutoff_A={self.cutoff_A}, "
                f"cn_cutoff_A={self.cn_cutoff_A}")

    def check_species(self, atomic_numbers) -> None:
        """Raise ValueError for elements without D3 reference data (Z > 103 or Z < 1)."""
        z = torch.as_tensor(atomic_numbers)
        bad = (z < 1) | (z >= self.c6_ref.shape[0])
        if bool(bad.any()):
            raise ValueError(f"D3 has no reference data for atomic number(s) "
                             f"{sorted(set(z[bad].tolist()))} (it covers 1 to "
                             f"{self.c6_ref.shape[0] - 1})")

    def forward(self, batch: AtomsBatch, pairs=None) -> DispersionEnergy:
        """Dispersion energy (eV) of ``batch``.

        Args:
            batch: positions and cell in Å; gradients flow through both.
            pairs: :class:`D3Pairs` with each pair closer than :attr:`list_cutoff_A` once
                (from :meth:`pair_list`, built for these positions or within the skin of
                them; more distant pairs are allowed and ignored); None builds them.

        Returns:
            :class:`DispersionEnergy`: ``energy`` (n_systems,) and ``energies`` (n_atoms,), eV,
            in the batch's dtype.

        Raises:
            ValueError: ``pairs`` of another number of atoms, or searched to a radius shorter
                than :attr:`list_cutoff_A`.
        """
        from tad_dftd3.model import weight_references
        from tad_dftd3.reference import Reference

        if pairs is None:
            pairs = self.pair_list()(batch)
        if pairs.n_atoms != batch.n_atoms or pairs.radius_A < self.list_cutoff_A:
            raise ValueError(
                f"DispersionD3: pairs of {pairs.n_atoms} atoms within {pairs.radius_A:g} Å for a "
                f"batch of {batch.n_atoms} atoms and cutoffs up to {self.list_cutoff_A:g} Å; "
                "build them with DispersionD3.pair_list() for this batch")
        dev, dtype = batch.positions.device, batch.positions.dtype
        if self.c6_ref.device != dev:
            self.to(dev)
        numbers = batch.atomic_numbers
        n_atoms, n_sys = batch.n_atoms, batch.n_systems
        sel = torch.index_select  # its backward is index_add, much faster than indexing's

        # Species-level tables over the S elements present and the m reference systems the
        # richest of them has (the others' extra weights are zero): pair-type lookups.
        elements = torch.unique(numbers)
        s = int(elements.numel())
        m = int(self.n_ref[elements].max())
        kind = torch.searchsorted(elements, numbers)  # (N,) index into elements
        p = self.param
        q = self.r4r2[elements]
        qq = 3.0 * q[:, None] * q[None, :]  # (S, S)
        r0 = p["a1"] * torch.sqrt(qq) + p["a2"]
        rc = self.rcov[elements][:, None] + self.rcov[elements][None, :]
        # per pair type: k1 Rcov_ij, R0^6, R0^8, s8 qq (s6 is 1 for every functional but one)
        tab = torch.stack([_K1 * rc, r0**6, r0**8, p["s8"] * qq]).reshape(4, s * s).to(dtype)
        c6_block = self.c6_ref[elements][:, elements][..., :m, :m].to(dtype)  # (S, S, m, m)

        # Pair vectors, coordinates as rows (3, E): gathers and arithmetic on contiguous rows.
        i, j = pairs.i, pairs.j
        n_pairs = int(i.numel())
        pos = batch.positions * AA2AU
        cell = batch.cell * AA2AU
        neg_pos = (-pos).T  # (3, N): r_ij = image of j + (-r_i), whose backward needs no negation
        n_shifts = int(pairs.shift_table.shape[0])
        if n_shifts * n_atoms <= _IMAGE_TABLE_RATIO * n_pairs + _IMAGE_TABLE_MIN:
            # Every periodic image in the span of the shifts, (3, K * N): one gather per pair.
            offsets = torch.einsum("kc,scd->dks", pairs.shift_table.to(dtype), cell)
            images = (pos.T[:, None, :] + sel(offsets, 2, batch.system_idx)).reshape(3, -1)
            vec = sel(images, 1, pairs.image) + sel(neg_pos, 1, i)
        else:
            shifts = pairs.shifts.to(dtype)
            if n_sys == 1:
                offset = cell[0].T @ shifts.T
            else:
                offset = torch.einsum("ea,eab->be", shifts,
                                      sel(cell, 0, sel(batch.system_idx, 0, i)))
            vec = sel(pos.T, 1, j) + sel(neg_pos, 1, i) + offset
        r2 = (vec * vec).sum(dim=0)
        if s == 1:
            k1rc, r0_6, r0_8, s8qq = tab[:, 0]
            kind_j = None
        else:
            kind_j = sel(kind, 0, j)
            k1rc, r0_6, r0_8, s8qq = sel(tab, 1, sel(kind, 0, i) * s + kind_j)
        zero = torch.zeros((), dtype=dtype, device=dev)

        # Coordination numbers, each pair counted for both atoms:
        # 1 / (1 + exp(-k1 (Rcov/r - 1))) = sigmoid(k1 Rcov / r - k1).
        count = torch.sigmoid(k1rc * torch.rsqrt(r2) - _K1)
        if pairs.radius_A > self.cn_cutoff_A:  # else every pair is inside
            count = torch.where(r2 < (self.cn_cutoff_A * AA2AU) ** 2, count, zero)
        cn = torch.zeros(n_atoms, dtype=dtype, device=dev)
        cn = cn.index_add(0, i, count).index_add(0, j, count)

        # Reference weights (tad-dftd3's own function); C6_ij = w_i^T C6ref(Z_i, Z_j) w_j as
        # sum_b g_b[i, element of j] w_b[j] with g[a, t] = w_a^T C6ref(Z_a, element t): per
        # reference system b, two gathers from contiguous rows (m, N S) and (m, N).
        reference = Reference(cn=self.cn_ref, c6=self.c6_ref)
        w = weight_references(numbers, cn, reference)[:, :m]  # (N, m), batch dtype
        g = torch.einsum("na,ntab->bnt", w, sel(c6_block, 0, kind)).reshape(m, n_atoms * s)
        g, w_rows = g.contiguous(), w.T.contiguous()
        gi = i if kind_j is None else i * s + kind_j
        c6 = sel(g[0], 0, gi) * sel(w_rows[0], 0, j)
        for b in range(1, m):
            c6 = c6 + sel(g[b], 0, gi) * sel(w_rows[b], 0, j)

        r6 = r2 * r2 * r2
        damp = s8qq / (r6 * r2 + r0_8)
        damp = damp + 1.0 / (r6 + r0_6) if p["s6"] == 1.0 else damp + p["s6"] / (r6 + r0_6)
        e = c6 * damp  # minus the pair energy, Hartree
        if pairs.radius_A > self.cutoff_A:
            e = torch.where(r2 < (self.cutoff_A * AA2AU) ** 2, e, zero)
        e = e * (-0.5 * AU2EV)  # half to each atom, eV
        energies = torch.zeros(n_atoms, dtype=dtype, device=dev)
        energies = energies.index_add(0, i, e).index_add(0, j, e)
        if n_sys == 1:  # the same sum, whose backward needs no gather
            energy = 2.0 * e.sum().reshape(1)
        else:
            energy = torch.zeros(n_sys, dtype=dtype, device=dev).index_add(
                0, batch.system_idx, energies)
        return DispersionEnergy(energy=energy, energies=energies)
