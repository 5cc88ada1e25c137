"""ESTCalculator: a thin ASE adaptor over AtomsBatch, build_graph and energy_forces_stress.

The calculator converts ``ase.Atoms`` into an :class:`~est_calc.batch.AtomsBatch`, builds the graph
where the model runs, calls :func:`~est_calc.forces.energy_forces_stress` and fills ``results`` in
ASE units (eV, eV/Å, eV/Å^3, Voigt order xx yy zz yz xz xy). It holds no training code and no
model-type branches.

Caching is ASE's own: :meth:`Calculator.get_property` calls ``check_state`` and only runs
:meth:`ESTCalculator.calculate` when positions, numbers, cell, pbc (or the other ASE state) changed
or a property is missing from ``results``. Energy, per-atom energies and forces always come from
one pass; stress is computed only when asked for and only for periodic systems.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import inspect
import os
import warnings
from typing import Iterable, Sequence

import numpy as np
import torch
from ase.calculators.calculator import (
    Calculator,
    PropertyNotImplementedError,
    all_changes,
)
from ase.data import chemical_symbols
from ase.stress import full_3x3_to_voigt_6_stress

from est_calc.accel import ATTENTION_DTYPES, accelerate
from est_calc.batch import AtomsBatch
from est_calc.devices import resolve_device
from est_calc.forces import energy_forces_stress
from est_calc.neighbors import build_graph, cell_problem
from est_calc.potential import DefaultPotentialMissing, Potential, load_potential
from est_calc.uncertainty import (STD_PROPERTIES, check_committee, check_uncertainty_request,
                                  committee_forces_stress, committee_models, latent_forces_stress)

__all__ = ["ESTCalculator", "CloseContactWarning", "LegacyNormWarning", "CLOSE_CONTACT_A", "DefaultPotentialMissing", "UnknownArgumentError", "resolve_device",
           "resolve_dtype"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_NO_DEFAULT_MSG = (
    "ESTCalculator(): no default potential ships with this version of est_calc yet. Train one "
    "(`est train`) and pass its file, ESTCalculator('path/to/model.pt'), or pass a Potential, "
    "e.g. ESTCalculator(Potential.from_config('small', species=[...])) for an UNTRAINED model."
)


#: Keyword arguments of ase.calculators.calculator.Calculator that ESTCalculator passes on.
_ASE_CALCULATOR_KWARGS = ("restart", "ignore_bad_restart_file", "label", "atoms", "directory")


#: Interatomic distance (Å) below which a call warns, naming the atoms: no bond is this short
#: (H2 0.74 Å), so such a pair means overlapping atoms, a broken input or a run gone wrong; the
#: ZBL term of the potential (est_calc.nn.repulsion) is what acts on it.
CLOSE_CONTACT_A = 0.5
#: Distance (Å) below which two atoms count as coincident: refused (no force direction).
COINCIDENT_A = 1e-3


class CloseContactWarning(UserWarning):
    """Two atoms are closer than :data:`CLOSE_CONTACT_A`; the message names them."""


class LegacyNormWarning(UserWarning):
    """The potential normalises its l > 0 features separately (est_calc < 0.2): in float32 its
    forces on symmetric structures can be wrong by orders of magnitude."""


class UnknownArgumentError(TypeError, ValueError):
    """A keyword argument ESTCalculator does not know (a TypeError, as Python raises for an
    unexpected keyword, and a ValueError, as for the calculator's other bad options)."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """"float32" / "float64" (or the torch dtypes themselves)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def _check_keywords(kwargs: dict) -> None:
    """Raise UnknownArgumentError for keywords neither ESTCalculator nor ASE's Calculator takes."""
    unknown = [name for name in kwargs if name not in _ASE_CALCULATOR_KWARGS]
    if not unknown:
        return
    params = inspect.signature(ESTCalculator.__init__).parameters.values()
    valid = [p.name for p in params if p.name != "self"
             and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    valid += list(_ASE_CALCULATOR_KWARGS)
    named = []
    for name in unknown:
        close = difflib.get_close_matches(name, valid, n=1)
        named.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    raise UnknownArgumentError(
        f"ESTCalculator() got unknown keyword argument{'s' if len(unknown) > 1 else ''} "
        f"{', '.join(named)}; valid keyword arguments: {', '.join(valid)}"
    )


_OOM_PHRASES = ("can't allocate memory", "cannot allocate memory", "could not allocate",
                "not enough memory", "out of memory")


def _is_out_of_memory(err: RuntimeError) -> bool:
    """True for torch's CUDA OutOfMemoryError and the CPU allocator's allocation failures."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    if isinstance(err, oom):
        return True
    text = str(err).lower()
    return any(phrase in text for phrase in _OOM_PHRASES)


def _dispersion_term(dispersion, functional, neighbor_backend: str, device: torch.device):
    """The DispersionD3 that ``dispersion`` and ``functional`` ask for, on ``device``, or None.

    Raises:
        ValueError: an unknown method or functional, a functional without a dispersion method,
            a method without a functional, or a DispersionD3 with a different functional.
    """
    from est_calc.dispersion import DISPERSION_METHODS, DispersionD3

    if dispersion is None:
        if functional is not None:
            raise ValueError(
                f"functional={functional!r} selects the parameters of a dispersion correction; "
                f"pass dispersion='d3bj' with it (or leave both out)")
        return None
    if isinstance(dispersion, DispersionD3):
        if functional is not None and str(functional).strip().lower() != dispersion.functional:
            raise ValueError(f"functional={functional!r} differs from the DispersionD3's own "
                             f"({dispersion.functional!r}); give one or the other")
        if dispersion.c6_ref.device != device:
            dispersion = copy.deepcopy(dispersion)
        return dispersion.to(device)
    if not isinstance(dispersion, str) or dispersion.strip().lower() not in DISPERSION_METHODS:
        raise ValueError(f"dispersion must be None, one of {list(DISPERSION_METHODS)} or an "
                         f"est_calc.dispersion.DispersionD3, got {dispersion!r}")
    if functional is None:
        raise ValueError(
            f"dispersion={dispersion!r} needs functional=..., the DFT functional the potential's "
            "training data were computed with, which selects the D3(BJ) parameters (e.g. "
            "'pbe' for Materials Project data, 'rpbe' for OC20)")
    return DispersionD3(functional, neighbor_backend=neighbor_backend).to(device)


def _check_cuda_graph(cuda_graph, device: torch.device, low_memory, dispersion) -> None:
    """Raise ValueError when ``cuda_graph=True`` cannot be honoured (ESTCalculator's Raises)."""
    if not isinstance(cuda_graph, bool):
        raise ValueError(f"cuda_graph must be True or False, got {cuda_graph!r}")
    if not cuda_graph:
        return
    if device.type != "cuda":
        raise ValueError(f"cuda_graph=True records CUDA graphs and needs a CUDA device; this "
                         f"calculator runs on {device} (leave cuda_graph off there)")
    if low_memory:
        raise ValueError("cuda_graph=True cannot be combined with low_memory=True (the graph "
                         "is for small and mid-sized structures; low_memory for the largest)")
    if dispersion is not None:
        raise ValueError("cuda_graph=True cannot be combined with a dispersion term (its pair "
                         "list is not captured); leave one of them out")


def _check_max_atoms(max_atoms, potential, committee, uncertainty, cuda_graph, dispersion):
    """``max_atoms`` checked: None, or a positive int for one eager potential."""
    if max_atoms is None:
        return None
    if isinstance(max_atoms, bool) or not isinstance(max_atoms, int) or max_atoms < 1:
        raise ValueError(f"max_atoms must be a positive number of atoms or None, got "
                         f"{max_atoms!r}")
    refused = [name for name, on in (
        ("a compiled package (LAMMPS: pair_style est chunk_atoms)",
         getattr(potential, "differentiates_itself", False)),
        ("a committee", committee is not None), ("uncertainty=True", uncertainty),
        ("cuda_graph=True", cuda_graph), ("dispersion", dispersion is not None)) if on]
    if refused:
        raise ValueError(f"max_atoms (evaluation in groups of atoms) does not combine with "
                         f"{', '.join(refused)}")
    return max_atoms


def _cached_package(model, device, dtype) -> str:
    """``compile="package"``: the path of the cached package of ``model`` for this dtype and
    device (:func:`est_calc.deploy.cache.cached_package`; exported on first use)."""
    if isinstance(model, (list, tuple)):
        raise ValueError("compile='package' runs one potential; a committee runs eagerly (or "
                         "export each member and pass the .pt2 files)")
    if isinstance(model, (str, os.PathLike)) and str(model).endswith(".pt2"):
        return str(model)  # already a package
    from est_calc.deploy.cache import cached_package

    dtype_name = str(resolve_dtype(dtype)).removeprefix("torch.")
    try:
        return str(cached_package(model, dtype_name, resolve_device(device).type))
    except TypeError as err:
        raise ValueError(str(err)) from None


def _load_package(model, device, dtype, *, compile: bool, low_memory: bool,
                  attention_precision: str, cuda_graph: bool = False):
    """The :class:`est_calc.deploy.DeployedPotential` of a ``.pt2`` path (the deployment package is
    imported only then), or None for any other model.

    Raises:
        FileNotFoundError, ValueError: as :func:`est_calc.deploy.load_package` (a foreign or
            mismatched file, another dtype or device); options a compiled package cannot honour.
    """
    deployed = getattr(model, "differentiates_itself", False)
    if not deployed and not (isinstance(model, (str, os.PathLike)) and str(model).endswith(".pt2")):
        return None
    refused = [name for name, on in (("compile=True", compile), ("low_memory=True", low_memory),
               ("cuda_graph=True", cuda_graph is True),
               (f"attention_precision={attention_precision!r}", attention_precision != "float32"))
               if on]
    if refused:
        raise ValueError(f"{', '.join(refused)} does not apply to a compiled package "
                         f"({str(model)!r}); leave it out")
    from est_calc.deploy.package import load_package

    device = None if device == "auto" else resolve_device(device)
    if not deployed:
        return load_package(model, device=device, dtype=resolve_dtype(dtype))
    if model.dtype != resolve_dtype(dtype) or (device is not None and device != model.device):
        raise ValueError(f"the package {model.path.name} runs in {model.dtype} on "
                         f"{model.device}; pass dtype and device accordingly")
    return model


def _check_atoms(atoms, potential: Potential, where: str = "") -> None:
    """Raise ValueError for input the model cannot evaluate (see ESTCalculator's Raises)."""
    if len(atoms) == 0:
        raise ValueError(f"ESTCalculator got an empty Atoms object{where} (no atoms to evaluate)")
    pos = atoms.get_positions()
    if not np.all(np.isfinite(pos)):
        bad = np.where(~np.isfinite(pos).all(axis=1))[0]
        raise ValueError(
            f"positions{where} contain NaN or infinite values (atoms {bad[:10].tolist()})"
        )
    cell = atoms.get_cell().array
    if not np.all(np.isfinite(cell)):
        raise ValueError(f"the cell{where} contains NaN or infinite values")
    # The neighbour list's own validator: zero-volume cells, and cells too thin or too dense for
    # the cutoff (whose search would not finish), refused here with the structure's index.
    problem = cell_problem(cell, atoms.get_pbc(), potential.cutoff_A, [len(atoms)])
    if problem is not None:
        raise ValueError(f"{problem[1]}{where}")
    try:
        potential.check_species(atoms.get_atomic_numbers())
    except ValueError as err:
        raise ValueError(f"{err}{where}") from None


def _checked_batch(atoms_list: Sequence, potential: Potential, device, dtype) -> AtomsBatch:
    """The batch of ``atoms_list``, checked as :func:`_check_atoms` checks one structure.

    The checks run once on the stacked arrays, not in a loop over structures; a structure that
    fails is handed to :func:`_check_atoms`, so the error message is the same and names its index.
    """
    pos, numbers, cells, pbcs = [], [], [], []
    for k, atoms in enumerate(atoms_list):
        if len(atoms) == 0:
            _check_atoms(atoms, potential, where=f" (structure {k})")
        pos.append(atoms.arrays["positions"])
        numbers.append(atoms.arrays["numbers"])
        cells.append(atoms.cell.array)
        pbcs.append(atoms.pbc)
    counts = np.array([len(p) for p in pos])
    cell, pbc = np.stack(cells), np.stack(pbcs)

    def fail(bad_atoms: np.ndarray | None = None, bad_systems: np.ndarray | None = None):
        k = (int(np.searchsorted(np.cumsum(counts), np.flatnonzero(bad_atoms)[0], side="right"))
             if bad_atoms is not None else int(np.flatnonzero(bad_systems)[0]))
        _check_atoms(atoms_list[k], potential, where=f" (structure {k})")
        raise ValueError(f"structure {k} cannot be evaluated")  # not reached: _check_atoms raised

    flat = np.concatenate(pos)
    finite = np.isfinite(flat).all(axis=1)
    if not finite.all():
        fail(bad_atoms=~finite)
    if not np.isfinite(cell).all():
        fail(bad_systems=~np.isfinite(cell).all(axis=(1, 2)))
    problem = cell_problem(cell, pbc, potential.cutoff_A, counts)
    if problem is not None:
        fail(bad_systems=np.arange(len(counts)) == problem[0])
    z = np.concatenate(numbers)
    known = np.isin(z, np.asarray(potential.species))
    if not known.all():
        fail(bad_atoms=~known)
    return AtomsBatch.from_arrays(pos, numbers, cells, pbcs, device=device, dtype=dtype)


class ESTCalculator(Calculator):
    """ASE calculator for EST potentials.

    Args:
        model: a registry name ("default" is the shipped default potential), a path to a
            potential file, or a :class:`~est_calc.potential.Potential`. A Potential that already
            has the requested device and dtype shares its weights with the calculator (it is
            switched to eval mode, and its later in-place weight changes are seen); otherwise the
            calculator works on a converted copy. Either way the calculator runs the inference
            acceleration of it (:func:`est_calc.accel.accelerate`), and the caller's modules are
            left as they are. A ``.pt2`` path is a deployment package (``est export``,
            :mod:`est_calc.deploy`): it runs in its own dtype and on its own device ("auto"
            picks it; another dtype or device is refused), without ``compile``, ``low_memory``
            or a reduced ``attention_precision``. A list of two or more names, paths or
            Potentials of one architecture and one set of elements is a committee
            (:func:`est_calc.uncertainty.committee_forces_stress`): results are the members'
            mean, at K times the cost of one.
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ..., or "mps"; a device
            this machine lacks is refused (:func:`est_calc.devices.resolve_device`).
        dtype: "float32" (default) or "float64" (finite-difference checks, tight relaxations).
        neighbor_backend: backend of :func:`est_calc.neighbors.neighbor_list` ("auto", "torch",
            "vesin", "matscipy", "torch_cluster").
        skin: Verlet skin in Å for ``calculate`` (MD, relaxations): pairs within cutoff + skin
            are stored and filtered by distance each call; the list is rebuilt only when an atom
            moved by more than skin / 2 or the cell, pbc or atoms changed. The pairs the model
            sees are exactly those of a fresh build (only their order differs). 0 (default)
            rebuilds on every call. ``calculate_batch`` keeps its own list (batched
            relaxations: rebuilt when any atom of the batch moved by more than skin / 2 or
            the set of structures changed).
        low_memory: recompute each layer's activations during the backward pass instead of
            storing them (same results; less peak memory for large cells, one more forward
            pass per layer).
        attention_precision: "float32" (default: the model's dtype), "bfloat16" or "float16"
            for the spherical-attention core only (tensor cores on GPUs); everything else keeps
            ``dtype``. Check the force change against the potential's validation error first.
        tune_malloc: on CPU, raise glibc's malloc thresholds once for this process so that each
            call's temporaries reuse memory instead of page-faulting fresh pages in (the process
            keeps up to 256 MiB of freed memory). Never overrides ``MALLOC_*`` variables or a
            preloaded allocator; ``EST_CALC_TUNE_MALLOC=0`` turns it off everywhere
            (:mod:`est_calc.allocator`).
        compile: True: run the network through ``torch.compile`` (one graph, dynamic atom and
            edge counts; see :meth:`est_calc.model.ESTModel.enable_compile`). Energies, forces
            and stress agree with the eager model to rounding (tested in float64). The first
            call compiles (minutes); meant for GPUs, where small systems are launch-bound.
            With ``low_memory=True`` the eager path runs. "package": run the potential (a
            registry name or a ``.pt`` file) as its AOTInductor package (``est export``),
            compiled once per potential, dtype, device, torch and est_calc version into a
            cache folder (:mod:`est_calc.deploy.cache`; about a minute the first time), with
            serial kernels (one thread, whatever ``threads`` says; for OpenMP kernels export
            with ``est export --openmp`` and pass the file): for a small molecule a step costs
            about a third of the eager one; for large systems the eager model, which uses
            every thread, is faster (benchmarks/RESULTS.md).
        cuda_graph: run ``calculate`` (one structure: MD, relaxations) as a replayed CUDA graph
            of the whole step, forward and force (and stress) backward, at padded atom and edge
            counts (:class:`est_calc.accel.graphs.CapturedStep`): for a small or mid-sized
            structure a GPU otherwise spends a step launching thousands of small kernels.
            Energies, forces and stress equal the eager ones to float round-off. The first call
            captures (a few eager passes, then the recording), and so does a call whose atom
            or edge count leaves the padded capacity (grown by at least 1.25x when exceeded)
            or whose number of species, edge pairing or stress request changes; give MD a
            ``skin`` so that the neighbour list, which runs outside the graph, is not rebuilt
            every step.
            ``calculate_batch`` keeps the eager path. Needs a CUDA device (refused on the CPU
            and MPS, where there is nothing to capture); cannot be combined with
            ``low_memory`` or ``dispersion``. With ``compile=True`` the compiled network is
            what the graph records. A capture that fails warns and runs the padded step eagerly
            from then on (``captured_step.failure`` says why).
        threads: intra-op threads of every call; None (default) chooses per call
            (:mod:`est_calc.threads`): one thread below ``PARALLEL_MIN_EDGES`` edges, else the
            CPUs this process may use, never more than ``torch.get_num_threads()``; with
            ``OMP_NUM_THREADS`` set, torch's count is left alone.
        dispersion: None (default) or "d3bj": add the two-body DFT-D3 dispersion energy with
            Becke-Johnson damping (:mod:`est_calc.dispersion`) to the potential's energy, in the
            same autograd pass, so forces and stress are derivatives of E_model + E_D3 and the
            per-atom ``energies`` include each atom's half of its D3 pair terms. A
            :class:`~est_calc.dispersion.DispersionD3` is taken as given (other cutoffs). Only
            meaningful for a potential trained on data without dispersion.
        functional: with ``dispersion="d3bj"`` (required there): the DFT functional of the
            potential's training data, which selects the D3(BJ) parameters, e.g. "pbe"
            (Materials Project) or "rpbe" (OC20); see
            :func:`est_calc.dispersion.functionals`.
        uncertainty: also return ``energy_std`` (eV) and per-atom ``forces_std`` (eV/Å) from
            the same pass (:mod:`est_calc.uncertainty`): a committee's spread, or a single
            potential's uncertainty part (its ``.uncertainty`` sidecar; no extra backward).
        max_atoms: None (default), or the most atoms the model sees at once in ``calculate``:
            a larger structure is evaluated in groups of at most ``max_atoms`` atoms, each with
            the atoms its energies depend on (:mod:`est_calc.chunks`), which bounds the peak
            memory of a large cell at the cost of the groups' halos; the results equal one
            evaluation's to round-off. For one eager potential (not with a committee,
            ``uncertainty``, ``cuda_graph`` or ``dispersion``; ``calculate_batch`` of several
            structures evaluates them at once).
        **kwargs: ASE's own :class:`ase.calculators.calculator.Calculator` arguments
            (``label``, ``directory``, ``atoms``, ``restart``, ``ignore_bad_restart_file``),
            passed on; any other name is refused.

    Raises:
        DefaultPotentialMissing: ``model="default"`` and no default potential ships (a
            FileNotFoundError whose message says so and what to do instead).
        FileNotFoundError: an unknown name or a missing file.
        UnknownArgumentError: an unknown keyword argument (a TypeError and a ValueError); the
            message names it, the closest valid name and every valid one.
        ValueError: an unreadable potential file, a bad dtype, device or neighbour backend, an
            unknown dispersion method or functional, a functional without ``dispersion``,
            ``dispersion`` without a functional, or ``cuda_graph=True`` off CUDA or with
            ``low_memory``, ``dispersion``, ``uncertainty`` or a committee; a committee of one
            member, or of differing architectures or elements; ``uncertainty=True`` for a
            potential without an uncertainty part.

    Attributes:
        potential: the :class:`Potential` that runs: the accelerated view
            (``accelerate(..., inference=True)``) of the one given or loaded.
        dispersion: the :class:`~est_calc.dispersion.DispersionD3` term, or None.
        committee: the members' accelerated views (the first is ``potential``), or None.
        committee_thresholds: a committee of files' flag thresholds {"max", "rms"} (eV/Å) from
            the ``.committee`` file fitted for exactly these members
            (:func:`est_calc.uncertainty.load_committee_thresholds`), else {}; the recipes'
            ``"auto"`` thresholds of a committee.
        n_model_calls: how many times the network ran (each ``calculate`` or
            ``calculate_batch`` pass adds one); makes ASE's caching observable.
        captured_step: the :class:`~est_calc.accel.graphs.CapturedStep` that serves
            ``calculate`` with ``cuda_graph=True``, else None (its ``n_captures`` counts the
            captures).
        neighbor_list: the :class:`~est_calc.neighbors.verlet.VerletNeighborList` of
            ``calculate`` when ``skin > 0`` (its ``n_builds`` counts the rebuilds), else None.
        batch_neighbor_list: the same for ``calculate_batch``.

    Evaluation raises ValueError, naming the problem, for an empty Atoms, NaN or infinite
    positions or cell, a zero-volume periodic cell, a cell too thin or too dense for the cutoff
    (:func:`est_calc.neighbors.cell_problem`: the message names the smallest perpendicular height
    and the cutoff), elements the potential does not know and coincident atoms (closer than
    1e-3 Å). Two atoms closer than 0.5 Å give a :class:`CloseContactWarning` naming them (once per
    set of such pairs, not every MD step). In float32, a potential with the pre-0.2 separate l > 0
    norm gives a :class:`LegacyNormWarning` when the calculator is made. Running out of memory (CUDA or
    CPU) raises MemoryError naming the number of atoms and edges and what to change; other
    errors pass through unchanged. An atom without neighbours gets its reference energy and
    zero force.

    Example:
        >>> from ase.build import fcc111
        >>> atoms = fcc111("Cu", (3, 3, 4), vacuum=10.0)
        >>> atoms.calc = ESTCalculator()           # doctest: +SKIP
        >>> atoms.get_potential_energy()           # doctest: +SKIP
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(
        self,
        model: str | Potential | Sequence[str | Potential] = "default",
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "float32",
        neighbor_backend: str = "auto",
        compile: bool = False,
        skin: float = 0.0,
        low_memory: bool = False,
        attention_precision: str = "float32",
        tune_malloc: bool = True,
        threads: int | None = None,
        dispersion=None,
        functional: str | None = None,
        cuda_graph: bool = False,
        uncertainty: bool = False,
        max_atoms: int | None = None,
        **kwargs,
    ):
        _check_keywords(kwargs)
        super().__init__(**kwargs)
        from est_calc.neighbors import resolve_backend

        resolve_backend(neighbor_backend)  # ValueError for unknown names, before any work
        if compile == "package":
            model = _cached_package(model, device, dtype)
            compile = False
        elif not isinstance(compile, bool):
            raise ValueError(f"compile must be False, True (torch.compile) or 'package' (a "
                             f"cached AOTInductor package), got {compile!r}")
        package = _load_package(model, device, dtype, compile=compile, low_memory=low_memory,
                                attention_precision=attention_precision, cuda_graph=cuda_graph)
        if package is not None:
            model, device = package, package.device
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        dispersion = _dispersion_term(dispersion, functional, neighbor_backend, self.device)
        _check_cuda_graph(cuda_graph, self.device, low_memory, dispersion)
        if tune_malloc and self.device.type == "cpu":
            from est_calc.allocator import tune_malloc as _tune_malloc

            _tune_malloc()
        committee = None
        if isinstance(model, (list, tuple)):
            committee = [self._load_one(m) for m in committee_models(model)]
            check_committee(committee, model)
        potential = committee[0] if committee else self._load_one(model)
        check_uncertainty_request(uncertainty, potential, committee, cuda_graph)
        self.uncertainty = uncertainty
        if uncertainty:
            self.implemented_properties = [*self.implemented_properties, *STD_PROPERTIES]
        config = getattr(potential.model, "config", None)
        if (self.dtype == torch.float32 and config is not None
                and getattr(config, "vector_norm", "joint") == "separate"):
            warnings.warn(
                "this potential normalises its l > 0 features on their own (written by est_calc "
                "< 0.2): in float32 its forces and stress on symmetric structures (ideal "
                "crystals) can be wrong by orders of magnitude; use dtype='float64' or fine-tune "
                "it (training_runs/upgrade_norm.py, then est train with train.init)",
                LegacyNormWarning, stacklevel=2)
        self._close_pairs: frozenset = frozenset()
        if attention_precision not in ATTENTION_DTYPES:
            raise ValueError(f"attention precision must be one of {sorted(ATTENTION_DTYPES)}, "
                             f"got {attention_precision!r}")
        self.attention_precision = attention_precision
        # Every speed-up, made once: a view of the potential that shares its parameters (the
        # caller's object is left as it is; est_calc.accel).
        def fast(member):
            member = accelerate(member, inference=True,
                                attention_dtype=ATTENTION_DTYPES[attention_precision])
            if compile:
                member.model.enable_compile()
            return member

        potential = fast(potential)
        self.committee = None if committee is None else [potential] + [
            fast(member) for member in committee[1:]]
        self._committee_files = (list(model) if committee is not None and all(
            isinstance(m, (str, os.PathLike)) for m in model) else None)
        self._committee_thresholds = None
        self.compile = bool(compile)
        self.potential = potential
        self.cuda_graph = bool(cuda_graph)
        self.captured_step = None
        if cuda_graph:
            from est_calc.accel.graphs import CapturedStep

            self.captured_step = CapturedStep(potential)
        self.neighbor_backend = neighbor_backend
        self.low_memory = bool(low_memory)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                    or threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        self.threads = threads
        self._last_n_edges = 0
        self.n_model_calls = 0
        from est_calc.neighbors.verlet import VerletNeighborList

        # Verlet skin, one list for single-structure calls (MD, relaxations) and one for
        # calculate_batch (batched relaxations): rebuilt only when an atom moved by more than
        # skin/2 or the cell or the structures changed; the pair set is always exact.
        # VerletNeighborList validates the skin (negative or NaN values raise there). Edges in
        # reversed-pair order (Graph.paired): the SO(2) blocks rotate half of them.
        def verlet_list():
            return (VerletNeighborList(self.cutoff_A, skin, backend=neighbor_backend, paired=True)
                    if skin != 0 else None)

        self.neighbor_list = verlet_list()
        self.batch_neighbor_list = verlet_list()
        self.dispersion = dispersion
        self.max_atoms = _check_max_atoms(max_atoms, potential, committee, uncertainty,
                                          cuda_graph, dispersion)
        self._dispersion_pairs = self._batch_dispersion_pairs = None
        if dispersion is not None:
            dispersion.check_species(potential.species)
            # Its own pair lists (each pair once, to its longer cutoff), with the same skin.
            self._dispersion_pairs = dispersion.pair_list(skin)
            self._batch_dispersion_pairs = dispersion.pair_list(skin)

    def _load_one(self, model) -> Potential:
        """The Potential (or deployment package) of one ``model`` argument, on the calculator's
        device and dtype, in eval mode."""
        if getattr(model, "differentiates_itself", False):
            potential = model  # a deployment package, checked by _load_package
        elif isinstance(model, Potential):
            potential = model
            if potential.dtype != self.dtype or potential.device != self.device:
                potential = copy.deepcopy(model).to(device=self.device, dtype=self.dtype)
        elif isinstance(model, torch.nn.Module):
            raise TypeError(
                f"model must be a registry name, a path or an est_calc Potential, got a "
                f"{type(model).__name__} (wrap an ESTModel with Potential(model, config, species))"
            )
        else:
            try:
                potential = load_potential(model, device=self.device, dtype=self.dtype)
            except DefaultPotentialMissing:
                raise
            except FileNotFoundError as err:
                if str(model) == "default":
                    raise DefaultPotentialMissing(_NO_DEFAULT_MSG) from None
                raise FileNotFoundError(str(err)) from None
            for p in potential.parameters():  # our own copy: no parameter gradients needed
                p.requires_grad_(False)
        potential.eval()
        return potential

    @property
    def committee_thresholds(self) -> dict:
        """A committee of files' flag thresholds (the class docstring); read, and the files
        hashed, on first use (a plain committee call never needs them)."""
        if self._committee_thresholds is None:
            self._committee_thresholds = {}
            if self._committee_files is not None:
                from est_calc.potential import _resolve
                from est_calc.uncertainty import load_committee_thresholds

                self._committee_thresholds, _ = load_committee_thresholds(
                    [_resolve(m) for m in self._committee_files])
        return self._committee_thresholds

    @property
    def cutoff_A(self) -> float:
        """Interaction cutoff of the potential, Å."""
        return float(self.potential.cutoff_A)

    def supported_elements(self) -> list[str]:
        """Chemical symbols of the elements the potential knows."""
        return [chemical_symbols[z] for z in self.potential.species]

    # ------------------------------------------------------------------ core
    def _predict(self, batch: AtomsBatch, stress_mask: Sequence[bool] | None,
                 neighbor_list=None, dispersion_pairs=None, numbers=None, cell=None):
        """One forward (and backward) pass over a batch of checked structures.

        Args:
            batch: the structures, on the calculator's device and dtype.
            stress_mask: per structure, whether its stress is wanted; None for no stress.
            neighbor_list: a VerletNeighborList to take the graph from; None builds it.
            dispersion_pairs: with a dispersion term, the
                :class:`~est_calc.dispersion.D3PairList` to take its pairs from; None builds
                them.
            numbers: for a single structure to be run by :attr:`captured_step`, its atomic
                numbers as a host array (and ``cell`` its cell); None runs the eager path.

        Returns:
            (Prediction, UncertaintyEstimate or None): ``stress`` is meaningful only where
            ``stress_mask`` is True; the estimate comes with ``uncertainty=True``.

        Raises:
            MemoryError: the neighbour list or the model ran out of memory
                (:meth:`_out_of_memory_guard`).
        """
        from est_calc.threads import choose_threads, intra_op_threads

        # The list's size is known only after it is built: its threads follow the last call's.
        with intra_op_threads(choose_threads(self._last_n_edges, self.threads)):
            if neighbor_list is not None:
                graph = self._out_of_memory_guard(lambda: neighbor_list(batch), batch)
            else:
                graph = self._out_of_memory_guard(
                    lambda: build_graph(batch, self.cutoff_A, backend=self.neighbor_backend,
                                        paired=True), batch)
            extra_energy = None
            if self.dispersion is not None:
                d3_list = (dispersion_pairs if dispersion_pairs is not None
                           else self.dispersion.pair_list())
                d3_pairs = self._out_of_memory_guard(lambda: d3_list(batch), batch)

                def extra_energy(strained):
                    return self.dispersion(strained, d3_pairs)
        self._last_n_edges = graph.n_edges
        self._check_contacts(batch, graph)
        work = batch
        if stress_mask is not None and not all(stress_mask):
            # Structures whose stress is not wanted (molecules in a mixed batch) get a unit cell
            # for the strain derivative only. Their pbc is all False, so their edges carry zero
            # shifts and neither the graph nor the energy depends on the cell.
            keep = torch.tensor(list(stress_mask), device=batch.device)
            eye = torch.eye(3, dtype=batch.dtype, device=batch.device).expand_as(batch.cell)
            work = batch.replace(cell=torch.where(keep[:, None, None], batch.cell, eye))
        self.n_model_calls += 1
        want_stress = stress_mask is not None

        step = self.captured_step if numbers is not None and extra_energy is None else None
        members = self.committee or [self.potential]

        def run():
            with contextlib.ExitStack() as stack:
                stack.enter_context(intra_op_threads(choose_threads(graph.n_edges, self.threads)))
                for member in members:
                    stack.enter_context(member.model.checkpoint_layers(self.low_memory))
                if step is not None:
                    return step(work, graph, compute_stress=want_stress, numbers=numbers,
                                cell=cell), None
                if self.committee is not None:
                    pred, estimate = committee_forces_stress(
                        self.committee, work, graph, compute_stress=want_stress,
                        extra_energy=extra_energy)
                    return pred, estimate if self.uncertainty else None
                if (self.max_atoms is not None and work.n_systems == 1
                        and work.n_atoms > self.max_atoms):
                    from est_calc.chunks import chunked_energy_forces_stress

                    return chunked_energy_forces_stress(
                        self.potential, work, graph, n_layers=self.potential.config.n_layers,
                        max_atoms=self.max_atoms, compute_stress=want_stress), None
                if self.uncertainty:
                    return latent_forces_stress(self.potential, work, graph,
                                                compute_stress=want_stress,
                                                extra_energy=extra_energy)
                return energy_forces_stress(
                    self.potential, work, graph, compute_stress=want_stress,
                    create_graph=False, extra_energy=extra_energy), None

        return self._out_of_memory_guard(run, batch, graph)

    def _check_contacts(self, batch: AtomsBatch, graph) -> None:
        """Refuse coincident atoms; warn (once per set of pairs) about pairs closer than
        :data:`CLOSE_CONTACT_A`, naming the atoms by their index within their structure."""
        if graph.n_edges == 0:
            return
        from est_calc.geometry import edge_vectors

        with torch.no_grad():
            d = edge_vectors(batch.positions, batch.cell, graph.edge_index, graph.shifts,
                             batch.system_idx).norm(dim=-1)
            close = d < CLOSE_CONTACT_A
            if not bool(close.any()):
                self._close_pairs = frozenset()
                return
            i, j = graph.edge_index[:, close].cpu().numpy()
            dist = d[close].cpu().numpy()
        system = batch.system_idx.cpu().numpy()
        first = np.searchsorted(system, np.arange(batch.n_systems))
        numbers = batch.atomic_numbers.cpu().numpy()
        pairs = {}
        for a, b, r in zip(i.tolist(), j.tolist(), dist.tolist()):
            key = (int(system[a]), min(a, b), max(a, b))
            pairs[key] = min(r, pairs.get(key, r))

        def name(key, r):
            s, a, b = key
            where = f" of structure {s}" if batch.n_systems > 1 else ""
            return (f"atoms {a - first[s]} ({chemical_symbols[numbers[a]]}) and {b - first[s]} "
                    f"({chemical_symbols[numbers[b]]}){where} at {r:.3g} Å")

        ordered = sorted(pairs.items(), key=lambda kv: kv[1])
        if ordered[0][1] < COINCIDENT_A:
            raise ValueError(f"{name(*ordered[0])}: the atoms coincide (closer than "
                             f"{COINCIDENT_A:g} Å), so no force direction exists")
        keys = frozenset(pairs)
        if keys != self._close_pairs:
            shown = "; ".join(name(k, r) for k, r in ordered[:5])
            more = f" and {len(ordered) - 5} more pairs" if len(ordered) > 5 else ""
            zbl = getattr(getattr(self.potential.model, "config", None), "zbl", False)
            acts = ("the potential's ZBL repulsion acts on it" if zbl else
                    "this potential has no short-range repulsion and may not repel them")
            warnings.warn(f"close contact below {CLOSE_CONTACT_A:g} Å: {shown}{more} (no bond is "
                          f"this short; {acts})", CloseContactWarning, stacklevel=4)
        self._close_pairs = keys

    def _out_of_memory_guard(self, run, batch: AtomsBatch, graph=None):
        """``run()``, with running out of memory turned into a MemoryError that says what to do.

        CUDA's ``torch.OutOfMemoryError`` and RuntimeErrors of a failed allocation (the CPU
        allocator's "can't allocate memory" / "not enough memory") become a MemoryError naming
        the number of atoms (and structures), the edges when ``graph`` is given, the device and
        dtype, the allocator's first line, and the options that lower the peak memory:
        ``low_memory=True``, fewer structures per ``calculate_batch`` call, float32. Every other
        exception passes through unchanged. The MemoryError is raised after the original error
        is released, so the tensors its traceback held are freed before a retry.
        """
        try:
            return run()
        except RuntimeError as err:
            if not _is_out_of_memory(err):
                raise
            lines = str(err).strip().splitlines()
            reason = lines[0] if lines else type(err).__name__
        raise MemoryError(self._out_of_memory_message(batch, graph, reason))

    def _out_of_memory_message(self, batch: AtomsBatch, graph, reason: str) -> str:
        n_sys = batch.n_systems
        size = f"{batch.n_atoms} atoms" + (f" ({n_sys} structures)" if n_sys > 1 else "")
        stage = (f"evaluating {size} with {graph.n_edges} edges" if graph is not None else
                 f"building the neighbour list of {size} (cutoff {self.cutoff_A:g} Å)")
        dtype = str(self.dtype).removeprefix("torch.")
        tips = []
        if not self.low_memory:
            tips.append("ESTCalculator(..., low_memory=True), which recomputes each layer's "
                        "activations in the backward pass instead of storing them")
        if n_sys > 1:
            tips.append("fewer structures per calculate_batch call (a smaller batch)")
        if self.dtype == torch.float64:
            tips.append('dtype="float32", half the memory of float64')
        advice = ("; try " + "; or ".join(tips) if tips else
                  "; it does not fit even with low_memory=True and float32: use a device with "
                  "more memory or a smaller system")
        return (f"out of memory {stage} on {self.device} in {dtype} ({reason}){advice}")

    @staticmethod
    def _results(pred, batch: AtomsBatch, stress_mask: Sequence[bool] | None,
                 estimate=None) -> list[dict]:
        """ASE results (numpy float64), one dict per structure of the batch.

        Every array leaves the device once and is checked once (FloatingPointError naming the
        quantity when the model produced a non-finite value), then split per structure.
        """
        arrays = {"energy": pred.energy, "energies": pred.energies, "forces": pred.forces}
        if estimate is not None:
            arrays["energy_std"], arrays["forces_std"] = estimate.energy_std, estimate.forces_std
        if stress_mask is not None and any(stress_mask):
            arrays["stress"] = pred.stress
        arrays = {key: value.detach().cpu().double().numpy() for key, value in arrays.items()}
        for key, value in arrays.items():
            rows = value if key != "stress" else value[np.asarray(stress_mask, dtype=bool)]
            if not np.all(np.isfinite(rows)):
                raise FloatingPointError(
                    f"the model produced a non-finite {key}; refusing to return it"
                )
        bounds = np.concatenate([[0], np.cumsum(batch.atoms_per_system().cpu().numpy())])
        out = []
        for k in range(batch.n_systems):
            lo, hi = bounds[k], bounds[k + 1]
            energy = float(arrays["energy"][k])
            res = {"energy": energy, "free_energy": energy,
                   "energies": arrays["energies"][lo:hi].copy(),
                   "forces": arrays["forces"][lo:hi].copy()}
            if estimate is not None:
                res["energy_std"] = float(arrays["energy_std"][k])
                res["forces_std"] = arrays["forces_std"][lo:hi].copy()
            if "stress" in arrays and stress_mask[k]:
                # Exactly symmetric (the strain is symmetrised), so ASE's averaging of the
                # off-diagonal pairs returns the upper triangle unchanged.
                res["stress"] = full_3x3_to_voigt_6_stress(arrays["stress"][k])
            out.append(res)
        return out

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        """Standard ASE entry point; see :class:`ase.calculators.calculator.Calculator`.

        Raises:
            PropertyNotImplementedError: stress asked for a system with pbc all False.
            ValueError: bad input (see the class docstring).
        """
        super().calculate(atoms, properties, system_changes)
        _check_atoms(self.atoms, self.potential)
        # Periodic in all three directions: stress comes with energy and forces from the same
        # backward pass (one more gradient output), so ASE's get_forces(); get_stress() and every
        # cell-filter or NPT step cost one model call. Slabs and molecules compute it on request.
        want_stress = "stress" in properties or bool(self.atoms.pbc.all())
        if want_stress and not self.atoms.pbc.any():
            raise PropertyNotImplementedError(
                "stress is only defined for periodic systems (atoms.pbc is all False)"
            )
        batch = AtomsBatch.from_atoms(self.atoms, device=self.device, dtype=self.dtype)
        mask = [True] if want_stress else None
        pred, estimate = self._predict(batch, mask, self.neighbor_list, self._dispersion_pairs,
                                       numbers=self.atoms.numbers, cell=self.atoms.cell.array)
        self.results = self._results(pred, batch, mask, estimate)[0]

    def calculate_batch(
        self, atoms_list: Sequence, properties: Iterable[str] = ("energy", "forces")
    ) -> list[dict]:
        """Evaluate many structures in one forward pass.

        The atoms' own calculators and ``self.results`` are not touched.

        Args:
            atoms_list: structures (any mix of sizes, cells and periodicity).
            properties: names from :attr:`implemented_properties`. Energy, free energy,
                per-atom energies and forces are always returned; "stress" (Voigt, eV/Å^3) is
                added for the periodic structures.

        Returns:
            One dict of results per structure, equal (to float round-off) to what
            one-at-a-time ``calculate`` calls give.

        Raises:
            ValueError: an unknown property, or bad input in any structure (the message names
                its index).
        """
        properties = set(properties)
        unknown = properties - set(self.implemented_properties)
        if unknown:
            raise ValueError(
                f"unknown properties {sorted(unknown)}; choose from {self.implemented_properties}"
            )
        atoms_list = list(atoms_list)
        if not atoms_list:
            return []
        batch = _checked_batch(atoms_list, self.potential, self.device, self.dtype)
        periodic = batch.pbc.any(dim=1).tolist()
        mask = periodic if "stress" in properties and any(periodic) else None
        pred, estimate = self._predict(batch, mask, self.batch_neighbor_list,
                                       self._batch_dispersion_pairs)
        return self._results(pred, batch, mask, estimate)
