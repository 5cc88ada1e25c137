"""ModelConfig (the only build recipe, with named presets) and ESTModel (returns energy only).

ESTModel(batch, graph) computes

    batch       <- batch on the model's device and in its dtype   (the one cast)
    r_ij        = edge_vectors(...)                       inside autograd (forces/stress by grad)
    r_ij       <- R_b r_ij   (train mode only, one uniform random rotation per structure b)
    edges       = EdgeFeatures(r_ij, Z)                   harmonics, radial basis, envelope, rotations
    x           = AtomEmbedding(Z) + EdgeDegreeEmbedding(edges)
    x           = UpdateBlock(MessageBlock(x, edges))     for each of n_layers layers
    e_i         = head(LN(x_i)^(0)) - head_isolated(Z_i)   (exactly 0 for an atom without neighbours)
                  (config.layer_readouts: head(.) + sum_k w_k . x_k^(0), k = the embedding and
                  every layer but the last; LayeredHead)
    energies_i  = e_i * energy_scale / avg_atoms + energy_shift + element_reference[Z_i]
                  + (1/2) sum_j E_ZBL(Z_i, Z_j, r_ij)        (config.zbl; nn/repulsion.py)
    energy_b    = sum_{i in b} energies_i

so an isolated atom has energy element_reference[Z] + energy_shift exactly and zero force.
Only the l = 0 row of the last layer's output reaches the energy, so the last layer is built
scalar-only (``ScalarSO2MessageBlock`` / ``ScalarESTMessageBlock`` and ``ScalarUpdateBlock``:
no spherical attention or experts there, only the m = 0 rows of its SO(2) messages); the numbers
are those of the full layer's l = 0 row.
Rotating the edge vectors by R is equivalent to rotating the sphere lattice by R^T (stochastic
frame averaging of the lattice discretisation error, EST_SPEC 5); eval mode is deterministic.

The model here is the plain reference; ``est_calc.accel.accelerate(model)`` gives the same
function with every speed-up (the calculator and the trainer use that).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from typing import NamedTuple, Optional

import torch
import torch.utils.checkpoint
from e3nn import o3
from torch import Tensor, nn

from est_calc.geometry import edge_vectors, random_rotations
from est_calc.nn.block import ESTUpdateBlock, ScalarUpdateBlock
from est_calc.nn.edges import EdgeFeatures, encode_edges
from est_calc.nn.embedding import (
    N_ELEMENTS,
    AtomEmbedding,
    EdgeDegreeEmbedding,
    check_atomic_numbers,
)
from est_calc.nn.message import ESTMessageBlock, ScalarESTMessageBlock
from est_calc.nn.message_so2 import ScalarSO2MessageBlock, SO2MessageBlock
from est_calc.nn.radial import PolynomialEnvelope, make_radial_basis
from est_calc.nn.repulsion import ZBLRepulsion
from est_calc.nn.so3 import EquivariantLayerNorm
from est_calc.nn.wigner import EdgeRotation
from est_calc.sphere import make_grid

__all__ = ["PRESETS", "ESTModel", "LayeredHead", "ModelConfig", "ModelOutput", "random_rotations"]


_CHOICES = {
    "grid": ("fibonacci", "fibonacci_poles", "lebedev", "lat_long"),
    "inverse": ("lstsq", "normalized_transpose"),
    "message": ("est", "so2"),
    "rbf": ("bessel", "gaussian"),
    "vector_norm": ("joint", "separate"),
}

#: Values that configs written before a field existed were built with (``from_dict``): a stored
#: config lacking the key gets the behaviour it was trained with, not the new default.
_LEGACY_DEFAULTS = {"vector_norm": "separate", "zbl": False}


@dataclass(frozen=True)
class ModelConfig:
    """Every architectural choice of an EST model (frozen; stored in checkpoints via to_dict).

    Attributes:
        cutoff_A: neighbour cutoff r_c in Å.
        l_max: maximum degree L of the steerable features (K = (L+1)^2).
        channels: C, channels per degree.
        n_layers: number of (message block, update block) layers.
        n_heads: attention heads in the node update blocks (divides channels).
        l_roe: degree of the Legendre orientation bias in spherical attention.
        grid: sphere lattice kind: "fibonacci" | "fibonacci_poles" | "lebedev" | "lat_long".
        n_points: number of sample points S (None: the grid's default, (2L+1)(2L+2) for Fibonacci).
        message_n_points: S of the per-edge grid in the "est" message block (None: the same grid
            as the update blocks). Attention cost per edge grows as S^2, so CPU presets use fewer.
        inverse: inverse transform: "lstsq" | "normalized_transpose".
        n_steerable: steerable experts per update block.
        n_spherical: spherical experts per update block.
        hidden_mult: hidden width multiplier of the expert and message FFNs.
        message: message block: "est" (full EST per edge) | "so2" (SO(2) graph attention).
        fourier_channels: C_f, channels of the per-edge grid in the "est" message block.
        message_heads: attention heads of the per-edge cross-attention (divides fourier_channels).
        so2_m_max: M, the largest |m| kept by the "so2" message block.
        so2_neighbour_sum: the "so2" message block adds a plain neighbour sum (learned weight per
            head over avg_degree) to its softmax attention, as the "est" block does; without it
            the message is a weighted mean over the neighbours (``nn/message_so2.py``).
        n_rbf: number of radial basis functions.
        rbf: radial basis: "bessel" | "gaussian".
        envelope_p: order p of the polynomial cutoff envelope.
        radial_hidden: hidden width of the radial MLPs.
        species_channels: width of the scalar species embedding fed to the radial MLPs.
        avg_degree: neighbour-sum normaliser (typical number of neighbours).
        avg_atoms: per-structure energy normaliser (divides the learned part of e_i).
        rotate_grid_in_training: random lattice rotation per structure in train mode.
        vector_norm: statistic of the l > 0 part in every EquivariantLayerNorm: "joint" (l > 0
            measured against the whole feature; bounded gain, float32-safe on symmetric
            structures) or "separate" (l > 0 alone; potentials written before est_calc 0.2,
            whose float32 forces on ideal crystals are wrong, see nn/so3.py).
        zbl: add the ZBL screened nuclear repulsion at short range (``nn/repulsion.py``).
        zbl_radius_factor: the ZBL term of a pair ends at this factor times the sum of the two
            covalent radii.
        layer_readouts: add a linear energy readout of the l = 0 row of the embedding and of
            every layer's output but the last to the head's output (:class:`LayeredHead`), as
            MACE reads its energy from every interaction: a path of low body order (the
            embedding's row is a sum of two-body terms) beside the deep one. Zero at
            initialisation.
    """

    cutoff_A: float = 5.0
    l_max: int = 2
    channels: int = 32
    n_layers: int = 2
    n_heads: int = 4
    l_roe: int = 2
    grid: str = "fibonacci"
    n_points: Optional[int] = None
    message_n_points: Optional[int] = None
    inverse: str = "lstsq"
    n_steerable: int = 1
    n_spherical: int = 1
    hidden_mult: int = 2
    message: str = "est"
    fourier_channels: int = 8
    message_heads: int = 2
    so2_m_max: int = 2
    so2_neighbour_sum: bool = False
    n_rbf: int = 8
    rbf: str = "bessel"
    envelope_p: int = 5
    radial_hidden: int = 32
    species_channels: int = 16
    avg_degree: float = 12.0
    avg_atoms: float = 1.0
    rotate_grid_in_training: bool = True
    vector_norm: str = "joint"
    zbl: bool = True
    zbl_radius_factor: float = 0.65
    layer_readouts: bool = False

    def __post_init__(self):
        for name, kinds in _CHOICES.items():
            if getattr(self, name) not in kinds:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}; expected one of {kinds}")
        positive_ints = ("l_max", "channels", "n_layers", "n_heads", "hidden_mult",
                         "fourier_channels", "message_heads", "n_rbf", "envelope_p",
                         "radial_hidden", "species_channels")
        for name in positive_ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {v!r}")
        for name in ("l_roe", "n_steerable", "n_spherical", "so2_m_max"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"ModelConfig.{name} must be a non-negative integer, got {v!r}")
        if self.n_steerable + self.n_spherical < 1:
            raise ValueError("ModelConfig needs at least one expert (n_steerable + n_spherical >= 1)")
        for name in ("cutoff_A", "avg_degree", "avg_atoms"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < float("inf")):
                raise ValueError(f"ModelConfig.{name} must be a positive finite number, got {v!r}")
        for name in ("n_points", "message_n_points"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"ModelConfig.{name} must be None or a positive integer, got {v!r}")
        if self.channels % self.n_heads:
            raise ValueError(f"channels={self.channels} is not divisible by n_heads={self.n_heads}")
        if self.fourier_channels % self.message_heads:
            raise ValueError(f"fourier_channels={self.fourier_channels} is not divisible by "
                             f"message_heads={self.message_heads}")
        if self.so2_m_max > self.l_max:
            raise ValueError(f"so2_m_max={self.so2_m_max} exceeds l_max={self.l_max}")
        for name in ("rotate_grid_in_training", "zbl", "so2_neighbour_sum", "layer_readouts"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be a bool, got {getattr(self, name)!r}")
        f = self.zbl_radius_factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 2:
            raise ValueError(f"ModelConfig.zbl_radius_factor must be in (0, 2], got {f!r}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """A named preset ("tiny", "small", "molecule", "medium") with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides) if overrides else PRESETS[name]

    def to_dict(self) -> dict:
        """Plain-Python dict of every field (safe for torch.save(weights_only) and JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """Inverse of to_dict; unknown keys raise ValueError naming them. Keys that did not exist
        when the config was written take the value that model was built with
        (``_LEGACY_DEFAULTS``), not today's default."""
        if not isinstance(data, dict):
            raise ValueError(f"ModelConfig.from_dict needs a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**{**_LEGACY_DEFAULTS, **data})


#: Named presets. "tiny": unit tests (seconds on CPU). "small": CPU MD and CPU training.
#: "molecule": molecules at 5 Å (CPU). "medium": GPU training and production.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(cutoff_A=4.0, l_max=2, channels=8, n_layers=1, n_heads=2, l_roe=1,
                        hidden_mult=1, fourier_channels=4, message_heads=1, n_rbf=4,
                        radial_hidden=8, species_channels=4, avg_degree=8.0),
    # small: SO(2) message block (exactly equivariant: Wigner rotations into the edge frame,
    # orders m <= 1) plus EST update blocks on a 32-point Fibonacci grid, C = 24 channels; the
    # update grid's rotation error and the speed of the alternatives that led here are in
    # benchmarks/RESULTS.md ("Measurements behind library defaults").
    # Cutoff 4.2 Å: the first two fcc Cu shells (18 neighbours) instead of three (42 at 5 Å);
    # two layers still see 8.4 Å.
    "small": ModelConfig(cutoff_A=4.2, l_max=2, channels=24, n_layers=2, n_heads=4, l_roe=2,
                         n_points=32, message="so2", so2_m_max=1,
                         fourier_channels=8, message_heads=1, message_n_points=16, n_rbf=8,
                         radial_hidden=24, species_channels=16, avg_degree=18.0),
    # molecule: the small architecture at the 5 Å cutoff of the molecular benchmarks (3BPA,
    # rMD17: MACE, NequIP and Allegro all use 5 Å), normalised for organic molecules (about 16
    # neighbours per atom within 5 Å in 3BPA).
    "molecule": ModelConfig(cutoff_A=5.0, l_max=2, channels=24, n_layers=2, n_heads=4, l_roe=2,
                            n_points=32, message="so2", so2_m_max=1,
                            fourier_channels=8, message_heads=1, message_n_points=16, n_rbf=8,
                            radial_hidden=24, species_channels=16, avg_degree=16.0),
    "medium": ModelConfig(cutoff_A=6.0, l_max=4, channels=128, n_layers=6, n_heads=8, l_roe=2,
                          n_steerable=2, n_spherical=2, fourier_channels=32, message_heads=4,
                          n_rbf=16, radial_hidden=64, species_channels=32, avg_degree=40.0),
}


