"""Export a potential: the energy with its derivatives traced into one graph, then AOTInductor.

The exported function is :class:`EdgeEnergyModel` (inputs and outputs: the package docstring).
It takes each pair of neighbours once, as an edge i -> j with vector r_e = r_j - r_i + s_e; the
reverse edge j -> i, with vector -r_e, is implied. For atoms Z_i and the edges of both
directions it computes what ``ESTModel.forward`` does,

    e_i        = head(network(Z, r)_i) - head_isolated(Z_i)     (0 without an edge inside r_c)
    energies_i = e_i * energy_scale / avg_atoms + energy_shift + element_reference[Z_i]
                 + (1/2) sum_j E_ZBL(Z_i, Z_j, r_ij)
    energy     = sum_{i local} energies_i

with head_isolated(Z) evaluated once at export time (an atom without edges gives a constant), and
then forces and virials from g_e = d energy / d r_e over the given edges
(``est_calc.forces.edge_forces_virial``). Since the reverse edge's vector is -r_e,
g_e = dE/dr_(i->j) - dE/dr_(j->i): the forces and the per-atom virials (half of each edge's
-r (x) g to each end) are those of the directed list, term for term.

Why pairs. With SO(2) message blocks the network runs on the directed list in reversed-pair
order (the accelerated model, :mod:`est_calc.accel.model`): the Wigner rotations, with their
backward, are evaluated for one direction of each pair, the other's follow by fixed signs. That
makes the package about 1.08x faster on 1,000 Cu atoms (float32, one thread;
benchmarks/RESULTS.md), the eager model's speed; and a neighbour list of pairs is what LAMMPS
gives anyway, at half the size.

Export in four steps (:func:`export_potential`):

1. a plain copy of the model in the requested dtype, parameters frozen, and (SO(2) message
   blocks) its accelerated view (``est_calc.accel``, inference mode: paired edges; under tracing
   its blocks take their compile-friendly branches, plain autograd instead of the blocked
   custom Functions);
2. ``make_fx`` with symbolic shapes runs the function once on a small sample cluster and records
   every ATen operation of the forward and of the autograd backward in one graph, with the atom
   count n and the pair count P symbolic (no data-dependent branch: a chunk loop or an ``if`` on
   a size would have made a constant of it);
3. ``torch.export`` of that graph with n and E declared dynamic;
4. ``torch._inductor.aoti_compile_and_package`` compiles it (C++ on the CPU; weights frozen
   into the graph, ``_INDUCTOR``; tiny batched products unrolled, :class:`UnrollSmallBmm`;
   biases added by the next elementwise kernel, :class:`UnfuseAddmmBias`; AVX2-wide vectors
   for 24-channel models, :func:`vector_settings`)
   into a ``.pt2`` with the metadata of :mod:`.package`, written to a temporary file, checked
   against the eager function on a second, larger sample, then renamed into place.

Serial or OpenMP kernels (CPU packages). Inductor decides when it generates the C++ code: with
one thread it writes plain loops in which a scatter (``index_add``, the backward of every edge
gather) is an ordinary ``+=``; with more than one it writes OpenMP loops in which every scattered
element is an atomic compare-and-swap, whatever the number of threads at run time. On one thread
the atomics make the whole package about 1.3x slower (1,000 Cu atoms, float32;
benchmarks/RESULTS.md). One thread per MPI rank is how LAMMPS is usually run, and the small
molecules a package is used for from ASE run on one thread, so a package has serial kernels
unless ``openmp=True`` asks for OpenMP ones (these use ``OMP_NUM_THREADS`` threads at run time).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch._inductor  # AOTInductor; `import torch` alone does not load it
from torch import Tensor, nn
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

import est_calc
from est_calc.forces import edge_forces_virial

__all__ = ["EdgeEnergyModel", "ExportError", "ExportResult", "export_potential", "prepare",
           "sample_inputs", "trace"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: Inductor settings of every package. ``freezing``: the frozen weights are constants of the
#: graph, so the products with them are folded and pre-packed for the CPU's matrix kernels
#: (the package alone 1.1-1.2x faster on 1,000 Cu atoms, float32, one core, in one comparison;
#: LAMMPS steps/s within run-to-run spread; benchmarks/RESULTS.md).
_INDUCTOR = {"freezing": True}


def vector_settings(device, channels: int) -> dict:
    """Inductor's vector width for a model of ``channels`` feature channels on ``device``.

    Inductor vectorises its C++ loops with the widest instruction set of the compiling CPU
    (16 float32 lanes with AVX-512). The model's feature rows are ``channels`` wide (24 in the
    "small" and "molecule" presets): with 16 lanes every such row ends in a masked tail, and a
    row split into two halves (the reversed-pair swap, a gathered pair [x_i || x_j]) straddles
    vectors, which Inductor then loads element by element. With 8 lanes (AVX2) 24 is three
    whole vectors. So when ``channels`` is not a multiple of 16 and the CPU has AVX2, kernels
    are written for 256-bit vectors (``{"cpp.simdlen": 256}``; measured in
    benchmarks/RESULTS.md, "LAMMPS vs the ASE path"); such a package also loads on CPUs
    without AVX-512. Otherwise (and for GPUs) Inductor's own choice: ``{}``.
    """
    if torch.device(device).type == "cpu" and channels % 16:
        from torch._inductor.cpu_vec_isa import valid_vec_isa_list
        if any(isa.bit_width() == 256 for isa in valid_vec_isa_list()):
            return {"cpp.simdlen": 256}
    return {}


def _inductor_settings(device, channels: int) -> dict:
    """Inductor settings of a package: :data:`_INDUCTOR` and :func:`vector_settings`."""
    return {**_INDUCTOR, **vector_settings(device, channels)}


#: Largest |exported - eager| / (1 + |eager|) accepted by the check after compiling.
_CHECK_TOL = {torch.float32: 1e-3, torch.float64: 1e-8}


class ExportError(RuntimeError, ValueError):
    """Tracing, compiling or checking a package failed (a RuntimeError; also a ValueError, so the
    command line reports it in one line: a missing C++ compiler is the user's to fix)."""


class _Edges(NamedTuple):
    """What ``ESTModel.network`` reads of a graph: its edge list, and whether it is in
    reversed-pair order (``Graph.paired``: the second half reverses the first, edge for edge)."""

    edge_index: Tensor
    paired: bool = False


class EdgeEnergyModel(nn.Module):
    """The function a package holds (module and package docstrings): energies of atoms and of
    the pairs of neighbours, forces and virials by autograd inside.

    Args:
        model: a plain ``ESTModel`` (not accelerated), in eval mode, in the dtype and on the
            device to export, with its parameters frozen; with SO(2) message blocks the network
            runs on its accelerated view (``fast``, sharing its parameters), which rotates one
            direction of each pair.
        species: atomic numbers the package accepts.

    Buffers: ``isolated_head`` (119,), the head output of an atom without neighbours per atomic
    number (0 for the others).
    """

    def __init__(self, model: nn.Module, species):
        super().__init__()
        from est_calc.accel import accelerate, is_accelerated

        if is_accelerated(model):
            raise ValueError("EdgeEnergyModel needs the plain ESTModel; export the Potential, "
                             "not its accelerated view")
        self.model = model
        self.species = tuple(sorted(int(z) for z in species))
        self.cutoff_A = float(model.config.cutoff_A)
        self.register_buffer("isolated_head", self._isolated_head())
        # The network's module: the accelerated view where it has paired rotations to gain
        # (SO(2) message blocks), the plain model otherwise (the "est" message block's
        # accelerated form does not survive Inductor's re-trace: a view of a transposed
        # gradient). Not a submodule: the same parameters once in the module tree.
        fast = accelerate(model, inference=True) if model.edge_rotation is not None else model
        self.__dict__["fast"] = fast

    @torch.no_grad()
    def _isolated_head(self) -> Tensor:
        """head(network) of an atom without neighbours, per atomic number, computed as the eager
        model does: the species ride along as edgeless nodes of a graph with one bonded pair."""
        m = self.model
        ref = m.element_reference
        species = torch.tensor(self.species, dtype=torch.long, device=ref.device)
        s = species.shape[0]
        z = torch.cat([species, species[:1], species[:1]])
        edge_index = torch.tensor([[s, s + 1], [s + 1, s]], device=ref.device)
        d = 0.5 * self.cutoff_A
        vectors = torch.tensor([[d, 0.0, 0.0], [-d, 0.0, 0.0]], dtype=ref.dtype, device=ref.device)
        head = m.head(m.network(z, _Edges(edge_index), vectors)).squeeze(-1)[:s]
        table = torch.zeros_like(ref)
        table[species] = head
        return table

    def atom_energies(self, atomic_numbers: Tensor, edge_index: Tensor, vectors: Tensor) -> Tensor:
        """energies_i (n,) eV of the module docstring, from the pairs' edges (2, P) and vectors
        (P, 3) Å (each pair once)."""
        m = self.fast
        z = atomic_numbers
        both = torch.cat([edge_index, edge_index.flip(0)], dim=1)
        vectors = torch.cat([vectors, -vectors])
        x = m.network(z, _Edges(both, paired=True), vectors)
        e = m.head(x).squeeze(-1) - self.isolated_head[z]
        return m.atom_energies(z, e, both, vectors.norm(dim=-1))

    def forward(self, positions: Tensor, atomic_numbers: Tensor, edge_index: Tensor,
                edge_shifts: Tensor, local_mask: Tensor):
        """(energy, energies, forces, virial, atom_virial); shapes in the package docstring."""
        i, j = edge_index[0], edge_index[1]
        with torch.enable_grad():
            vectors = (positions[j] - positions[i] + edge_shifts).detach().requires_grad_(True)
            energies = self.atom_energies(atomic_numbers, edge_index, vectors)
            energy = torch.where(local_mask, energies, torch.zeros_like(energies)).sum()
            forces, atom_virial = edge_forces_virial(energy, vectors, edge_index,
                                                     positions.shape[0])
        return (energy.detach(), energies.detach(), forces.detach(), atom_virial.sum(0).detach(),
                atom_virial.detach())


def sample_inputs(species, cutoff_A: float, shape=(3, 2, 2), *, dtype=torch.float64,
                  device="cpu", seed: int = 0) -> tuple[Tensor, ...]:
    """Inputs of :class:`EdgeEnergyModel` for a jittered cluster of prod(shape) atoms on a grid of
    spacing 0.6 r_c (the species in turn, every pair closer than r_c an edge i -> j with i < j,
    small random shifts on the edges, the last atom not local): a sample to trace and check."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.tensor(list(itertools.product(*(range(k) for k in shape))), dtype=torch.float64)
    positions = 0.6 * cutoff_A * grid + 0.1 * torch.randn(grid.shape, generator=gen,
                                                          dtype=torch.float64)
    n = positions.shape[0]
    species = sorted(int(z) for z in species)
    z = torch.tensor([species[k % len(species)] for k in range(n)], dtype=torch.long)
    d = (positions[None, :, :] - positions[:, None, :]).norm(dim=-1)
    i, j = torch.nonzero((d < cutoff_A) & torch.ones(n, n, dtype=torch.bool).triu(1),
                         as_tuple=True)
    edge_index = torch.stack([i, j])
    # Shifts that move neighbours by at most 0.02 Å keep every edge inside the cutoff's reach.
    shifts = 0.01 * torch.randn(edge_index.shape[1], 3, generator=gen, dtype=torch.float64)
    mask = torch.ones(n, dtype=torch.bool)
    mask[-1] = False
    return (positions.to(device=device, dtype=dtype), z.to(device), edge_index.to(device),
            shifts.to(device=device, dtype=dtype), mask.to(device))


@contextlib.contextmanager
def _no_duck_shapes():
    """Trace with a symbol of its own for every size: with duck shaping, equal sample sizes (n
    atoms = 3, or n = E) would be traced as one symbol or as a constant."""
    try:
        from torch.fx.experimental import _config as config
    except ImportError:  # a torch without the switch
        config = None
    if getattr(config, "use_duck_shape", None) is None:
        yield
        return
    previous = config.use_duck_shape
    config.use_duck_shape = False
    try:
        yield
    finally:
        config.use_duck_shape = previous


def _compiling():
    """``torch.compiler.is_compiling()`` is True inside: the eager-only input checks of the blocks
    (``check_atomic_numbers``, which reads values) step aside, as they do under torch.compile;
    the package's caller checks its atomic numbers against the metadata's species instead."""
    context = getattr(torch.compiler, "_compile_session_context", None)
    return context() if context is not None else contextlib.nullcontext()


@contextlib.contextmanager
def _without_torch_deprecation_notes():
    """Silences a FutureWarning that torch's own export code raises about its internal pytree
    classes (``isinstance(treespec, LeafSpec)``): nothing a user of ``est export`` can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)",
                                category=FutureWarning)
        yield


