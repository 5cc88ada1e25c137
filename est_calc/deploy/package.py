"""Reading, checking and running a deployment package (``.pt2``).

The package's AOTInductor metadata is a map of strings (``aot_inductor.metadata`` when compiling;
``AOTIModelPackageLoader::get_metadata()`` in C++), with these keys of est_calc's:

=======================  ==========================================================
key                      value
=======================  ==========================================================
``est_format``           "est_calc.deploy" (anything else is a foreign file)
``est_format_version``   "2": the signature of the package docstring (version 1
                         took every edge in both directions; est_calc refuses it)
``est_calc_version``     version of the est_calc that exported it
``torch_version``        version of the torch that compiled it (the package runs
                         only under the same major.minor version)
``species``              atomic numbers, space-separated ("1 6 8 29")
``symbols``              the same as chemical symbols ("H C O Cu")
``cutoff_A``             r_c in Å
``n_layers``             message-passing layers
``interaction_range_A``  (n_layers + 1) x r_c: how far ghost atoms must reach (the
                         edge-degree embedding adds one hop to the n_layers layers)
``dtype``                "float32" or "float64": every float input and output
``device``               "cpu" or "cuda"
``threads``              "serial" or "openmp": the CPU kernels' loops (the export
                         docstring; absent in packages before it, which are OpenMP)
``inputs``, ``outputs``  the argument and result names, in order
``units``                "eV Angstrom"
``source``               the potential's name or path
``model_config``         the ModelConfig as JSON
``potential_metadata``   the potential's metadata as JSON
=======================  ==========================================================

:func:`read_metadata` reads them from the zip archive without loading the compiled code, so a
foreign or mismatched file is refused with a one-line ValueError before anything of it runs.
Loading a package (:func:`load_package`) loads native code compiled into it: load only files
from a source you trust, as with any shared library.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import NamedTuple

import torch
import torch._inductor  # AOTInductor; `import torch` alone does not load it
from torch import Tensor, nn

import est_calc

__all__ = ["FORMAT", "FORMAT_VERSION", "INPUTS", "OUTPUTS", "DeployedPotential",
           "PackageDerivatives", "is_package_path", "load_package", "read_metadata"]

FORMAT = "est_calc.deploy"
#: 2: each pair of neighbours given once (``edge_index`` (2, P)); 1 (earlier packages): both
#: directions. A version-1 package given one direction would count each pair
#: once instead of twice, so versions are never mixed: readers refuse any other version.
FORMAT_VERSION = 2
INPUTS = ("positions", "atomic_numbers", "edge_index", "edge_shifts", "local_mask")
OUTPUTS = ("energy", "energies", "forces", "virial", "atom_virial")
_REQUIRED = ("est_format_version", "est_calc_version", "torch_version", "species", "cutoff_A",
             "n_layers", "dtype", "device", "inputs", "outputs", "model_config")
#: Where AOTInductor stores the metadata inside the archive.
_METADATA_PATTERN = "*/data/aotinductor/*/*_metadata.json"
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def is_package_path(model) -> bool:
    """Whether ``model`` (a name, a path or an object) names a ``.pt2`` package file."""
    return isinstance(model, (str, os.PathLike)) and str(model).endswith(".pt2")


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The est_calc metadata of the package at ``path``, checked (module docstring).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a zip archive, not an AOTInductor package of est_calc's, a package format
            version this est_calc does not read, or a package compiled by another torch version
            (one line each, naming the file).
    """
    path = Path(path).expanduser()
    where = repr(str(path))
    if not path.is_file():
        raise FileNotFoundError(f"no deployment package at {where}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{where} is not an est_calc deployment package (not a .pt2 zip "
                         f"archive: a file of another kind, or truncated; export one with "
                         f"`est export`)")
    try:
        with zipfile.ZipFile(path) as archive:
            names = sorted(n for n in archive.namelist()
                           if fnmatch.fnmatch(n, _METADATA_PATTERN))
            found = [json.loads(archive.read(n)) for n in names]
    except (zipfile.BadZipFile, OSError, ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{where} is not a readable deployment package "
                         f"({type(err).__name__}: {err})") from None
    meta = next((m for m in found if isinstance(m, dict) and "est_format" in m), None)
    if meta is None or meta.get("est_format") != FORMAT:
        raise ValueError(f"{where} is not an est_calc deployment package (no est_format="
                         f"{FORMAT!r} in its AOTInductor metadata)")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"{where} lacks the metadata {missing}; the package is incomplete")
    version = meta["est_format_version"]
    if version != str(FORMAT_VERSION):
        raise ValueError(
            f"{where} has package format version {version} (est_calc "
            f"{meta['est_calc_version']}); this est_calc {est_calc.__version__} runs version "
            f"{FORMAT_VERSION}: export it again with this est_calc (`est export`)")
    if _major_minor(meta["torch_version"]) != _major_minor(torch.__version__):
        raise ValueError(
            f"{where} was compiled by torch {meta['torch_version']}; this is torch "
            f"{torch.__version__}, and compiled packages run only under the torch version that "
            f"made them: export it again here (`est export`)")
    if meta["dtype"] not in _DTYPES:
        raise ValueError(f"{where} has an unknown dtype {meta['dtype']!r}")
    return {str(k): str(v) for k, v in meta.items()}