#: Stack of (species, inverse) pairs set by :func:`given_species`.
_GIVEN_SPECIES: list[tuple[Tensor, Tensor]] = []


@contextmanager
def given_species(species: Tensor, inverse: Tensor):
    """Inside, :meth:`ESTModel.forward` takes the batch's species and each atom's index into them
    from here instead of computing ``torch.unique(z, return_inverse=True)``, whose output size
    depends on the values of z: a graph traced once for many batches (the compiled training
    step, training/compiled.py) receives them as inputs. The caller guarantees that they are
    exactly that ``torch.unique`` of the atomic numbers it passes.
    """
    _GIVEN_SPECIES.append((species, inverse))
    try:
        yield
    finally:
        _GIVEN_SPECIES.pop()


class ModelOutput(NamedTuple):
    """energy (n_systems,) eV and energies (n_atoms,) eV, with energy = sum of energies per system."""

    energy: Tensor
    energies: Tensor


def _layer(message: nn.Module, update: nn.Module, x: Tensor, edges: EdgeFeatures) -> Tensor:
    """One (message block, update block) layer, as a function for activation checkpointing."""
    return update(message(x, edges))


def _message_block(c: ModelConfig, grid: nn.Module, scalar: bool) -> nn.Module:
    """The message block of one layer (``scalar``: the last layer's l = 0-only form)."""
    if c.message == "est":
        cls = ScalarESTMessageBlock if scalar else ESTMessageBlock
        return cls(c.l_max, c.channels, grid, fourier_channels=c.fourier_channels,
                   n_heads=c.message_heads, l_roe=c.l_roe, n_rbf=c.n_rbf,
                   species_channels=c.species_channels, radial_hidden=c.radial_hidden,
                   hidden_mult=c.hidden_mult, avg_degree=c.avg_degree)
    cls = ScalarSO2MessageBlock if scalar else SO2MessageBlock
    return cls(c.l_max, c.so2_m_max, c.channels, n_heads=c.n_heads, n_rbf=c.n_rbf,
               species_channels=c.species_channels, radial_hidden=c.radial_hidden,
               neighbour_sum=c.so2_neighbour_sum, avg_degree=c.avg_degree)


