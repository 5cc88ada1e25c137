"""The one place a device name ("auto", "cpu", "cuda", "cuda:N", "mps") becomes a torch device.

The calculator, the trainer, the training config, the command-line tools and the benchmarks all
call :func:`resolve_device` (or :func:`parse_device` where only the spelling can be checked, as
in a config file that may be run on another machine), so a device is accepted or refused the
same way, with the same one-line messages, everywhere. ``what`` names the option in those
messages (``device``, ``--device``, ``train.device``).
"""

from __future__ import annotations

import torch

__all__ = ["DEVICE_FORMS", "parse_device", "resolve_device"]

#: The device names est_calc accepts, as the error messages list them.
DEVICE_FORMS = '"auto" (CUDA when available, else the CPU), "cpu", "cuda", "cuda:N" or "mps"'

_TYPES = ("cpu", "cuda", "mps")


def parse_device(device: str | torch.device, *, what: str = "device") -> torch.device | None:
    """The torch device ``device`` names, without asking whether this machine has it.

    Returns:
        None for "auto", else the ``torch.device``.

    Raises:
        ValueError: not a device name, or a device type est_calc does not run on (one line
            naming ``what``, the value and the valid forms).
    """
    if isinstance(device, str) and device == "auto":
        return None
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"{what} {device!r} is not a device; use {DEVICE_FORMS}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{what} {device!r} is not a device; use {DEVICE_FORMS}") from None
    if dev.type not in _TYPES:
        raise ValueError(f"{what} {device!r}: est_calc runs on the CPU, CUDA and MPS devices; "
                         f"use {DEVICE_FORMS}")
    return dev


def resolve_device(device: str | torch.device, *, what: str = "device") -> torch.device:
    """The torch device ``device`` names, checked against this machine.

    "auto" is CUDA (the current CUDA device) when available, else the CPU; "cpu", "cuda",
    "cuda:N", "mps" and the equivalent ``torch.device`` objects are taken as given once the
    device exists here.

    Raises:
        ValueError: what :func:`parse_device` refuses, CUDA asked for on a machine without
            CUDA, a CUDA index beyond the devices present, or MPS not available (one line
            naming ``what`` and the value).
    """
    dev = parse_device(device, what=what)
    if dev is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = "" if torch.backends.cuda.is_built() else ", which was built without CUDA"
            raise ValueError(f"{what} {device!r}: CUDA is not available on this machine (torch "
                             f'{torch.__version__}{built}); use "cpu" or "auto"')
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{what} {device!r}: this machine has {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f'{what} {device!r}: MPS is not available on this machine; use "cpu" '
                         'or "auto"')
    return dev