class PackageDerivatives(NamedTuple):
    """Per structure of a batch: energy (b,), energies (n,), forces (n, 3), virial (b, 3, 3)."""

    energy: Tensor
    energies: Tensor
    forces: Tensor
    virial: Tensor


class PackageModel(nn.Module):
    """The compiled function of a package (its ``model``, as ``Potential.model`` is an ESTModel).

    Attributes:
        config: the ``ModelConfig`` it was exported from (read-only information).
    """

    def __init__(self, runner, config):
        super().__init__()
        # Kept out of the module tree: a traced runner is itself a module, but one that refuses
        # train()/eval(); the package's function has no training mode.
        self.__dict__["_runner"] = runner
        self.config = config

    def forward(self, positions: Tensor, atomic_numbers: Tensor, edge_index: Tensor,
                edge_shifts: Tensor, local_mask: Tensor) -> tuple[Tensor, ...]:
        """The package's outputs (energy, energies, forces, virial, atom_virial). The compiled
        code reads its inputs as dense row-major arrays: they are made contiguous here."""
        inputs = (positions, atomic_numbers, edge_index, edge_shifts, local_mask)
        return tuple(self._runner(*(t.contiguous() for t in inputs)))

    @contextlib.contextmanager
    def checkpoint_layers(self, enabled: bool = True):
        """Nothing to checkpoint: a compiled package keeps no activations between calls."""
        if enabled:
            raise ValueError("low_memory does not apply to a compiled package")
        yield self


class DeployedPotential(nn.Module):
    """A loaded package, usable where a ``Potential`` is (the calculator, ``energy_forces_stress``,
    which takes its derivatives from :meth:`derivatives`).

    Attributes:
        path: the package file.
        metadata: its metadata (strings; module docstring).
        species: sorted tuple of the atomic numbers it accepts.
        config: the ``ModelConfig`` it was exported from.
        model: the :class:`PackageModel`.
    """

    differentiates_itself = True

    def __init__(self, path: Path, runner, metadata: dict[str, str]):
        """``runner``: the compiled package (``aoti_load_package``), or any callable with its
        signature (e.g. ``trace(...).module()``, the graph before compiling)."""
        super().__init__()
        from est_calc.model import ModelConfig

        self.path = Path(path)
        self.metadata = dict(metadata)
        self.species = tuple(int(z) for z in metadata["species"].split())
        self.config = ModelConfig.from_dict(json.loads(metadata["model_config"]))
        self.model = PackageModel(runner, self.config)
        self._dtype = _DTYPES[metadata["dtype"]]
        self._device = torch.device(metadata["device"])

    @property
    def cutoff_A(self) -> float:
        """Interaction cutoff in Å."""
        return float(self.metadata["cutoff_A"])

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def check_species(self, atomic_numbers) -> None:
        """Raise ValueError naming the elements the package does not know and those it does."""
        from est_calc.potential import _symbol

        if isinstance(atomic_numbers, Tensor):
            present = set(atomic_numbers.unique().tolist())
        else:
            present = {int(z) for z in atomic_numbers}
        unknown = sorted(present - set(self.species))
        if unknown:
            raise ValueError(
                f"the package {self.path.name} does not know element(s) "
                f"{', '.join(_symbol(z) for z in unknown)}; it supports "
                f"{', '.join(_symbol(z) for z in self.species)}")

    def forward(self, positions: Tensor, atomic_numbers: Tensor, edge_index: Tensor,
                edge_shifts: Tensor, local_mask: Tensor) -> tuple[Tensor, ...]:
        """The package's outputs (energy, energies, forces, virial, atom_virial)."""
        return self.model(positions, atomic_numbers, edge_index, edge_shifts, local_mask)

    def derivatives(self, batch, graph) -> PackageDerivatives:
        """Energies, forces and virials of every structure of an ``AtomsBatch``.

        The graph (both directions of every pair, as est_calc's neighbour lists are) is given
        to the package one direction per pair (:func:`est_calc.neighbors.pairing.one_direction`;
        ValueError for a list that is not symmetric), its unit shifts become shift vectors with
        each centre's cell, all atoms are local, and energies and per-atom virials are summed
        per structure.
        """
        from est_calc.neighbors.pairing import one_direction

        batch = batch.to(device=self.device, dtype=self.dtype)
        edge_index, unit_shifts = one_direction(graph.edge_index.to(self.device),
                                                graph.shifts.to(self.device),
                                                paired=getattr(graph, "paired", False))
        i = edge_index[0]
        shifts = torch.einsum("ea,eab->eb", unit_shifts.to(self.dtype),
                              batch.cell[batch.system_idx[i]])
        n = batch.n_atoms
        mask = torch.ones(n, dtype=torch.bool, device=self.device)
        _, energies, forces, _, atom_virial = self(batch.positions, batch.atomic_numbers,
                                                   edge_index, shifts, mask)
        b = batch.n_systems
        energy = energies.new_zeros(b).index_add(0, batch.system_idx, energies)
        virial = atom_virial.new_zeros(b, 3, 3).index_add(0, batch.system_idx, atom_virial)
        return PackageDerivatives(energy, energies, forces, virial)


