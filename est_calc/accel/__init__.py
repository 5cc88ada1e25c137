"""Speed-ups of the plain EST that leave its function unchanged, applied by one call.

::

    fast = accelerate(potential)                    # training: double backward, trainable weights
    fast = accelerate(potential, inference=True)    # forces and stress of frozen weights
    fast = accelerate(potential, inference=True, attention_dtype=torch.bfloat16)

``accelerate`` returns a new module tree that shares every parameter and buffer with the one it is
given (a ``Potential``, an ``ESTModel`` or any of their blocks): the modules listed below are
replaced by subclasses with faster ``forward`` passes, and every module on the path to one of them
is a shallow copy, so parameter names, ``state_dict`` keys and the parameter order are those of
the plain model (checkpoints and optimizer states are interchangeable) and the given tree is left
as it was, still runnable: it is the reference (tests/unit/test_accelerate.py compares the two in
float64: values, forces, stress and, for training, gradients of force losses). An in-place change
of a weight (an optimizer step, ``load_state_dict``, ``.to()``) is seen by both.

==========================  ======================================  ===============================
plain (est_calc.nn, model)  accelerated (est_calc.accel)            what changes
==========================  ======================================  ===============================
ESTModel                    model.FastESTModel                      paired edge rotations, harmonics
                                                                    read off them, frozen weights
                                                                    per call (``inference``)
SO2MessageBlock,            so2_message.FastSO2MessageBlock,        paired edges, blocked radial
ScalarSO2MessageBlock       FastScalarSO2MessageBlock               modulation (``inference``),
                                                                    maps on m-groups, bounded
                                                                    softmax
SO2Linear                   so2_linear.FastSO2Linear                pair block matrices, whole-
                                                                    tensor maps (``inference``)
ESTMessageBlock,            est_message.FastESTMessageBlock,        node side folded into one
ScalarESTMessageBlock       FastScalarESTMessageBlock               product
SphericalAttention          attention.FastSphericalAttention        stacked projections, hand-
                                                                    written core, fused SDPA on GPUs
                                                                    (``inference``), reduced-
                                                                    precision core
MixtureOfHybridExperts      layers.FastMixtureOfHybridExperts       gate and scalar_out in one product
DWLinear,                   layers.FastDWLinear,                    cached gathered weights
EquivariantLayerNorm        FastEquivariantLayerNorm
==========================  ======================================  ===============================

Supporting modules: ``weights`` (caches of parameter-derived tensors, valid while the weights are
frozen), ``gather`` (row gathers with contiguous backwards), ``modulated_map`` (the blocked radial
modulation). ``graphs`` (:class:`~est_calc.accel.graphs.CapturedStep`) records one structure's
whole step, forward and force backward, at padded atom and edge counts as a CUDA graph and
replays it (``ESTCalculator(cuda_graph=True)``).

``inference=True`` is for first derivatives of frozen weights (the calculator, evaluation): the
parameters are frozen for each forward pass, so no parameter gradient is computed, and on a GPU
the fused attention kernels have no second derivative. Training uses the default.
``torch.compile`` (``ESTModel.enable_compile``) and activation checkpointing
(``ESTModel.checkpoint_layers``) work on the accelerated model; compile after accelerating.
"""

from __future__ import annotations

from typing import NamedTuple, TypeVar

import torch
from torch import nn

from est_calc.accel.attention import ATTENTION_DTYPES, FastSphericalAttention
from est_calc.accel.est_message import FastESTMessageBlock, FastScalarESTMessageBlock
from est_calc.accel.layers import FastDWLinear, FastEquivariantLayerNorm, FastMixtureOfHybridExperts
from est_calc.accel.model import FastESTModel
from est_calc.accel.so2_linear import FastSO2Linear
from est_calc.accel.so2_message import FastScalarSO2MessageBlock, FastSO2MessageBlock
from est_calc.model import ESTModel
from est_calc.nn.attention import SphericalAttention
from est_calc.nn.experts import MixtureOfHybridExperts
from est_calc.nn.message import ESTMessageBlock, ScalarESTMessageBlock
from est_calc.nn.message_so2 import ScalarSO2MessageBlock, SO2Linear, SO2MessageBlock
from est_calc.nn.so3 import DWLinear, EquivariantLayerNorm

__all__ = ["ATTENTION_DTYPES", "AccelerationOptions", "accelerate", "is_accelerated"]

#: plain class -> accelerated class (exact types: a subclass of a plain block is not swapped).
SWAPS: dict[type, type] = {
    ESTModel: FastESTModel,
    SO2MessageBlock: FastSO2MessageBlock,
    ScalarSO2MessageBlock: FastScalarSO2MessageBlock,
    SO2Linear: FastSO2Linear,
    ESTMessageBlock: FastESTMessageBlock,
    ScalarESTMessageBlock: FastScalarESTMessageBlock,
    SphericalAttention: FastSphericalAttention,
    MixtureOfHybridExperts: FastMixtureOfHybridExperts,
    DWLinear: FastDWLinear,
    EquivariantLayerNorm: FastEquivariantLayerNorm,
}
_ACCELERATED = frozenset(SWAPS.values())

M = TypeVar("M", bound=nn.Module)


class AccelerationOptions(NamedTuple):
    """What ``accelerate`` was asked for; each accelerated module reads what concerns it."""

    inference: bool
    attention_dtype: torch.dtype | None


def accelerate(module: M, *, inference: bool = False,
               attention_dtype: torch.dtype | None = None) -> M:
    """The accelerated form of ``module`` (see the module docstring), sharing its parameters.

    Args:
        module: a ``Potential``, an ``ESTModel`` or a block; an accelerated one is accelerated
            again from the same parameters with the new options.
        inference: frozen weights and first derivatives only (the calculator, evaluation).
        attention_dtype: None (the model's dtype), ``torch.bfloat16`` or ``torch.float16`` for
            the spherical-attention core only.

    Returns:
        A module of the same kind whose forward gives the same function.
    """
    if attention_dtype not in ATTENTION_DTYPES.values():
        raise ValueError(f"attention_dtype must be None, torch.bfloat16 or torch.float16, got "
                         f"{attention_dtype!r}")
    return _view(module, AccelerationOptions(bool(inference), attention_dtype))


def is_accelerated(module: nn.Module) -> bool:
    """Whether ``module`` or any module below it is an accelerated block."""
    return any(type(m) in _ACCELERATED for m in module.modules())


def _view(module: nn.Module, options: AccelerationOptions) -> nn.Module:
    """``module`` with its swappable descendants swapped; shares parameters and buffers (the
    ``_parameters`` and ``_buffers`` dicts themselves) and returns untouched subtrees as they are.
    Hooks present are copied; hooks registered later on one tree do not reach the other.
    """
    cls = type(module)
    fast = cls if cls in _ACCELERATED else SWAPS.get(cls)
    children = {name: None if child is None else _view(child, options)
                for name, child in module._modules.items()}
    if fast is None and all(children[name] is child for name, child in module._modules.items()):
        return module
    new = object.__new__(fast or cls)
    new.__dict__.update(module.__dict__)
    new._modules = children
    for key, value in module.__dict__.items():  # hooks registered on one tree stay on it
        if "hooks" in key and isinstance(value, dict):
            new.__dict__[key] = type(value)(value)
    if fast is not None:
        new._accelerate(options)
    return new
