"""Pure-PyTorch cell-list neighbour search: O(N) time and memory, same code on CPU and CUDA.

Algorithm (all steps vectorised over atoms, bins and systems; the only Python loops run over
memory-bounded chunks of work):

1. Express every atom in a per-system basis (periodic lattice vectors plus an orthonormal
   complement for non-periodic axes, see :func:`completed_basis`). Wrap the coordinates along
   periodic axes into [0, 1) and remember the integer wrap so shifts refer to the input
   positions.
2. Cut each system into bins whose width along each axis (measured as a distance between
   lattice planes) is at least the cutoff. Periodic axes span the cell; non-periodic axes span
   the bounding box of the atoms. The bin count per system is capped at ~8 per atom so that a
   few far-away atoms cannot blow up memory.
3. Each atom visits the bins at integer offsets ``-m..m`` from its own bin, with
   ``m = ceil(cutoff / bin width)``; on periodic axes an offset that leaves the cell wraps
   around and adds a lattice shift, so cells thinner than the cutoff are visited several times,
   once per image. Atoms are sorted by global bin id so that each bin is a contiguous slice,
   and the candidate pairs are produced with ``repeat_interleave``.
4. Candidates are kept when their distance is below the cutoff (strict ``<``, as ASE), and the
   self pair with zero shift is dropped. Distances are computed in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import Prepared, cell_heights, completed_basis, empty_result

__all__ = ["torch_neighbor_list"]

# Bins are made slightly wider than the cutoff so rounding in the fractional coordinates can
# never hide a pair that is just inside the cutoff.
_WIDTH_MARGIN = 2e-6
_SEARCH_MARGIN = 1e-6
_BINS_PER_ATOM = 8
# Bins are 1/_BIN_SPLIT of the cutoff wide (search reach _BIN_SPLIT bins): smaller bins hug the
# cutoff sphere more tightly (fewer candidate pairs) at the cost of more bin visits per atom.
_BIN_SPLIT = 2


def _bin_layout(f: Tensor, prep: Prepared, heights: Tensor):
    """Number of bins, bin origin and width (fractional units) and search reach per axis.

    Args:
        f: (n_atoms, 3) wrapped fractional coordinates in the completed basis.
        prep: the checked problem.
        heights: (n_systems, 3) plane spacing of the completed basis, Å.

    Returns:
        nbins (S, 3) int64, lo (S, 3) float64, width (S, 3) float64, reach (S, 3) int64,
        all on the CPU.
    """
    n_sys, pbc = prep.n_systems, prep.pbc.cpu()
    idx = prep.system_idx.unsqueeze(-1).expand(-1, 3)
    lo = torch.full((n_sys, 3), float("inf"), dtype=f.dtype, device=f.device)
    hi = torch.full((n_sys, 3), float("-inf"), dtype=f.dtype, device=f.device)
    lo = lo.scatter_reduce(0, idx, f, "amin").cpu()
    hi = hi.scatter_reduce(0, idx, f, "amax").cpu()
    empty = ~torch.isfinite(lo)
    lo = torch.where(empty, torch.zeros_like(lo), lo)
    hi = torch.where(empty, torch.zeros_like(hi), hi)
    lo = torch.where(pbc, torch.zeros_like(lo), lo)
    hi = torch.where(pbc, torch.ones_like(hi), hi)
    extent = (hi - lo) * heights.cpu()  # Å along each axis
    cut = prep.cutoff * (1 + _WIDTH_MARGIN)
    atoms = torch.bincount(prep.system_idx, minlength=n_sys).cpu()
    cap = (atoms * _BINS_PER_ATOM).clamp(min=(2 * _BIN_SPLIT + 1) ** 3)
    nbins = torch.floor(extent * _BIN_SPLIT / cut).clamp(min=1, max=2**20).to(torch.int64)
    nbins = torch.minimum(nbins, cap.unsqueeze(-1))
    while True:  # halve the largest axis of any system over its bin budget
        over = nbins.prod(dim=-1) > cap
        if not bool(over.any()):
            break
        rows = torch.nonzero(over).squeeze(-1)
        ax = nbins[rows].argmax(dim=-1)
        nbins[rows, ax] = (nbins[rows, ax] // 2).clamp(min=1)
    frac_extent = hi - lo
    width = torch.where(frac_extent > 0, frac_extent / nbins, torch.ones_like(frac_extent))
    bin_len = extent / nbins  # Å
    reach = torch.ceil(prep.cutoff * (1 + _SEARCH_MARGIN) / bin_len.clamp(min=1e-300))
    reach = torch.where(~pbc & (nbins == 1), torch.zeros_like(reach), reach).to(torch.int64)
    return nbins, lo, width, reach


def _offsets(reach: Tensor, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The half of the bin offsets that is lexicographically >= 0, per system.

    Pair (i, j) found from i's bin at offset o is pair (j, i) found from j's bin at offset -o,
    so only offsets with (oz, oy, ox) >= (0, 0, 0) are visited and the pairs are mirrored.
    The zero offset is the first row of every system's block.

    Args:
        reach: (S, 3) int64 search reach m per axis (CPU).

    Returns:
        offs (sum K, 3) int64, kstart (S,) int64 first offset row of each system, and
        K (S,) int64 number of offsets per system, on ``device``.
    """
    span = (2 * reach + 1).to(device)
    k = (span.prod(dim=-1) + 1) // 2
    kstart = torch.cumsum(k, 0) - k
    sys = torch.repeat_interleave(torch.arange(len(k), device=device), k)
    # Offsets >= 0 lexicographically are the upper half of the full box enumeration (x fastest).
    loc = torch.arange(int(k.sum()), device=device) - kstart[sys] + k[sys] - 1
    sx, sy = span[sys, 0], span[sys, 1]
    r = reach.to(device)[sys]
    offs = torch.stack([loc % sx, (loc // sx) % sy, loc // (sx * sy)], dim=-1) - r
    return offs, kstart, k


def torch_neighbor_list(prep: Prepared, *, max_candidates: int | None = None):
    """Neighbour pairs of a checked problem with the pure-PyTorch cell list.

    Args:
        prep: checked problem from :func:`prepare`.
        max_candidates: candidate pairs processed per chunk (bounds peak memory); default
            2**22 on CPU and 2**25 on CUDA.

    Returns:
        edge_index (2, E) int64 and shifts (E, 3) int64 on the input device.
    """
    dev, n = prep.device, prep.n_atoms
    if n == 0 or prep.cutoff == 0:
        return empty_result(dev)
    if max_candidates is None:
        max_candidates = 2**25 if dev.type == "cuda" else 2**22
    pbc, sidx, pos = prep.pbc, prep.system_idx, prep.positions
    single = prep.n_systems == 1
    basis = completed_basis(prep.cell, pbc)
    inv = torch.linalg.inv(basis)
    f = pos @ inv[0] if single else torch.bmm(pos.unsqueeze(1), inv[sidx]).squeeze(1)
    pbc_a = pbc[0].expand(n, 3) if single else pbc[sidx]
    wrap = torch.where(pbc_a, torch.floor(f), torch.zeros_like(f))
    f = f - wrap
    cell_a = prep.cell[0] if single else prep.cell[sidx]
    pos_w = pos - (wrap @ cell_a if single else torch.bmm(wrap.unsqueeze(1), cell_a).squeeze(1))
    wrap = wrap.to(torch.int64)

    nbins_c, lo_c, width_c, reach_c = _bin_layout(f, prep, cell_heights(basis))
    nbins, lo, width = nbins_c.to(dev), lo_c.to(dev, f.dtype), width_c.to(dev, f.dtype)
    b3 = torch.floor((f - lo[sidx]) / width[sidx]).to(torch.int64)
    b3 = torch.minimum(b3.clamp(min=0), nbins[sidx] - 1)
    nb_per_sys = nbins.prod(dim=-1)
    bin_base = torch.cumsum(nb_per_sys, 0) - nb_per_sys
    strides = torch.stack(
        [torch.ones_like(nbins[:, 0]), nbins[:, 0], nbins[:, 0] * nbins[:, 1]], dim=-1
    )
    gbin = bin_base[sidx] + (b3 * strides[sidx]).sum(-1)
    order = torch.argsort(gbin, stable=True)
    counts = torch.bincount(gbin, minlength=int(nb_per_sys.sum()))
    starts = torch.cumsum(counts, 0) - counts
    # From here on centres are taken in bin order (t = rank in the sorted list).
    pos_s, sidx_s, b3_s = pos_w[order], sidx[order], b3[order]

    offs, kstart, k = _offsets(reach_c, dev)
    k_atom = k[sidx_s]
    row_start = torch.cumsum(k_atom, 0) - k_atom
    n_rows = int(k_atom.sum())
    max_rows = max(1, max_candidates // 8)
    out_i, out_j, out_s = [], [], []
    cut2 = prep.cutoff * prep.cutoff
    for r0 in range(0, n_rows, max_rows):
        rows = torch.arange(r0, min(n_rows, r0 + max_rows), device=dev)
        t = torch.searchsorted(row_start, rows, right=True) - 1  # centre (sorted rank)
        s = _take(sidx_s, t)
        loc = rows - row_start[t]
        nb = _take(b3_s, t) + _take(offs, _take(kstart, s) + loc)
        nbn = _take(nbins, s)
        img = torch.div(nb, nbn, rounding_mode="floor")
        nb = nb - img * nbn
        ok = (_take(pbc, s) | (img == 0)).all(-1)
        gnb = _take(bin_base, s) + (nb * _take(strides, s)).sum(-1)
        first, n_in = _take(starts, gnb), _take(counts, gnb)
        cnt = torch.where(ok, n_in, torch.zeros_like(gnb))
        # Zero offset: only partners after the centre in the sorted bin (pair i<j once, no self).
        zero = loc == 0
        cnt = torch.where(zero, first + n_in - t - 1, cnt)
        first = torch.where(zero, t + 1, first)
        cum = torch.cumsum(cnt, 0)
        total = int(cum[-1])
        if total == 0:
            continue
        # Split this row block so no piece holds more than max_candidates candidates.
        n_pieces = (total + max_candidates - 1) // max_candidates
        bounds = torch.searchsorted(
            cum, torch.arange(1, n_pieces, device=dev) * max_candidates, right=True
        ).tolist()
        edges = [0, *bounds, len(cnt)]
        for a, b in zip(edges[:-1], edges[1:]):
            if b <= a:
                continue
            ti, tj, sh = _expand(t[a:b], img[a:b], cnt[a:b], first[a:b], s[a:b], pos_s,
                                 prep.cell, cut2, single)
            i_e, j_e = _take(order, ti), _take(order, tj)
            out_i.append(i_e)
            out_j.append(j_e)
            out_s.append(sh + _take(wrap, i_e) - _take(wrap, j_e))
    if not out_i:
        return empty_result(dev)
    i_h, j_h, s_h = torch.cat(out_i), torch.cat(out_j), torch.cat(out_s)
    edge_index = torch.stack([torch.cat([i_h, j_h]), torch.cat([j_h, i_h])])
    return edge_index, torch.cat([s_h, -s_h])


def _take(x: Tensor, idx: Tensor) -> Tensor:
    """``x[idx]`` along dim 0 for a 1-D int64 index (index_select is faster on the CPU)."""
    return torch.index_select(x, 0, idx)


def _expand(t, img, cnt, first, s, pos_s, cell, cut2, single):
    """Expand (centre, neighbour bin) rows into candidate pairs and keep those within cutoff.

    Args:
        t, img, cnt, first, s: per row: centre rank (sorted order), image shift (R, 3),
            number of candidates, first candidate rank, system.
        pos_s: (n_atoms, 3) wrapped positions in sorted order.

    Returns:
        sorted ranks of i and j (E,), and the image shift (E, 3) of the accepted pairs
        (relative to the wrapped positions).
    """
    dev = cnt.device
    total = int(cnt.sum())
    take = torch.index_select  # much faster than advanced indexing for 1-D index tensors
    row = torch.repeat_interleave(torch.arange(len(cnt), device=dev), cnt, output_size=total)
    base = first - (torch.cumsum(cnt, 0) - cnt)
    jpos = take(base, 0, row) + torch.arange(total, device=dev)
    img_f = img.to(cell.dtype)
    c = cell[0] if single else cell[s]  # (3, 3) or (R, 3, 3)
    shift_vec = (img_f[:, 0:1] * c[..., 0, :] + img_f[:, 1:2] * c[..., 1, :]
                 + img_f[:, 2:3] * c[..., 2, :])
    centre = take(pos_s, 0, t) - shift_vec  # r_ij = pos_j - (pos_i - S @ cell)
    d = take(pos_s, 0, jpos) - take(centre, 0, row)
    keep = torch.nonzero((d * d).sum(-1) < cut2).squeeze(-1)
    row, jpos = take(row, 0, keep), take(jpos, 0, keep)
    return take(t, 0, row), jpos, take(img, 0, row)
