"""Pure-PyTorch cell-list neighbour search: O(N) time and memory, same code on CPU and CUDA.

Algorithm (all steps vectorised over atoms, bins and systems; the only Python loop runs over
memory-bounded chunks of candidate pairs):

1. Express every atom in a per-system basis (periodic lattice vectors plus an orthonormal
   complement for non-periodic axes, see :func:`._common.completed_basis`). Wrap the
   coordinates along periodic axes into [0, 1) and remember the integer wrap so shifts refer to
   the input positions.
2. Cut each system into bins. Along axis 0 the bins are ``cutoff / _X_SPLIT`` wide, along axes
   1 and 2 ``cutoff / _YZ_SPLIT`` (widths are distances between lattice planes). Periodic axes
   span the cell, non-periodic axes the bounding box of the atoms. The bin count per system is
   capped at ~8 per atom so that a few far-away atoms cannot blow up memory. The search reach
   per axis is ``m = ceil(cutoff / bin width)`` bins.
3. Pad the bin grid by ``m`` bins on each side and fill the padding with periodic images
   ("ghosts") of the atoms, each carrying its lattice shift; padding along non-periodic axes
   stays empty. Cells thinner than the cutoff simply get several layers of images. Ghosts are
   stored sorted by padded bin with axis 0 fastest, so the ``2 m_x + 1`` bins along axis 0
   that a centre must visit in one (axis 1, axis 2) row form ONE contiguous slice of the ghost
   array: each centre visits only ``(2 m_y + 1)(2 m_z + 1)`` slices (half of them, see 4),
   and fine bins along axis 0 tighten the search box at no per-slice cost.
4. Half list: a pair found from centre i in row offset o is found from its partner in row
   offset -o, so only the rows with (o_z, o_y) >= (0, 0) lexicographically are visited; in the
   (0, 0) row only ghosts after the centre itself are taken, and the pairs are mirrored.
5. Candidates (a segmented arange over the slices) are kept when their float64 distance is
   below the cutoff (strict ``<``, as ASE).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import Prepared, cell_heights, completed_basis, empty_result

__all__ = ["torch_neighbor_list"]

# Bins are made slightly wider than their nominal size so rounding in the fractional
# coordinates can never hide a pair that is just inside the cutoff.
_WIDTH_MARGIN = 2e-6
_SEARCH_MARGIN = 1e-6
_BINS_PER_ATOM = 8
# Bin size along axis 0 (contiguous slices, so finer is nearly free) and along axes 1, 2 (each
# extra bin of reach adds slices per centre), as fractions of the cutoff.
_X_SPLIT = 4
_YZ_SPLIT = 2


def _take(x: Tensor, idx: Tensor) -> Tensor:
    """``x[idx]`` along dim 0 for a 1-D integer index (index_select is faster on the CPU)."""
    return torch.index_select(x, 0, idx)


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
    split = torch.tensor([_X_SPLIT, _YZ_SPLIT, _YZ_SPLIT], dtype=extent.dtype)
    atoms = torch.bincount(prep.system_idx, minlength=n_sys).cpu()
    cap = (atoms * _BINS_PER_ATOM).clamp(min=int(torch.prod(2 * split + 1)))
    nbins = torch.floor(extent * split / cut).clamp(min=1, max=2**20).to(torch.int64)
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


def _strides(dims: Tensor) -> Tensor:
    """(S, 3) strides of an axis-0-fastest layout of (S, 3) grid sizes."""
    one = torch.ones_like(dims[:, 0])
    return torch.stack([one, dims[:, 0], dims[:, 0] * dims[:, 1]], dim=-1)


def _ghosts(prep, nbins, reach, counts, starts, bin_base, pos_s):
    """Fill the padded bin grid with periodic images of the bin-sorted atoms.

    Args:
        prep: the checked problem.
        nbins, reach: (S, 3) int64 bins and search reach per axis (on the device).
        counts, starts: (n_bins,) atoms per real bin and first sorted rank of each bin.
        bin_base: (S,) first global real bin of each system.
        pos_s: (n_atoms, 3) wrapped positions in bin order.

    Returns:
        pdims (S, 3) padded grid sizes, pbase (S,) first padded bin of each system,
        gstart, gend (n_padded,) ghost slice of every padded bin, src (G,) sorted rank of the
        atom each ghost copies, gimg (G, 3) its lattice image and gpos (G, 3) its position.
    """
    dev = pos_s.device
    pdims = nbins + 2 * reach
    n_pb = pdims.prod(dim=-1)
    pbase = torch.cumsum(n_pb, 0) - n_pb
    sys = torch.repeat_interleave(torch.arange(prep.n_systems, device=dev), n_pb)
    loc = torch.arange(int(n_pb.sum()), device=dev) - _take(pbase, sys)
    pd = _take(pdims, sys)
    g = torch.stack([loc % pd[:, 0], (loc // pd[:, 0]) % pd[:, 1],
                     loc // (pd[:, 0] * pd[:, 1])], dim=-1) - _take(reach, sys)
    nb = _take(nbins, sys)
    img = torch.div(g, nb, rounding_mode="floor")
    src_bin = _take(bin_base, sys) + ((g - img * nb) * _take(_strides(nbins), sys)).sum(-1)
    ok = (_take(prep.pbc, sys) | (img == 0)).all(-1)
    gcount = torch.where(ok, _take(counts, src_bin), torch.zeros_like(src_bin))
    gend = torch.cumsum(gcount, 0)
    gstart = gend - gcount
    n_ghost = int(gend[-1])
    src = torch.repeat_interleave(_take(starts, src_bin) - gstart, gcount,
                                  output_size=n_ghost)
    src = src + torch.arange(n_ghost, device=dev)
    img_f = img.to(prep.cell.dtype)
    cell = prep.cell[sys] if prep.n_systems > 1 else prep.cell[0]
    shift = (img_f.unsqueeze(-1) * cell).sum(-2)  # (n_padded, 3) Å
    pb = torch.repeat_interleave(torch.arange(len(gcount), device=dev), gcount,
                                 output_size=n_ghost)
    gpos = _take(pos_s, src) + _take(shift, pb)
    return pdims, pbase, gstart, gend, src, _take(img, pb), gpos


def _row_offsets(reach: Tensor, dev: torch.device):
    """Half of the (axis 1, axis 2) row offsets, (o_z, o_y) >= (0, 0), per system.

    Returns:
        offs (sum K, 2) int64 (o_y, o_z), kstart (S,) first row of each system and K (S,)
        rows per system; the zero offset is the first row of every system.
    """
    span = 2 * reach[:, 1:] + 1
    k = (span.prod(dim=-1) + 1) // 2
    kstart = torch.cumsum(k, 0) - k
    sys = torch.repeat_interleave(torch.arange(len(k), device=dev), k)
    idx = torch.arange(int(k.sum()), device=dev) - _take(kstart, sys) + _take(k, sys) - 1
    sy = _take(span[:, 0], sys)
    offs = torch.stack([idx % sy, idx // sy], dim=-1) - _take(reach[:, 1:], sys)
    return offs, kstart, k


def torch_neighbor_list(prep: Prepared, *, max_candidates: int | None = None):
    """Neighbour pairs of a checked problem with the pure-PyTorch cell list.

    Args:
        prep: checked problem from :func:`prepare`.
        max_candidates: candidate pairs processed per chunk (bounds peak memory); default
            2**18 on CPU (cache sized) and 2**25 on CUDA.

    Returns:
        edge_index (2, E) int64 and shifts (E, 3) int64 on the input device.
    """
    dev, n = prep.device, prep.n_atoms
    if n == 0 or prep.cutoff == 0:
        return empty_result(dev)
    if max_candidates is None:
        max_candidates = 2**25 if dev.type == "cuda" else 2**18
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
    nbins, reach = nbins_c.to(dev), reach_c.to(dev)
    lo, width = lo_c.to(dev, f.dtype), width_c.to(dev, f.dtype)
    b3 = torch.floor((f - _take(lo, sidx)) / _take(width, sidx)).to(torch.int64)
    b3 = torch.minimum(b3.clamp(min=0), _take(nbins, sidx) - 1)
    nb_per_sys = nbins.prod(dim=-1)
    bin_base = torch.cumsum(nb_per_sys, 0) - nb_per_sys
    gbin = _take(bin_base, sidx) + (b3 * _take(_strides(nbins), sidx)).sum(-1)
    order = torch.argsort(gbin, stable=True)
    counts = torch.bincount(gbin, minlength=int(nb_per_sys.sum()))
    starts = torch.cumsum(counts, 0) - counts
    # From here on centres are taken in bin order (t = rank in the sorted list).
    pos_s, sidx_s, b3_s, gbin_s = (_take(x, order) for x in (pos_w, sidx, b3, gbin))
    pdims, pbase, gstart, gend, src, gimg, gpos = _ghosts(
        prep, nbins, reach, counts, starts, bin_base, pos_s)
    # Shift of a ghost relative to the input (unwrapped) position of the atom it copies.
    gatom = _take(order, src)
    wrapped = bool((wrap != 0).any())
    gshift = gimg - _take(wrap, gatom) if wrapped else gimg

    # Padded bin of each centre, and the centre's own place in the ghost array.
    pstride = _strides(pdims)
    pc = b3_s + _take(reach, sidx_s)
    ps = _take(pstride, sidx_s)
    pown = _take(pbase, sidx_s) + (pc * ps).sum(-1)
    gown = _take(gstart, pown) + torch.arange(n, device=dev) - _take(starts, gbin_s)
    # Rows: (centre, (o_y, o_z)); each is one contiguous ghost slice along axis 0.
    offs, kstart, k = _row_offsets(reach, dev)
    k_atom = _take(k, sidx_s)
    n_rows = int(k_atom.sum())
    t = torch.repeat_interleave(torch.arange(n, device=dev), k_atom, output_size=n_rows)
    loc = torch.arange(n_rows, device=dev) - _take(torch.cumsum(k_atom, 0) - k_atom, t)
    o = _take(offs, _take(kstart, _take(sidx_s, t)) + loc)
    rx = _take(reach[:, 0], sidx_s)
    lo_bin = pown - rx * ps[:, 0]  # padded bin at offset (-m_x, 0, 0)
    row_lo = _take(lo_bin, t) + o[:, 0] * _take(ps[:, 1], t) + o[:, 1] * _take(ps[:, 2], t)
    first = _take(gstart, row_lo)
    last = _take(gend, row_lo + _take(2 * rx, t))
    first = torch.where(loc == 0, _take(gown, t) + 1, first)
    cnt = (last - first).clamp(min=0)

    cut2 = prep.cutoff * prep.cutoff
    cum = torch.cumsum(cnt, 0)
    total = int(cum[-1])
    if total == 0:
        return empty_result(dev)
    n_pieces = (total + max_candidates - 1) // max_candidates
    bounds = torch.searchsorted(
        cum, torch.arange(1, n_pieces, device=dev) * max_candidates, right=True
    ).tolist()
    edges = [0, *bounds, n_rows]
    # Coordinates as separate contiguous columns: 1-D gathers and fused elementwise ops are
    # several times faster than gathering (C, 3) rows and reducing over the last axis.
    gcols = [gpos[:, ax].contiguous() for ax in range(3)]
    ccols = [pos_s[:, ax].contiguous() for ax in range(3)]
    out_t, out_g = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        if b > a:
            tt, gg = _expand(t[a:b], first[a:b], cnt[a:b], ccols, gcols, cut2)
            out_t.append(tt)
            out_g.append(gg)
    tt, gg = torch.cat(out_t), torch.cat(out_g)
    n_half = len(tt)
    edge_index = torch.empty((2, 2 * n_half), dtype=torch.int64, device=dev)
    shifts = torch.empty((2 * n_half, 3), dtype=torch.int64, device=dev)
    i_h = torch.index_select(order, 0, tt, out=edge_index[0, :n_half])
    j_h = torch.index_select(gatom, 0, gg, out=edge_index[1, :n_half])
    edge_index[0, n_half:] = j_h
    edge_index[1, n_half:] = i_h
    s_h = torch.index_select(gshift, 0, gg, out=shifts[:n_half])
    if wrapped:  # atoms given outside the cell: shifts refer to the input positions
        s_h += _take(wrap, i_h)
    torch.neg(s_h, out=shifts[n_half:])
    return edge_index, shifts


def _expand(t, first, cnt, ccols, gcols, cut2):
    """Expand rows (centre, ghost slice) into candidate pairs; keep those within the cutoff.

    Args:
        t: (R,) centre rank (bin order); first, cnt: (R,) first ghost and slice length.
        ccols: x, y, z (n_atoms,) wrapped centre coordinates in bin order, Å.
        gcols: x, y, z (G,) ghost coordinates, Å.
        cut2: squared cutoff, Å^2.

    Returns:
        centre ranks (E,) and ghost indices (E,) of the accepted pairs.
    """
    total = int(cnt.sum())
    cum = torch.cumsum(cnt, 0)
    row = torch.repeat_interleave(torch.arange(len(cnt), device=cnt.device), cnt,
                                  output_size=total)
    g = _take(first - (cum - cnt), row)
    g += torch.arange(total, device=cnt.device)
    tc = _take(t, row)
    d2 = None
    for cc, gc in zip(ccols, gcols):
        d = _take(gc, g).sub_(_take(cc, tc))
        d2 = d.mul_(d) if d2 is None else d2.addcmul_(d, d)
    keep = torch.nonzero(d2 < cut2).squeeze(-1)
    return _take(tc, keep), _take(g, keep)
