"""Tensors derived from parameters only (block matrices, scaled or gathered weights), built once.

Several blocks rearrange their weights before use: the SO(2) maps assemble [[W_r, -W_i],
[W_i, W_r]], the attention folds 1/sqrt(d) into its query and stacks the q, k and v weights, the
degree-wise layers gather one matrix per component. In training these must be rebuilt every call
(the result is part of the autograd graph), but in inference the weights do not change between
calls, and these small operations need not run again.

:func:`derived` caches the result on the module while none of the source tensors requires grad
(an inference-accelerated model freezes its parameters for each call). The cache key holds the
source tensors themselves, their version counters and their data pointers: any in-place update
(an optimizer step, ``load_state_dict``), a replaced parameter or a ``.to(dtype/device)`` misses the
cache, and holding the tensors (and their data) means their memory cannot be reused by another
tensor that would then look identical. Writes that bypass the version counter (through
``param.data``, or collectives such as ``torch.distributed.broadcast``) must be followed by
:func:`clear_derived` on the module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

__all__ = ["clear_derived", "constant", "derived"]

T = TypeVar("T")


def derived(owner: nn.Module, name: str, sources: Sequence[Tensor | None],
            build: Callable[[], T]) -> T:
    """``build()``, a function of ``sources`` only, cached on ``owner`` under ``name`` while no
    source requires grad (and outside torch.compile tracing, which folds it by itself)."""
    if torch.compiler.is_compiling() or any(t is not None and t.requires_grad for t in sources):
        return build()
    cache = owner.__dict__.setdefault("_derived_cache", {})
    hit = cache.get(name)
    if hit is not None and _same(hit[0], sources):
        return hit[1]
    value = build()
    # Per source: the tensor object, its version counter and a detached alias of its data. The
    # alias keeps the data alive, so a later ``param.data = ...`` (what Module.to/.double do,
    # keeping the Parameter object and its version) always shows as a different data pointer.
    cache[name] = ([None if t is None else (t, t._version, t.detach()) for t in sources], value)
    return value


def _same(key: list, sources: Sequence[Tensor | None]) -> bool:
    if len(key) != len(sources):
        return False
    for entry, t in zip(key, sources):
        if entry is None or t is None:
            if entry is not t:
                return False
            continue
        obj, version, data = entry
        if (obj is not t or version != t._version or data.data_ptr() != t.data_ptr()
                or data.dtype != t.dtype or data.device != t.device or data.shape != t.shape):
            return False
    return True


def clear_derived(module: nn.Module) -> None:
    """Drop the cached derived tensors of ``module`` and all its submodules."""
    for m in module.modules():
        m.__dict__.pop("_derived_cache", None)


_CONSTANTS: dict = {}


def constant(values, like: Tensor) -> Tensor:
    """``torch.tensor(values)`` in ``like``'s dtype and device, built once per (values, dtype,
    device): a tensor made from Python numbers on a GPU is a host-to-device copy that waits for
    the stream, once per call otherwise. ``values`` must be hashable (nested tuples of floats).
    Under torch.compile the plain constructor is traced (and folded) instead."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=like.dtype, device=like.device)
    key = (values, like.dtype, like.device)
    t = _CONSTANTS.get(key)
    if t is None:
        t = _CONSTANTS[key] = torch.tensor(values, dtype=like.dtype, device=like.device)
    return t