class LayeredHead(nn.Module):
    """The energy head of ``ModelConfig.layer_readouts``: head(f) + sum_k w_k . s_k.

    Its input is ESTModel.network's (N, C (1 + K)): the normalised last-layer scalars f, then
    the l = 0 rows s_k (N, C) of the embedding and of the K - 1 earlier layers' outputs (not
    normalised: a readout of sums over neighbours stays additive in them). The weights w_k
    start at zero, so the model starts as the one without readouts.
    """

    def __init__(self, head: nn.Module, channels: int, n_readouts: int):
        super().__init__()
        self.mlp = head
        self.channels = channels
        self.readout = nn.Parameter(torch.zeros(n_readouts * channels, 1))

    def forward(self, features: Tensor) -> Tensor:
        """(N, C (1 + K)) -> (N, 1)."""
        c = self.channels
        return self.mlp(features[:, :c]) + features[:, c:] @ self.readout


class ESTModel(nn.Module):
    """Equivariant Spherical Transformer interatomic potential (energy only).

    Args:
        config: a :class:`ModelConfig` (or the name of a preset).
        scalar_last_layer: build the last layer scalar-only (the default: the energy reads only
            its l = 0 row). False builds it in full, the same parameters and numbers; the
            reference the scalar-only layer is tested against.

    Buffers (set by training): ``element_reference`` (119,) eV, ``energy_scale`` () and
    ``energy_shift`` () eV.
    """

    def __init__(self, config: ModelConfig | str, *, scalar_last_layer: bool = True):
        super().__init__()
        if isinstance(config, str):
            config = ModelConfig.preset(config)
        if not isinstance(config, ModelConfig):
            raise ValueError(f"ESTModel needs a ModelConfig or preset name, got {type(config)}")
        self.config = config
        self.scalar_last_layer = bool(scalar_last_layer)
        c = config
        self.edge_sh = o3.SphericalHarmonics(o3.Irreps.spherical_harmonics(c.l_max),
                                             normalize=True, normalization="component")
        self.grid = make_grid(c.grid, c.l_max, n_points=c.n_points, inverse=c.inverse)
        self.rbf = make_radial_basis(c.rbf, c.n_rbf, c.cutoff_A)
        self.envelope = PolynomialEnvelope(c.cutoff_A, p=c.envelope_p)
        self.edge_rotation = EdgeRotation(c.l_max, c.so2_m_max) if c.message == "so2" else None
        self.atom_embedding = AtomEmbedding(c.l_max, c.channels)
        self.species_embedding = nn.Embedding(N_ELEMENTS, c.species_channels)
        self.edge_embedding = EdgeDegreeEmbedding(c.l_max, c.channels, c.n_rbf, c.species_channels,
                                                  c.radial_hidden, c.avg_degree)
        message_grid = self.grid
        if c.message_n_points is not None and c.message == "est":
            message_grid = make_grid(c.grid, c.l_max, n_points=c.message_n_points,
                                     inverse=c.inverse)
        last = c.n_layers - 1
        scalar = [self.scalar_last_layer and k == last for k in range(c.n_layers)]
        self.messages = nn.ModuleList(_message_block(c, message_grid, s) for s in scalar)
        self.updates = nn.ModuleList(
            (ScalarUpdateBlock if s else ESTUpdateBlock)(
                c.l_max, c.channels, self.grid, n_heads=c.n_heads, l_roe=c.l_roe,
                n_steerable=c.n_steerable, n_spherical=c.n_spherical, hidden_mult=c.hidden_mult)
            for s in scalar)
        self.final_norm = EquivariantLayerNorm(c.l_max, c.channels)
        for module in self.modules():
            if isinstance(module, EquivariantLayerNorm):
                module.joint = c.vector_norm == "joint"
        self.repulsion = ZBLRepulsion(c.zbl_radius_factor) if c.zbl else None
        head = nn.Sequential(nn.Linear(c.channels, c.channels), nn.SiLU(), nn.Linear(c.channels, 1))
        self.head = LayeredHead(head, c.channels, c.n_layers) if c.layer_readouts else head
        self.register_buffer("element_reference", torch.zeros(N_ELEMENTS))
        self.register_buffer("energy_scale", torch.tensor(1.0))
        self.register_buffer("energy_shift", torch.tensor(0.0))
        self._rotate_grid = True
        self._checkpoint_layers = False
        self._compiled_network = None
        self._feature_sink: list | None = None

    def enable_compile(self, *, mode: str | None = None, dynamic: bool = True):
        """Run the network (everything between edge vectors and per-atom scalars) through
        ``torch.compile`` from now on, in eval mode; returns ``self``.

        The compiled region is one graph with dynamic atom and edge counts (no recompilation as
        neighbour counts change in MD); edge vectors are still built eagerly from positions and
        strain, so forces and stress by autograd are unchanged (first derivatives through the
        compiled backward). Training mode, which needs second derivatives, and
        :meth:`checkpoint_layers` keep the eager path. The first call compiles (minutes on CPU).
        Accelerate first (``est_calc.accel.accelerate``), then compile the accelerated model.

        Args:
            mode: ``torch.compile`` mode (None, "reduce-overhead", "max-autotune", ...).
            dynamic: compile for symbolic atom and edge counts.
        """
        self._compiled_network = torch.compile(self.network, mode=mode, dynamic=dynamic,
                                               fullgraph=True)
        return self

    @property
    def is_compiled(self) -> bool:
        """Whether :meth:`enable_compile` was called (the compiled path serves eval-mode calls)."""
        return self._compiled_network is not None

    @contextmanager
    def checkpoint_layers(self, enabled: bool = True):
        """Recompute each layer's activations in the backward pass instead of storing them.

        Peak memory of an energy+forces(+stress) call drops (only each layer's input is kept),
        at the price of a second forward through every layer during the backward; results are
        identical. Meant for inference (forces and stress as first derivatives, as
        ``ESTCalculator(low_memory=True)`` uses it).
        """
        previous, self._checkpoint_layers = self._checkpoint_layers, bool(enabled)
        try:
            yield self
        finally:
            self._checkpoint_layers = previous

    @contextmanager
    def recording_features(self):
        """Collect the per-atom scalar features (n_atoms, C) that enter the energy head
        ((n_atoms, C (1 + K)) with ``layer_readouts``: :meth:`network`).

        Yields a list; every forward pass inside the block appends its batch's features,
        detached (``network`` output of the real atoms, after the final norm). The energy and
        its derivatives are those of an unrecorded call. The uncertainty estimates of
        :mod:`est_calc.uncertainty` read them.
        """
        previous, sink = self._feature_sink, []
        self._feature_sink = sink
        try:
            yield sink
        finally:
            self._feature_sink = previous

    @contextmanager
    def fixed_grid(self):
        """Keep the lattice fixed even in training mode.

        The trainer rotates the structures (and their force and stress labels) itself with
        rotations that are a pure function of (seed, step), which is the same stochastic frame
        averaging but reproducible across resumes and data-parallel ranks.
        """
        previous, self._rotate_grid = self._rotate_grid, False
        try:
            yield self
        finally:
            self._rotate_grid = previous

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def edge_features(self, species_emb: Tensor, graph, vectors: Tensor) -> EdgeFeatures:
        """The :class:`EdgeFeatures` of the graph's edges with vectors (E, 3) Å, for atoms with
        the scalar species embedding ``species_emb`` (N, Cz)."""
        return encode_edges(graph.edge_index, vectors, species_emb, rbf=self.rbf,
                            envelope=self.envelope, harmonics=self.edge_sh,
                            rotation=self.edge_rotation)

    def _checkpointed_layer(self, message: nn.Module, update: nn.Module, x: Tensor,
                            edges: EdgeFeatures) -> Tensor:
        """One layer whose activations are recomputed in the backward pass."""
        return torch.utils.checkpoint.checkpoint(_layer, message, update, x, edges,
                                                 use_reentrant=False)

    def network(self, z: Tensor, graph, vectors: Tensor) -> Tensor:
        """Per-atom scalar features (N, C), the input of the energy head, for atoms z (N,) and
        the graph's edges with vectors (E, 3) Å; with ``layer_readouts`` (N, C (1 + n_layers)): the
        l = 0 rows of the embedding and of every layer but the last follow (LayeredHead)."""
        species_emb = self.species_embedding(z)
        edges = self.edge_features(species_emb, graph, vectors)
        x = self.edge_embedding(self.atom_embedding(z), edges)
        checkpoint = self._checkpoint_layers and torch.is_grad_enabled()
        earlier = []
        for message, update in zip(self.messages, self.updates):
            if self.config.layer_readouts:
                earlier.append(x[:, 0])
            x = (self._checkpointed_layer(message, update, x, edges) if checkpoint
                 else _layer(message, update, x, edges))
        # The scalar-only last layer gives the l = 0 row (N, C) alone; the final norm's l = 0
        # part is an ordinary LayerNorm of that row.
        last = self.final_norm.scalar_norm(x) if self.scalar_last_layer else self.final_norm(x)[:, 0]
        return torch.cat([last, *earlier], dim=-1) if earlier else last

    def forward(self, batch, graph) -> ModelOutput:
        """Energies of a batch of structures.

        Args:
            batch: ``est_calc.batch.AtomsBatch`` (positions in Å), cast here (differentiably) to
                the model's device and dtype if it is not on them.
            graph: ``est_calc.neighbors.Graph`` (edge_index (2, E), shifts (E, 3) int64).

        Returns:
            ModelOutput(energy (n_systems,) eV, energies (n_atoms,) eV).
        """
        dtype, device = self.element_reference.dtype, self.element_reference.device
        if batch.dtype != dtype or batch.device != device:
            batch = batch.to(device=device, dtype=dtype)
        if graph.edge_index.ndim != 2 or graph.edge_index.shape[0] != 2:
            raise ValueError(f"graph.edge_index must be (2, E), got {tuple(graph.edge_index.shape)}")
        if graph.edge_index.device != device:
            graph = graph.to(device)
        z = batch.atomic_numbers
        edge_index = graph.edge_index
        vec = edge_vectors(batch.positions, batch.cell, edge_index, graph.shifts, batch.system_idx)
        rotate = self.training and self.config.rotate_grid_in_training and self._rotate_grid
        if rotate and vec.shape[0] > 0:
            rot = random_rotations(batch.n_systems, dtype, device=device)
            rot_e = rot[batch.system_idx[edge_index[0]]]  # (E, 3, 3)
            vec = torch.einsum("eab,eb->ea", rot_e, vec)

        # Subtract what the same network gives for an isolated atom of each species, so that an
        # atom without neighbours has e_i = 0 and the energy tends to the sum of references. The
        # isolated atoms ride along as extra edgeless nodes (every block maps an edgeless node to
        # what a separate pass would give), which saves a second pass through every block.
        n_atoms = z.shape[0]
        check_atomic_numbers(z)
        species, inverse = _GIVEN_SPECIES[-1] if _GIVEN_SPECIES else torch.unique(
            z, return_inverse=True)
        network = self.network
        if self._compiled_network is not None and not self.training and not self._checkpoint_layers:
            network = self._compiled_network
        features = network(torch.cat([z, species]), graph, vec)
        if self._feature_sink is not None:
            self._feature_sink.append(features[:n_atoms].detach())
        e_all = self.head(features).squeeze(-1)
        e = e_all[:n_atoms] - e_all[n_atoms:][inverse]
        energies = self.atom_energies(z, e, edge_index, vec.norm(dim=-1))
        energy = energies.new_zeros(batch.n_systems).index_add(0, batch.system_idx, energies)
        return ModelOutput(energy=energy, energies=energies)

    def atom_energies(self, z: Tensor, e: Tensor, edge_index: Tensor, r: Tensor) -> Tensor:
        """energies_i (n,) eV of the module docstring from the network's per-atom outputs.

        Args:
            z: (n,) atomic numbers.
            e: (n,) head output minus the head output of an isolated atom of the same species.
            edge_index: (2, E) edges (row 0 = centre atom).
            r: (E,) edge lengths in Å.

        An atom with no edge shorter than the cutoff gets e_i = 0, so it has exactly its isolated
        energy. The test is an ``index_add`` over the edges, with no value read back to the host,
        so the padded CUDA-graph step and the exported package use this method as they are.
        """
        within = (r < self.config.cutoff_A).to(e.dtype)
        has_neighbour = e.new_zeros(e.shape[0]).index_add(0, edge_index[0], within) > 0
        e = torch.where(has_neighbour, e, torch.zeros_like(e))
        energies = (e * self.energy_scale / self.config.avg_atoms + self.energy_shift
                    + self.element_reference[z])
        if self.repulsion is not None:
            energies = energies + self.repulsion(z, edge_index, r)
        return energies
