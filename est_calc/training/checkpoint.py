"""Resumable training checkpoints: tensors and plain values only, atomic writes, safe reads."""

from __future__ import annotations

from pathlib import Path

import torch

from est_calc.atomic_io import atomic_torch_save

__all__ = ["save_checkpoint", "load_checkpoint", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION"]

CHECKPOINT_FORMAT = "est_calc.training_checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically: a temp file in the same folder, then os.replace.

    A crash mid-write leaves the previous checkpoint intact and no partial file under ``path``.
    """
    atomic_torch_save({"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, **state}, path)


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint with ``weights_only=True``; a foreign or damaged file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, disallowed global ...
        raise ValueError(f"{path} is not a readable est_calc checkpoint: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an est_calc training checkpoint")
    if int(state.get("format_version", 0)) > CHECKPOINT_VERSION:
        raise ValueError(
            f"{path} has checkpoint format {state['format_version']}, newer than this "
            f"est_calc understands ({CHECKPOINT_VERSION}); upgrade est_calc"
        )
    return state