def trace(function: EdgeEnergyModel, inputs: tuple[Tensor, ...]) -> torch.export.ExportedProgram:
    """Steps 2 and 3 of the module docstring: the ExportedProgram of ``function`` with dynamic
    atom and edge counts."""
    from torch.export import Dim
    from torch.fx.experimental.proxy_tensor import make_fx

    with _no_duck_shapes(), _compiling():
        graph = make_fx(function, tracing_mode="symbolic", _allow_non_fake_inputs=True,
                        _error_on_data_dependent_ops=True)(*[t.clone() for t in inputs])
    n = Dim("n_atoms", min=1)
    e = Dim("n_pairs", min=1)
    dynamic = ({0: n}, {0: n}, {1: e}, {0: e}, {0: n})
    return torch.export.export(graph, tuple(inputs), dynamic_shapes=dynamic, strict=False)


#: Largest M K N of a batched product that :class:`UnrollSmallBmm` unrolls (8,192 measured the
#: same on 1,000 Cu atoms; a lone 32 x 32 times 32 x 6 product is faster in the BLAS).
UNROLL_MAX_WORK = 4096


class UnrollSmallBmm(CustomGraphPass):
    """Inductor pass (after autograd): batched products of tiny matrices as fused loops.

    ``bmm(a, b)`` with a (B, M, K), b (B, K, N) equals ``(a[..., None] * b[:, None]).sum(2)``.
    The model's per-edge products are many tiny ones (the Wigner rotation of every edge, 7 x 9
    times 9 x 48, forward and backward): the BLAS's batched product spends most of its time per
    batch element, while Inductor fuses the broadcast product into its reduction (nothing of
    size B M K N is stored) and vectorises the inner loop. Rewritten: a symbolic batch
    dimension (edges or atoms) and concrete M, K, N with M K N at most
    :data:`UNROLL_MAX_WORK`. The inputs are materialised first, so that Inductor does not
    recompute their producers (a gather, a normalisation) inside the reduction for every row.
    The same numbers up to the order of summation (the export's check compares with the eager
    function). On 1,000 Cu atoms (float32, one thread) the package is 1.07x faster with it
    (benchmarks/RESULTS.md).
    """

    def __call__(self, graph: torch.fx.Graph) -> None:
        aten = torch.ops.aten
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target is not aten.bmm.default:
                continue
            a, b = node.args
            va, vb = (getattr(x, "meta", {}).get("val") for x in (a, b))
            if va is None or vb is None:
                continue
            (batch, m, k), n = va.shape, vb.shape[2]
            if isinstance(batch, int) or not all(isinstance(d, int) for d in (m, k, n)) \
                    or m * k * n > UNROLL_MAX_WORK:
                continue
            for x in (a, b):
                x.meta["inductor_realize_to_strides"] = True
            with graph.inserting_before(node):
                left = graph.call_function(aten.unsqueeze.default, (a, -1))
                right = graph.call_function(aten.unsqueeze.default, (b, 1))
                product = graph.call_function(aten.mul.Tensor, (left, right))
                total = graph.call_function(aten.sum.dim_IntList, (product, [2]))
            with va.fake_mode:
                left.meta["val"] = va.unsqueeze(-1)
                right.meta["val"] = vb.unsqueeze(1)
                product.meta["val"] = left.meta["val"] * right.meta["val"]
                total.meta["val"] = product.meta["val"].sum(2)
            node.replace_all_uses_with(total)
            graph.erase_node(node)

    def uuid(self):
        return get_hash_for_files((__file__,))


