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

    A crash mid-write leaves the previous checkpoint intact and no partial file under ``path``;
    the file gets mode ``0o666 & ~umask``.
    """
    atomic_torch_save({"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, **state}, path)


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint with ``weights_only=True`` (nothing in the file is executed).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: an empty, truncated, damaged or foreign file, or a newer checkpoint format
            (one line naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is not a readable est_calc checkpoint: the file is empty")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, disallowed global ...
        text = str(exc).strip()
        reason = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
        raise ValueError(f"{path} is not a readable est_calc checkpoint (truncated, damaged or "
                         f"a file of another kind): {reason}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an est_calc training checkpoint")
    if int(state.get("format_version", 0)) > CHECKPOINT_VERSION:
        raise ValueError(
            f"{path} has checkpoint format {state['format_version']}, newer than this "
            f"est_calc understands ({CHECKPOINT_VERSION}); upgrade est_calc"
        )
    return state