class _NarrowerIsaIsFine(logging.Filter):
    """Drops torch's load-time warning that a CPU package was compiled for another instruction
    set than the widest of this CPU when the package's is one this CPU has (AVX2 kernels,
    :func:`est_calc.deploy.export.vector_settings`, on an AVX-512 machine): such a package runs
    here. Any other mismatch is still reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Device information mismatch") or len(record.args) < 3:
            return True
        key, package = record.args[0], record.args[2]
        if key != "AOTI_CPU_ISA":
            return True
        from torch._inductor.cpu_vec_isa import valid_vec_isa_list

        return str(package).strip().lower() not in {str(isa).lower() for isa in valid_vec_isa_list()}


@contextlib.contextmanager
def _quiet_compatible_isa():
    log = logging.getLogger("torch.export.pt2_archive._package")
    quiet = _NarrowerIsaIsFine()
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


def aoti_load(path: str | os.PathLike):
    """``torch._inductor.aoti_load_package`` without the warning :class:`_NarrowerIsaIsFine`
    drops."""
    with _quiet_compatible_isa():
        return torch._inductor.aoti_load_package(str(path))


def load_package(path: str | os.PathLike, *, device=None, dtype=None) -> DeployedPotential:
    """Load a package after checking its metadata (:func:`read_metadata`).

    Args:
        path: the ``.pt2`` file.
        device: None (the package's) or the device the caller runs on; it must be the
            package's (a CPU package does not run on a GPU nor the reverse).
        dtype: None (the package's) or the dtype the caller expects; it must be the package's.

    Raises:
        FileNotFoundError, ValueError: as :func:`read_metadata`; a device or dtype other than the
            package's; the compiled code does not load here.
    """
    path = Path(path).expanduser()
    meta = read_metadata(path)
    where = repr(str(path))
    if dtype is not None:
        if isinstance(dtype, str):
            dtype = _DTYPES.get(dtype, dtype)
        if dtype != _DTYPES[meta["dtype"]]:
            got = str(dtype).removeprefix("torch.")
            raise ValueError(f"{where} was exported in {meta['dtype']}, not {got}: pass "
                             f"dtype={meta['dtype']!r}, or export it again with --dtype {got}")
    if device is not None and torch.device(device).type != meta["device"]:
        raise ValueError(f"{where} was compiled for {meta['device']}, not "
                         f"{torch.device(device).type}: pass device={meta['device']!r}, or "
                         f"export it again with --device {torch.device(device).type}")
    if meta["device"] == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{where} was compiled for CUDA and this machine has no CUDA device")
    try:
        runner = aoti_load(path)
    except Exception as err:  # noqa: BLE001 - the C++ loader raises RuntimeError of many kinds
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{where}: the compiled package does not load here: {first}") from None
    return DeployedPotential(path, runner, meta).eval()
