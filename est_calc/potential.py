"""Potential: a model plus what a user needs to trust it; safe save/load and a registry by name.

A potential file is a plain dict of tensors and Python values written with ``torch.save``:

    {"format": "est_calc.potential", "format_version": 1, "est_calc_version": "0.1.0",
     "config": ModelConfig.to_dict(), "species": [29, 6, 8], "metadata": {...},
     "state_dict": {name: tensor}}

It is written atomically (a temporary file in the same folder, then ``os.replace``) and read with
``torch.load(weights_only=True)``, so nothing in a file is ever executed. Names such as
``"default"`` resolve through the ``potentials/`` folder of the source tree and
``<sys.prefix>/share/est_calc/potentials`` (see ``potentials/README.md``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
from ase.data import chemical_symbols
from torch import nn

import est_calc
from est_calc.atomic_io import atomic_torch_save

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Potential",
    "save_potential",
    "load_potential",
    "list_potentials",
    "potential_dirs",
    "RETIRED",
]

FORMAT = "est_calc.potential"
FORMAT_VERSION = 1
_REQUIRED_KEYS = ("format", "format_version", "config", "species", "state_dict")
_PLAIN_SCALARS = (str, int, float, bool, type(None))


def _check_plain(value: Any, where: str) -> None:
    """Raise ValueError unless ``value`` is built from plain Python values only."""
    if isinstance(value, _PLAIN_SCALARS):
        return
    if isinstance(value, (list, tuple)):
        for k, v in enumerate(value):
            _check_plain(v, f"{where}[{k}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where} has a non-string key {k!r}")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise ValueError(
        f"{where} is a {type(value).__name__}; metadata may hold only str, int, float, bool, "
        "None, lists and dicts"
    )


class DefaultPotentialMissing(FileNotFoundError):
    """No default potential ships with this installation (``ESTCalculator()`` needs one)."""


def _symbol(z: int) -> str:
    return chemical_symbols[z] if 0 < z < len(chemical_symbols) else f"Z={z}"


class Potential(nn.Module):
    """An ``ESTModel`` with the elements it was trained on and a description of where it came from.

    Attributes:
        model: the ``ESTModel`` (energy per structure, eV; per-element reference energies are
            its ``element_reference`` buffer).
        uncertainty: the :class:`est_calc.uncertainty.LatentDistance` fitted for this model
            (loaded from the file's ``.uncertainty`` sidecar), or None.
        config: the model's ``ModelConfig``.
        species: sorted tuple of the atomic numbers the potential knows.
        metadata: plain-value dict (training data summary, metrics, ``units`` = "eV/Å",
            ``est_calc_version`` of the code that made it).
    """

    def __init__(self, model: nn.Module, config, species: Iterable[int], metadata=None,
                 uncertainty: nn.Module | None = None):
        super().__init__()
        species = tuple(sorted({int(z) for z in species}))
        if not species:
            raise ValueError("a potential needs at least one element in `species`")
        bad = [z for z in species if not 1 <= z <= 118]
        if bad:
            raise ValueError(f"species must be atomic numbers 1..118, got {bad}")
        metadata = dict(metadata or {})
        _check_plain(metadata, "metadata")
        metadata.setdefault("units", "eV/Å")
        metadata.setdefault("est_calc_version", est_calc.__version__)
        metadata.setdefault("format_version", FORMAT_VERSION)
        self.model = model
        self.config = config
        self.species = species
        self.metadata = metadata
        # The per-atom uncertainty estimate (est_calc.uncertainty.LatentDistance) or None, and
        # why there is none (for the message of ESTCalculator(uncertainty=True)). Kept out of
        # the module tree, so state_dict() (checkpoints, training) holds the model only; _apply
        # moves and casts it with the potential.
        self.__dict__["uncertainty"] = uncertainty
        self.uncertainty_problem = None if uncertainty is not None else (
            "this potential has no uncertainty part")

    def __setattr__(self, name, value):
        if name == "uncertainty":  # not a submodule (see __init__)
            self.__dict__["uncertainty"] = value
            return
        super().__setattr__(name, value)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        if self.__dict__.get("uncertainty") is not None:
            self.__dict__["uncertainty"] = self.__dict__["uncertainty"]._apply(fn, *args, **kwargs)
        return out

    @classmethod
    def from_config(cls, config, species: Sequence[int], metadata: Optional[dict] = None):
        """An untrained potential.

        Args:
            config: a ``ModelConfig`` or the name of a preset ("tiny", "small", "medium").
            species: atomic numbers the potential will accept.
            metadata: optional plain-value dict.
        """
        from est_calc.model import ESTModel, ModelConfig

        if isinstance(config, str):
            config = ModelConfig.preset(config)
        return cls(ESTModel(config), config, species, metadata)

    @property
    def cutoff_A(self) -> float:
        """Interaction cutoff in Å (from the model config)."""
        return float(self.config.cutoff_A)

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def check_species(self, atomic_numbers) -> None:
        """Raise ValueError if any atomic number is not one the potential knows.

        Args:
            atomic_numbers: iterable or tensor of atomic numbers.
        """
        if isinstance(atomic_numbers, torch.Tensor):
            present = set(atomic_numbers.unique().tolist())
        else:
            present = {int(z) for z in atomic_numbers}
        unknown = sorted(present - set(self.species))
        if unknown:
            names = ", ".join(_symbol(z) for z in unknown)
            raise ValueError(
                f"this potential does not know element(s) {names}; "
                f"it supports {', '.join(_symbol(z) for z in self.species)}"
            )

    def forward(self, batch, graph):
        """``ModelOutput(energy (n_systems,), energies (n_atoms,))`` in eV.

        The model casts the batch to its dtype and device on entry (differentiably, so forces
        still flow back to the caller's positions).
        """
        return self.model(batch, graph)


def save_potential(potential: Potential, path: Union[str, os.PathLike]) -> Path:
    """Write ``potential`` to ``path`` atomically; returns the path.

    The file is first written to a temporary file in the same folder and then renamed over
    ``path``, so a crash or a full disk never leaves a partial file under that name; an
    exception removes the temporary file. The file gets mode ``0o666 & ~umask``, as any new file.
    """
    path = Path(path)
    state = {}
    for name, value in potential.model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"state_dict entry {name!r} is not a tensor")
        state[name] = value.detach().cpu()
    _check_plain(potential.metadata, "metadata")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "est_calc_version": est_calc.__version__,
        "config": potential.config.to_dict(),
        "species": list(potential.species),
        "metadata": dict(potential.metadata),
        "state_dict": state,
    }
    _check_plain(payload["config"], "config")
    return atomic_torch_save(payload, path)


# --------------------------------------------------------------------------------------------
# registry


#: Names of potentials that earlier versions shipped, and why they are gone (the files remain
#: in the project's history and load by path, with a LegacyNormWarning in float32).
RETIRED = {
    "est-emt-small-v6": (
        "retired in est_calc 0.2 because its l > 0 norm amplifies float32 rounding on ideal "
        "crystals (forces of 1e5 eV/Å in float32; issue 21); use 'est-emt-small' (version 8), "
        "or load the old file by path with dtype='float64'"),
}


def potential_dirs() -> list[Path]:
    """Folders searched for named potentials, in order: the source tree, then the install."""
    dirs = [
        Path(est_calc.__file__).resolve().parent.parent / "potentials",
        Path(sys.prefix) / "share" / "est_calc" / "potentials",
    ]
    out = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def list_potentials() -> list[str]:
    """Names of the potentials found in :func:`potential_dirs` (file stems of ``*.pt``)."""
    names = set()
    for d in potential_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.pt"))
    return sorted(names)


def _resolve(name_or_path: Union[str, os.PathLike]) -> Path:
    """Turn a registry name or a path into an existing file path."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    name = str(name_or_path)
    looks_like_path = os.sep in name or "/" in name or name.endswith(".pt")
    if looks_like_path:
        raise FileNotFoundError(f"no potential file at {str(path)!r}")
    if name == "default":
        for d in potential_dirs():
            marker = d / "DEFAULT"
            if marker.is_file():
                target = marker.read_text().strip()
                candidate = d / (target if target.endswith(".pt") else f"{target}.pt")
                if target and candidate.is_file():
                    return candidate
                raise FileNotFoundError(
                    f"{marker} names the default potential {target!r}, but {candidate} is missing"
                )
        raise DefaultPotentialMissing(
            "no default potential ships with this version of est_calc yet; train one "
            "(`est train`) and pass its file, e.g. load_potential('path/to/model.pt') or "
            "ESTCalculator(model='path/to/model.pt')"
        )
    for d in potential_dirs():
        candidate = d / f"{name}.pt"
        if candidate.is_file():
            return candidate
    if name in RETIRED:
        raise FileNotFoundError(f"potential {name!r} is no longer shipped: {RETIRED[name]}")
    known = list_potentials()
    raise FileNotFoundError(
        f"unknown potential {name!r}: not a file and not a registered name "
        f"(registered: {', '.join(known) if known else 'none'}; searched "
        f"{', '.join(str(d) for d in potential_dirs())})"
    )


def _read_payload(path: Path) -> Mapping[str, Any]:
    """torch.load with weights_only=True; every failure to parse becomes a ValueError."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as err:  # noqa: BLE001 - unpickling errors come in many types
        raise ValueError(
            f"{str(path)!r} is not a readable est_calc potential (truncated, corrupted, or a "
            f"file of another kind; only plain tensors and values are accepted): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not an est_calc potential (no format={FORMAT!r} tag)")
    missing = [k for k in _REQUIRED_KEYS if k not in payload]
    if missing:
        raise ValueError(f"{str(path)!r} is missing key(s) {missing}; the file is incomplete")
    version = payload["format_version"]
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"{str(path)!r} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} was written by a newer est_calc (potential format_version {version}, "
            f"this est_calc {est_calc.__version__} reads up to {FORMAT_VERSION}); upgrade est_calc"
        )
    return payload


def load_potential(
    name_or_path: Union[str, os.PathLike], device="cpu", dtype: torch.dtype = torch.float32
) -> Potential:
    """Load a potential by registry name ("default", a file stem in ``potentials/``) or path.

    Args:
        name_or_path: registry name or path to a ``.pt`` file.
        device: where the model will run.
        dtype: floating dtype of the model (float32 by default, float64 for finite-difference
            work).

    Raises:
        FileNotFoundError: no such file or name (also: no default potential ships yet).
        ValueError: the file is truncated, corrupted, of another kind, has missing keys or weights
            that do not fit its config, or comes from a newer format version.
    """
    from est_calc.model import ESTModel, ModelConfig

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    path = _resolve(name_or_path)
    payload = _read_payload(path)
    try:
        config = ModelConfig.from_dict(payload["config"])
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{str(path)!r} holds an invalid model config: {err}") from None
    model = ESTModel(config).to(device=device, dtype=dtype)
    state = payload["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} has a state_dict that is not a dict of tensors")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{str(path)!r}: weights do not fit the stored config: {str(err).splitlines()[0]}"
        ) from None
    metadata = dict(payload.get("metadata") or {})
    from est_calc.uncertainty import load_uncertainty

    uncertainty, problem = load_uncertainty(path)
    if uncertainty is not None:
        uncertainty = uncertainty.to(device=device, dtype=dtype)
    pot = Potential(model, config, payload["species"], metadata, uncertainty)
    if problem is not None:
        pot.uncertainty_problem = problem
    pot.eval()
    return pot