class UnfuseAddmmBias(CustomGraphPass):
    """Inductor pass (after autograd): ``addmm(bias, a, b)`` as ``mm(a, b) + bias``.

    On the CPU, ``addmm`` first copies the bias, broadcast over the rows, into its output and
    then accumulates the product onto it: a whole extra write of every linear layer's output.
    Written as a product and an addition, the addition is elementwise and Inductor fuses it
    into the kernel that reads the output next (a normalisation, an activation, a gather);
    Inductor itself does this for GPUs only. Only the plain form is rewritten: a 1-D bias,
    ``beta`` and ``alpha`` at their default of 1. The same numbers up to rounding (the export's
    check compares with the eager function).
    """

    def __call__(self, graph: torch.fx.Graph) -> None:
        aten = torch.ops.aten
        for node in list(graph.nodes):
            if (node.op != "call_function" or node.target is not aten.addmm.default
                    or node.kwargs or len(node.args) != 3):
                continue
            bias, a, b = node.args
            vals = [getattr(x, "meta", {}).get("val") for x in (bias, a, b)]
            if any(v is None for v in vals) or vals[0].dim() != 1:
                continue
            with graph.inserting_before(node):
                product = graph.call_function(aten.mm.default, (a, b))
                total = graph.call_function(aten.add.Tensor, (product, bias))
            with vals[0].fake_mode:
                product.meta["val"] = torch.mm(vals[1], vals[2])
                total.meta["val"] = product.meta["val"] + vals[0]
            node.replace_all_uses_with(total)
            graph.erase_node(node)

    def uuid(self):
        return get_hash_for_files((__file__,))


