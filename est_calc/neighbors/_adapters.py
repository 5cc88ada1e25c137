"""Adapters to the optional neighbour-list libraries: vesin-torch, matscipy and torch_cluster.

Every adapter takes a checked :class:`Prepared` problem and returns ``(edge_index, shifts)`` as
int64 tensors on the input device, with the same pair rule as ASE. Libraries are imported
lazily; a missing one raises ImportError naming what to install.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._common import Prepared, completed_basis, empty_result

__all__ = ["vesin_available", "vesin_neighbor_list", "matscipy_neighbor_list",
           "torch_cluster_neighbor_list"]

_VESIN_MAX_TORCH = (2, 15)  # vesin-torch 0.6.2 ships binaries for torch < 2.15


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _import_vesin():
    if _torch_version() >= _VESIN_MAX_TORCH:
        raise ImportError(
            f"vesin-torch 0.6.2 supports torch < 2.15, found torch {torch.__version__}; "
            'use backend="torch" or install a vesin-torch built for this torch'
        )
    try:  # vesin-torch's own module name; vesin.torch is its deprecated alias
        import vesin_torch as vt  # noqa: PLC0415 - optional dependency, imported lazily
    except ImportError:
        vt = None
    if vt is not None:
        return vt
    try:
        import vesin.torch as vt  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            'backend="vesin" needs vesin-torch: `pip install vesin-torch` '
            f"(import failed: {exc})"
        ) from exc
    return vt


def vesin_available() -> bool:
    """True when vesin-torch imports and supports the installed torch."""
    try:
        _import_vesin()
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def _per_system(prep: Prepared):
    """Yield (system index, atom indices (n_s,)) for every non-empty system."""
    sidx = prep.system_idx
    if prep.n_systems == 1:
        yield 0, None
        return
    order = torch.argsort(sidx, stable=True)
    counts = torch.bincount(sidx, minlength=prep.n_systems).tolist()
    start = 0
    for s, c in enumerate(counts):
        if c:
            yield s, order[start:start + c]
        start += c


def _collect(parts, device) -> tuple[Tensor, Tensor]:
    if not parts:
        return empty_result(device)
    ei = torch.cat([p[0] for p in parts], dim=1)
    sh = torch.cat([p[1] for p in parts], dim=0)
    return ei, sh


def vesin_neighbor_list(prep: Prepared) -> tuple[Tensor, Tensor]:
    """Neighbour pairs with vesin-torch (CPU and CUDA); one call per system."""
    dev = prep.device
    if prep.n_atoms == 0 or prep.cutoff == 0:
        return empty_result(dev)
    vt = _import_vesin()
    calc = vt.NeighborList(cutoff=prep.cutoff, full_list=True)
    parts = []
    for s, idx in _per_system(prep):
        pos = prep.positions if idx is None else prep.positions[idx]
        periodic = prep.pbc[s]
        try:
            i, j, sh = calc.compute(pos, prep.cell[s], periodic, quantities="ijS", copy=True)
        except RuntimeError:  # some builds want the periodic flags on the CPU
            i, j, sh = calc.compute(pos, prep.cell[s], periodic.cpu(), quantities="ijS",
                                    copy=True)
        ei = torch.stack([i.to(torch.int64), j.to(torch.int64)]).to(dev)
        if idx is not None:
            ei = idx[ei]
        parts.append((ei, sh.to(device=dev, dtype=torch.int64)))
    return _collect(parts, dev)


def _boxed(prep: Prepared, s: int, pos: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """A real cell for one system: non-periodic rows become a box enclosing all atoms.

    Non-periodic rows are replaced by orthonormal directions scaled to the atoms' extent plus
    twice the cutoff, and the atoms are translated to lie inside that box. A common
    translation changes neither pair distances nor lattice shifts.
    """
    basis = completed_basis(prep.cell[s:s + 1], prep.pbc[s:s + 1])[0]
    pbc = prep.pbc[s]
    coord = pos @ torch.linalg.inv(basis)  # coordinates in the completed basis
    lo = coord.min(dim=0).values
    hi = coord.max(dim=0).values
    size = (hi - lo) + 2 * prep.cutoff + 1.0
    scale = torch.where(pbc, torch.ones_like(size), size)
    box = basis * scale.unsqueeze(-1)
    move = torch.where(pbc, torch.zeros_like(lo), prep.cutoff + 0.5 - lo)
    pos = pos + move @ basis
    return pos.cpu().numpy(), box.cpu().numpy()


def matscipy_neighbor_list(prep: Prepared) -> tuple[Tensor, Tensor]:
    """Neighbour pairs with matscipy (CPU only; results are moved to the input device)."""
    dev = prep.device
    if prep.n_atoms == 0 or prep.cutoff == 0:
        return empty_result(dev)
    try:
        from matscipy.neighbours import neighbour_list  # noqa: PLC0415 - optional
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError('backend="matscipy" needs matscipy: `pip install matscipy`') from exc
    parts = []
    for s, idx in _per_system(prep):
        pos = prep.positions if idx is None else prep.positions[idx]
        pos_np, box = _boxed(prep, s, pos)
        pbc = prep.pbc[s].cpu().numpy()
        i, j, sh = neighbour_list("ijS", positions=pos_np, cell=box, pbc=pbc,
                                  cutoff=prep.cutoff)
        ei = torch.from_numpy(np.stack([i, j]).astype(np.int64)).to(dev)
        if idx is not None:
            ei = idx[ei]
        parts.append((ei, torch.from_numpy(np.asarray(sh, dtype=np.int64)).to(dev)))
    return _collect(parts, dev)


def torch_cluster_neighbor_list(prep: Prepared) -> tuple[Tensor, Tensor]:
    """Neighbour pairs of non-periodic systems with ``torch_cluster.radius_graph``."""
    dev = prep.device
    if bool(prep.pbc.any()):
        raise ValueError('backend="torch_cluster" handles non-periodic systems only (pbc all False)')
    try:
        from torch_cluster import radius_graph  # noqa: PLC0415 - optional
    except ImportError as exc:
        raise ImportError(
            'backend="torch_cluster" needs torch-cluster: `pip install est_calc[cluster]`'
        ) from exc
    if prep.n_atoms == 0 or prep.cutoff == 0:
        return empty_result(dev)
    order = torch.argsort(prep.system_idx, stable=True)  # radius_graph wants sorted batches
    pos, batch = prep.positions[order], prep.system_idx[order]
    max_nb = int(torch.bincount(batch).max())  # the library default (32) silently truncates
    ei = radius_graph(pos, r=prep.cutoff * (1 + 1e-9), batch=batch, loop=False,
                      max_num_neighbors=max_nb)
    d = pos[ei[1]] - pos[ei[0]]
    ei = ei[:, (d * d).sum(-1) < prep.cutoff**2]  # ASE rule: strictly below the cutoff
    ei = order[ei].to(torch.int64)
    return ei, torch.zeros((ei.shape[1], 3), dtype=torch.int64, device=dev)
