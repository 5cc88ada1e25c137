"""torch.distributed helpers: start-up from torchrun's environment, gradient and value sums.

With ``torchrun --nproc_per_node=P`` each process reads WORLD_SIZE / RANK / LOCAL_RANK; gloo is used
on CPU and nccl on CUDA. Without those variables everything is a no-op (one process).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["setup", "cleanup", "local_rank", "all_reduce_sum", "all_reduce_max",
           "all_reduce_gradients", "broadcast_parameters", "barrier", "is_distributed"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def setup() -> tuple[int, int]:
    """Initialise the process group if launched by torchrun; return (rank, world_size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not is_distributed():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _device() -> torch.device:
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_numbers(values: list[float], op) -> list[float]:
    """Reduce plain numbers over all processes with ``op``, element by element (float64)."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=op)
    return t.tolist()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum plain numbers over all processes (float64)."""
    return _all_reduce_numbers(values, dist.ReduceOp.SUM)


def all_reduce_max(values: list[float]) -> list[float]:
    """Largest value over all processes, element by element (float64)."""
    return _all_reduce_numbers(values, dist.ReduceOp.MAX)


def all_reduce_gradients(module: torch.nn.Module) -> None:
    """Give every trainable parameter a gradient and sum the gradients over processes (losses
    are already divided by global counts).

    Parameters the loss did not reach (the last layer's spherical branch, which the energy's
    scalar readout skips, or message blocks of a batch without edges) get a zero gradient, in
    one process as in several: every process then reduces the same tensors, and the optimizer
    treats those parameters alike either way (weight decay, moment decay).
    """
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not is_distributed():
        return
    for p in params:
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Make every process start from rank 0's parameters and buffers."""
    if not is_distributed():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)