class PostGradPasses(CustomGraphPass):
    """The package's own Inductor passes, in order: :class:`UnrollSmallBmm`, then
    :class:`UnfuseAddmmBias`."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        UnrollSmallBmm()(graph)
        UnfuseAddmmBias()(graph)

    def uuid(self):
        return get_hash_for_files((__file__,))


class ExportResult(NamedTuple):
    """What :func:`export_potential` did: the file, its metadata and the seconds of each step."""

    path: Path
    metadata: dict
    trace_s: float
    compile_s: float
    max_deviation: float


@contextlib.contextmanager
def _codegen_threads(n: int):
    """Inductor generates serial C++ kernels when torch's thread count is 1 while it compiles,
    OpenMP ones otherwise (module docstring); the caller's count is restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _plain_model(potential, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A plain ESTModel with the potential's weights, in ``dtype`` on ``device``, eval mode,
    parameters frozen (the caller's potential is not touched)."""
    from est_calc.model import ESTModel

    model = ESTModel(potential.config)
    model.load_state_dict(potential.model.state_dict(), strict=True)
    model = model.to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def prepare(potential, dtype: torch.dtype, device, source: str = "Potential object"
            ) -> tuple[EdgeEnergyModel, dict[str, str]]:
    """Step 1 of the module docstring: the :class:`EdgeEnergyModel` of a ``Potential`` (a plain
    copy in ``dtype`` on ``device``; the potential is not touched) and the package metadata."""
    device = torch.device(device)
    function = EdgeEnergyModel(_plain_model(potential, dtype, device), potential.species)
    return function, _metadata(potential, function, dtype, device, source)


def _metadata(potential, function: EdgeEnergyModel, dtype: torch.dtype, device: torch.device,
              source: str) -> dict[str, str]:
    from ase.data import chemical_symbols

    from est_calc.deploy.package import FORMAT, FORMAT_VERSION, INPUTS, OUTPUTS

    c = potential.config
    return {
        "est_format": FORMAT,
        "est_format_version": str(FORMAT_VERSION),
        "est_calc_version": est_calc.__version__,
        "torch_version": torch.__version__,
        "species": " ".join(str(z) for z in function.species),
        "symbols": " ".join(chemical_symbols[z] for z in function.species),
        "cutoff_A": repr(float(c.cutoff_A)),
        "n_layers": str(int(c.n_layers)),
        "interaction_range_A": repr(float(c.cutoff_A) * (int(c.n_layers) + 1)),
        "dtype": str(dtype).removeprefix("torch."),
        "device": device.type,
        "inputs": " ".join(INPUTS),
        "outputs": " ".join(OUTPUTS),
        "units": "eV Angstrom",
        "source": source,
        "model_config": json.dumps(c.to_dict(), sort_keys=True),
        "potential_metadata": json.dumps(potential.metadata, sort_keys=True, default=str),
    }


def _check(package_path: Path, function: EdgeEnergyModel, inputs) -> float:
    """Largest relative deviation of the compiled package from ``function`` on ``inputs``."""
    from est_calc.deploy.package import aoti_load

    runner = aoti_load(package_path)
    got = runner(*inputs)
    want = function(*inputs)
    worst = 0.0
    for g, w in zip(got, want):
        if g.shape != w.shape:
            raise ExportError(f"exported output of shape {tuple(g.shape)}, eager {tuple(w.shape)}")
        dev = ((g - w).abs() / (1 + w.abs())).max() if w.numel() else torch.zeros(())
        worst = max(worst, float(dev))
    return worst


def _place(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished temporary file to ``path``; without ``overwrite`` never replace a file
    (a hard link fails if the name exists; where links are refused, check then rename)."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{str(path)!r} exists; pass overwrite=True (est export "
                              "--overwrite) to replace it") from None
    except OSError:
        if path.exists():
            raise FileExistsError(f"{str(path)!r} exists; pass overwrite=True (est export "
                                  "--overwrite) to replace it") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def export_potential(potential, path: str | os.PathLike, *,
                     dtype: str | torch.dtype = "float32", device="cpu",
                     overwrite: bool = False, check: bool = True,
                     source: str | None = None, openmp: bool = False) -> ExportResult:
    """Export ``potential`` to an AOTInductor package at ``path`` (module docstring).

    Args:
        potential: a ``Potential``, a registry name ("est-emt-small") or a ``.pt`` path.
        path: the ``.pt2`` file to write. Written atomically: a temporary file in the same
            folder, renamed when complete and checked, removed on any failure.
        dtype: "float32" (default) or "float64"; the package's inputs and outputs have it.
        device: "cpu" or "cuda" (a CUDA package needs a CUDA device to compile and to run).
        overwrite: replace an existing file (otherwise FileExistsError, before any work).
        check: compare the compiled package with the eager function on a second sample and
            refuse (ExportError, no file written) a deviation above round-off.
        source: how the potential is named in the metadata (default: its name or path, or
            "Potential object").
        openmp: CPU packages only: OpenMP-parallel kernels, which run on ``OMP_NUM_THREADS``
            threads; the default, serial kernels, is faster on one thread (one thread per MPI
            rank; module docstring). Recorded as the metadata key ``threads``.

    Returns:
        ExportResult(path, metadata, trace_s, compile_s, max_deviation).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        FileNotFoundError / ValueError: the potential cannot be loaded; a bad dtype or device.
        ExportError: tracing, compiling or the check failed (no file is left behind).
    """
    from est_calc.potential import Potential, load_potential

    path = Path(path)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        dtype = _DTYPES[dtype]
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {str(device)!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda': CUDA is not available on this machine; a CUDA package "
                         "is compiled on a machine with a GPU")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} exists; pass overwrite=True (est export "
                              "--overwrite) to replace it")
    if path.suffix != ".pt2":
        raise ValueError(f"a package file name ends in .pt2, got {str(path)!r}")
    if not isinstance(potential, Potential):
        source = source or str(potential)
        potential = load_potential(potential, dtype=dtype)
    function, metadata = prepare(potential, dtype, device, source or "Potential object")
    metadata["threads"] = "openmp" if openmp else "serial"
    inputs = sample_inputs(function.species, function.cutoff_A, dtype=dtype, device=device)

    start = time.perf_counter()
    try:
        with _without_torch_deprecation_notes():
            program = trace(function, inputs)
    except Exception as err:  # tracing fails in many ways: name the step
        raise ExportError(f"tracing the potential for export failed: {_first_line(err)}") from err
    trace_s = time.perf_counter() - start

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.pt2", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        start = time.perf_counter()
        try:
            with _codegen_threads(1 if not openmp else max(2, torch.get_num_threads())), \
                    _without_torch_deprecation_notes():
                torch._inductor.aoti_compile_and_package(
                    program, package_path=str(tmp),
                    inductor_configs={"aot_inductor.metadata": dict(metadata),
                                      **_inductor_settings(device, function.model.config.channels),
                                      "post_grad_custom_post_pass": PostGradPasses()})
        except Exception as err:  # Inductor and the C++ compiler fail in many ways
            raise ExportError(f"compiling the package with AOTInductor failed (a C++ compiler "
                              f"is needed: g++ or clang++): {_first_line(err)}") from err
        compile_s = time.perf_counter() - start
        deviation = 0.0
        if check:
            second = sample_inputs(function.species, function.cutoff_A, shape=(4, 3, 2),
                                   dtype=dtype, device=device, seed=1)
            try:
                deviation = _check(tmp, function, second)
            except ExportError:
                raise
            except Exception as err:  # the C++ loader fails in many ways
                raise ExportError(f"the compiled package does not run: {_first_line(err)}") \
                    from err
            if not deviation <= _CHECK_TOL[dtype]:
                raise ExportError(f"the compiled package deviates from the eager potential by "
                                   f"{deviation:.3g} (relative); not written")
        from est_calc.atomic_io import new_file_mode

        os.chmod(tmp, new_file_mode())
        _place(tmp, path, overwrite)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return ExportResult(path, metadata, trace_s, compile_s, deviation)
