"""Fitting the latent-distance uncertainty of a trained potential (:mod:`est_calc.uncertainty`).

Two data sets, both labelled by the teacher:

* reference frames (the training set or a part of it): per element the features' mean and
  covariance give the whitening, and a random sample of ``n_reference`` whitened atoms per
  element is kept as centres;
* calibration frames, held out from training but from the same distribution: per atom the
  distance d_i to its element's nearest centre, pooled over its neighbours
  (:meth:`est_calc.uncertainty.LatentDistance.pooled`; written d below), and the force error
  e_i = |F_i - F_i^ref|. Atoms are put into ``n_bins`` equal-count bins of d; the map
  forces_std = a d^b is the least-squares line through (log mean d, log s) of the bins,
  s = median(e) / 0.888 (b clipped to [0, 2], so the map is monotone). For a Gaussian error
  of per-component sigma forces_std / sqrt(3), |e|^2 / sigma^2 is chi^2 with 3 degrees of freedom and
  median |e| = sqrt(2.366 / 3) forces_std = 0.888 forces_std; the median, unlike the RMS, is not
  set by the few atoms with very large errors (force errors are heavier-tailed than a Gaussian:
  an RMS fit on two calibration sets of the same recipe gave b = 0.14 and 0.32). And
  kappa^2 = median_frames(dE^2 / sum_i forces_std_i^2) / 0.4549 (the median
  of chi^2 with one degree of freedom), so that energy_std is the frames' Gaussian sigma.
* flag thresholds: the 95th percentiles over the calibration frames of a frame's largest
  forces_std and of its RMS over the atoms (``LatentDistance.thresholds``): what an
  in-distribution frame passes 95 % of the time, the recipes' ``"auto"`` thresholds.

The trunk is frozen: features come from forward passes without gradients, forces from one
backward pass per calibration batch, so a fit takes minutes on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from est_calc.batch import AtomsBatch
from est_calc.forces import energy_forces_stress
from est_calc.neighbors import build_graph
from est_calc.training.config import UncertaintySection
from est_calc.uncertainty import LatentDistance, frame_statistics

#: Fewest calibration atoms per distance bin, and the largest exponent b of the power law.
MIN_BIN_ATOMS = 50
MAX_EXPONENT = 2.0
#: median |e| / forces_std for a Gaussian force error: sqrt(median of chi^2_3 / 3).
MEDIAN_RATIO = 0.8880641651696379
#: Median of the chi^2 distribution with one degree of freedom.
CHI2_1_MEDIAN = 0.45493642311957283
#: Share of the in-distribution (calibration) frames under each flag threshold.
FLAG_QUANTILE = 0.95
#: w0 of the neighbour pooling, the default of ``uncertainty.self_weight``.
DEFAULT_SELF_WEIGHT = UncertaintySection.self_weight

__all__ = ["FrameErrors", "evaluate_frames", "fit_latent_distance", "latent_distance_from",
           "train_with_uncertainty", "fit_run_uncertainty", "fit_and_save",
           "committee_frame_stds", "fit_committee_thresholds",
           "flag_thresholds", "spearman", "miscalibration_area"]


@dataclass
class FrameErrors:
    """What a potential gives on labelled frames, per atom and per frame.

    Attributes:
        z: (n,) atomic numbers; features: (n, C) the energy head's input; forces: (n, 3)
        predicted, eV/Å; force_error: (n,) |F - F_ref|, eV/Å; frame: (n,) frame index of each
        atom; energy_error: (n_frames,) E - E_ref, eV; n_atoms: (n_frames,); pairs: (i, j, r)
        of every neighbour pair within the potential's cutoff, both directions, atom indices
        into the arrays above (the pooling's input), or None where they were not asked for.
    """

    z: np.ndarray
    features: np.ndarray
    forces: np.ndarray
    force_error: np.ndarray
    frame: np.ndarray
    energy_error: np.ndarray
    n_atoms: np.ndarray
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray] | None


def _chunks(frames: Sequence, max_atoms: int):
    chunk, size = [], 0
    for frame in frames:
        if chunk and size + frame.n_atoms > max_atoms:
            yield chunk
            chunk, size = [], 0
        chunk.append(frame)
        size += frame.n_atoms
    if chunk:
        yield chunk


def evaluate_frames(potential, frames: Sequence, *, forces: bool = True, pairs: bool = True,
                    max_atoms: int = 3000, energy_mode: str = "total") -> FrameErrors:
    """Features (and, with ``forces``, errors against the frames' labels) of ``potential`` on
    ``frames`` (objects with positions, numbers, cell, pbc, energy and forces, as
    :class:`est_calc.training.datasets.Frame`), in batches of up to ``max_atoms`` atoms.
    ``energy_mode`` "referenced": the label is energy - reference_energy (as the potential was
    trained with ``data.energy: referenced``). ``pairs``: also collect the neighbour pairs
    (what the pooling of calibration frames needs; reference frames need only features)."""
    from est_calc.accel import accelerate
    from est_calc.uncertainty import graph_pairs

    fast = accelerate(potential, inference=True).eval()
    parts = {k: [] for k in ("z", "features", "forces", "force_error", "energy_error", "i", "j",
                             "r")}
    dtype, device = potential.dtype, potential.device
    offset = 0
    for chunk in _chunks(list(frames), max_atoms):
        batch = AtomsBatch.from_arrays([f.positions for f in chunk], [f.numbers for f in chunk],
                                       [f.cell for f in chunk], [f.pbc for f in chunk],
                                       device=device, dtype=dtype)
        graph = build_graph(batch, potential.cutoff_A, paired=True)
        with fast.model.recording_features() as sink:
            if forces:
                pred = energy_forces_stress(fast, batch, graph)
            else:
                with torch.no_grad():
                    pred = fast(batch, graph)
        parts["z"].append(batch.atomic_numbers.cpu().numpy())
        if pairs:
            i, j, r = graph_pairs(batch, graph)
            parts["i"].append(i.cpu().numpy() + offset)
            parts["j"].append(j.cpu().numpy() + offset)
            parts["r"].append(r.double().cpu().numpy())
        offset += batch.n_atoms
        parts["features"].append(sink[0].double().cpu().numpy())
        if forces:
            f = pred.forces.double().cpu().numpy()
            ref = np.concatenate([fr.forces for fr in chunk])
            parts["forces"].append(f)
            parts["force_error"].append(np.linalg.norm(f - ref, axis=1))
            e = pred.energy.double().cpu().numpy()
            ref_e = np.array([fr.energy - ((fr.reference_energy or 0.0)
                                            if energy_mode == "referenced" else 0.0)
                              for fr in chunk])
            parts["energy_error"].append(e - ref_e)
    n_atoms = np.array([f.n_atoms for f in frames])
    cat = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in parts.items()}
    found = (cat["i"].astype(np.int64), cat["j"].astype(np.int64), cat["r"]) if pairs else None
    return FrameErrors(cat["z"], cat["features"], cat["forces"], cat["force_error"],
                       np.repeat(np.arange(len(n_atoms)), n_atoms), cat["energy_error"], n_atoms,
                       found)


def _power_law(d: np.ndarray, err: np.ndarray, n_bins: int) -> tuple[float, float, list]:
    """(a, b, bins) of the fit median(err) / 0.888 = a d^b over equal-count bins of d (module
    docstring).

    Bins hold at least ``MIN_BIN_ATOMS`` atoms; with fewer than three bins, or no spread of d,
    the std is constant (b = 0, a from the overall median error). b is clipped to
    [0, MAX_EXPONENT].
    """
    n_bins = min(n_bins, len(d) // MIN_BIN_ATOMS)
    overall = float(max(np.median(err) / MEDIAN_RATIO, 1e-6)) if len(err) else 1e-6
    if n_bins < 3:
        return overall, 0.0, []
    order = np.argsort(d)
    bins = [b for b in np.array_split(order, n_bins) if len(b)]
    centre = np.array([d[b].mean() for b in bins])
    scale = np.array([np.median(err[b]) / MEDIAN_RATIO for b in bins])
    ok = (centre > 0) & (scale > 0)
    if ok.sum() < 2 or np.ptp(np.log(centre[ok])) < 1e-6:
        # No spread of distances to fit a slope to (tiny or degenerate calibration sets): a
        # constant std from the overall median error.
        return overall, 0.0, list(zip(centre.tolist(), scale.tolist()))
    b, log_a = np.polyfit(np.log(centre[ok]), np.log(scale[ok]), 1)
    b = min(max(float(b), 0.0), MAX_EXPONENT)
    log_a = float(np.mean(np.log(scale[ok]) - b * np.log(centre[ok])))
    return float(np.exp(log_a)), b, list(zip(centre.tolist(), scale.tolist()))


def latent_distance_from(potential, reference: FrameErrors, *, n_reference: int = 2048,
                         seed: int = 0, ridge: float = 1e-3) -> LatentDistance:
    """An uncalibrated LatentDistance (a = b = kappa = 1) from the reference frames' features."""
    feats = torch.as_tensor(reference.features, dtype=torch.float64)
    species = sorted(set(int(z) for z in potential.species))
    c = feats.shape[1]
    gen = torch.Generator().manual_seed(seed)
    mean = feats.new_zeros(len(species), c)
    whiten = torch.eye(c, dtype=feats.dtype).repeat(len(species), 1, 1)
    rows = []
    for s, z in enumerate(species):
        mine = feats[torch.as_tensor(reference.z == z)]
        if len(mine) < 2:
            rows.append(feats.new_zeros(0, c))
            continue
        mean[s] = mine.mean(0)
        cov = torch.cov((mine - mean[s]).T) + ridge * torch.eye(c, dtype=feats.dtype)
        whiten[s] = torch.linalg.cholesky(torch.linalg.inv(cov))
        pick = torch.randperm(len(mine), generator=gen)[:n_reference]
        rows.append((mine[pick] - mean[s]) @ whiten[s])
    m = max(1, max(len(r) for r in rows))
    centres = feats.new_zeros(len(species), m, c)
    for s, r in enumerate(rows):
        centres[s, :len(r)] = r
    counts = torch.tensor([len(r) for r in rows])
    return LatentDistance(torch.tensor(species), centres.float(), counts, mean.float(),
                          whiten.float(), force_a=1.0, force_b=1.0, energy_kappa=1.0,
                          unknown_distance=1.0)


def fit_latent_distance(potential, reference: Sequence, calibration: Sequence, *,
                        n_reference: int = 2048, n_bins: int = 20, seed: int = 0,
                        max_atoms: int = 3000, energy_mode: str = "total",
                        pool_radius: float | None = None,
                        self_weight: float = DEFAULT_SELF_WEIGHT
                        ) -> tuple[LatentDistance, dict]:
    """Fit the latent-distance estimate of ``potential`` (module docstring).

    Args:
        potential: the trained :class:`est_calc.potential.Potential` (left unchanged).
        reference: frames whose features define "seen" (the training set or a part of it).
        calibration: held-out labelled frames of the training distribution.
        n_reference: reference atoms kept per element.
        n_bins: equal-count bins of the distance for the calibration fit.
        energy_mode: "total" or "referenced" (the potential's ``data.energy``).
        pool_radius: R of the neighbour pooling, Å, at most the potential's cutoff; None: the
            cutoff; 0: none.
        self_weight: w0 of the pooling.

    Returns:
        (LatentDistance on the CPU in float32, report) where the report holds the fitted a, b,
        kappa, the bins and the Spearman correlation of forces_std with the force error on the
        calibration frames.
    """
    ref = evaluate_frames(potential, reference, forces=False, pairs=False, max_atoms=max_atoms)
    raw = latent_distance_from(potential, ref, n_reference=n_reference, seed=seed)
    cal = evaluate_frames(potential, calibration, forces=True, max_atoms=max_atoms,
                          energy_mode=energy_mode)
    radius = float(potential.cutoff_A if pool_radius is None else pool_radius)
    raw.pool_radius, raw.self_weight = radius, float(self_weight)
    raw.check_pool_radius(potential.cutoff_A)
    own = raw.distance(torch.as_tensor(cal.z), torch.as_tensor(cal.features)).double()
    d = raw.pooled(own, tuple(torch.as_tensor(x) for x in cal.pairs)).numpy()
    a, b, bins = _power_law(d, cal.force_error, n_bins)
    std = a * d ** b
    var_frame = np.bincount(cal.frame, weights=std ** 2, minlength=len(cal.n_atoms))
    # Median of the chi^2_1 ratio dE^2 / var (0.4549 for a calibrated Gaussian): a few frames
    # with large energy errors (gas molecules) do not set the scale of all the others.
    ratio = cal.energy_error ** 2 / np.maximum(var_frame, 1e-30)
    kappa = float(np.sqrt(np.median(ratio) / CHI2_1_MEDIAN))
    # Flag thresholds: 95 % of the calibration frames (in distribution) stay under each.
    thresholds = flag_thresholds(std, cal.frame, len(cal.n_atoms))
    t = raw.state()["tensors"]
    part = LatentDistance(t["species"], t["centres"], t["n_centres"], t["mean"], t["whiten"],
                          force_a=a, force_b=b, energy_kappa=kappa,
                          unknown_distance=float(max(d.max(), 1e-6)) * 2.0,
                          pool_radius=radius, self_weight=float(self_weight),
                          thresholds=thresholds)
    report = {"thresholds": thresholds, "force_a": a, "force_b": b, "energy_kappa": kappa,
              "bins": bins, "miscalibration_area_calibration": miscalibration_area(
                  std, cal.force_error)[0],
              "n_reference_atoms": int(len(ref.z)), "n_calibration_atoms": int(len(cal.z)),
              "spearman_calibration": spearman(std, cal.force_error),
              "n_reference": n_reference, "pool_radius": radius,
              "self_weight": float(self_weight)}
    return part, report


def flag_thresholds(forces_std, frame, n_frames: int | None = None) -> dict:
    """{"max": x, "rms": y} (eV/Å): the values of the two frame statistics
    (:func:`est_calc.uncertainty.frame_statistics`) that :data:`FLAG_QUANTILE` of the frames with
    atoms stay under, from per-atom stds and each atom's frame index (in-distribution frames)."""
    largest, rms = frame_statistics(forces_std, frame, n_frames)
    has_atoms = np.bincount(np.asarray(frame), minlength=len(largest)) > 0
    if not has_atoms.any():
        raise ValueError("flag thresholds need at least one frame with atoms")
    return {"max": float(np.quantile(largest[has_atoms], FLAG_QUANTILE)),
            "rms": float(np.quantile(rms[has_atoms], FLAG_QUANTILE))}


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation of x and y (average ranks for ties); NaN where it is not
    defined (fewer than two values, or one side constant: no ranking to compare)."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def miscalibration_area(sigma: np.ndarray, error: np.ndarray, n_levels: int = 99
                        ) -> tuple[float, np.ndarray, np.ndarray]:
    """(area, expected, observed) of the calibration curve of Gaussian force errors.

    With per-component sigma_c = forces_std / sqrt(3), |F - F_ref|^2 / sigma_c^2 is chi^2 with
    3 degrees of freedom for a calibrated estimate. For each confidence level p the observed
    fraction of atoms whose error lies inside the p-quantile ball is compared with p; the area
    is the mean |observed - p| over the levels (0 for a calibrated estimate, up to 0.5).
    """
    from scipy.stats import chi2

    levels = np.linspace(0.01, 0.99, n_levels)
    z2 = error ** 2 / np.maximum(sigma ** 2 / 3.0, 1e-30)
    observed = np.array([np.mean(z2 <= chi2.ppf(p, 3)) for p in levels])
    return float(np.mean(np.abs(observed - levels))), levels, observed


def train_with_uncertainty(cfg, *, init: str | None = None, resume: bool = False,
                           overwrite: bool = False) -> list[Path]:
    """``est train`` with ``cfg.uncertainty`` (:class:`est_calc.training.config.
    UncertaintySection`): the exported potential(s), one per committee member.

    "latent" trains as usual, then fits the latent distance of the exported potential and
    writes its sidecar (``potential.uncertainty``); "committee" trains ``committee_size``
    members, each a whole run with its own seed in ``output_dir/member<k>`` (``resume`` and
    ``overwrite`` apply to each), then, with calibration data (``uncertainty.calibration`` or
    ``data.val``), fits the committee's flag thresholds (``member0/potential.committee``).
    """
    import copy

    from est_calc.training.trainer import train

    cfg.validate()
    u = cfg.uncertainty
    if u.kind != "committee":
        path = train(cfg, init=init, resume=resume, overwrite=overwrite)
        if u.kind == "latent":
            fit_run_uncertainty(cfg, path)
        return [path]
    paths = []
    for k in range(u.committee_size):
        member = copy.deepcopy(cfg)
        member.output_dir = str(Path(cfg.output_dir) / f"member{k}")
        member.train.seed = cfg.train.seed + k
        member.uncertainty.kind = "none"
        paths.append(train(member, init=init, resume=resume, overwrite=overwrite))
    calibration = u.calibration if u.calibration is not None else cfg.data.val
    if calibration is not None:
        fit_committee_thresholds(paths, calibration)
    return paths


def committee_frame_stds(potentials: Sequence, frames: Sequence, *, max_atoms: int = 3000
                         ) -> tuple[np.ndarray, np.ndarray]:
    """(per-atom forces_std (eV/Å), each atom's frame index) of the committee ``potentials``
    (loaded :class:`est_calc.potential.Potential` objects of one architecture) on ``frames``
    (as :func:`evaluate_frames` takes them), in batches of up to ``max_atoms`` atoms."""
    from est_calc.accel import accelerate
    from est_calc.uncertainty import committee_forces_stress

    members = [accelerate(p, inference=True).eval() for p in potentials]
    first = members[0]
    stds, frame_idx, offset = [], [], 0
    for chunk in _chunks(list(frames), max_atoms):
        batch = AtomsBatch.from_arrays([f.positions for f in chunk], [f.numbers for f in chunk],
                                       [f.cell for f in chunk], [f.pbc for f in chunk],
                                       device=first.device, dtype=first.dtype)
        graph = build_graph(batch, first.cutoff_A, paired=True)
        _, estimate = committee_forces_stress(members, batch, graph)
        stds.append(estimate.forces_std.double().cpu().numpy())
        frame_idx.append(np.repeat(np.arange(len(chunk)) + offset, [f.n_atoms for f in chunk]))
        offset += len(chunk)
    return np.concatenate(stds), np.concatenate(frame_idx)


def fit_committee_thresholds(member_paths: Sequence, calibration, *, max_atoms: int = 3000
                             ) -> Path:
    """The flag thresholds of the committee of the potential files ``member_paths`` on the
    held-out frames of the data file ``calibration`` (:func:`flag_thresholds` of the committee's
    ``forces_std``), written beside the first member as its ``.committee`` file; prints one line
    and returns the file's path. Raises ValueError for members that are no committee, data
    without usable frames or with elements the members do not know."""
    from est_calc.potential import load_potential
    from est_calc.training.datasets import FrameSubset, check_species
    from est_calc.training.trainer import _open
    from est_calc.uncertainty import check_committee, save_committee_thresholds

    paths = [Path(p) for p in member_paths]
    if len(paths) < 2:
        raise ValueError(f"a committee needs at least two potential files, got {len(paths)}")
    potentials = [load_potential(str(p)) for p in paths]
    check_committee(potentials, [str(p) for p in paths])
    data, good, _ = _open(calibration, None, "skip", "calibration")
    if not good:
        raise ValueError(f"calibration data {calibration} has no usable frames")
    frames = FrameSubset(data, good)
    check_species(frames, potentials[0].species, what=str(calibration),
                  owner=f"committee member {paths[0]}")
    std, frame = committee_frame_stds(potentials, frames, max_atoms=max_atoms)
    thresholds = flag_thresholds(std, frame, len(frames))
    out = save_committee_thresholds(paths, thresholds, metadata={
        "calibration": str(calibration), "n_calibration_frames": len(frames),
        "quantile": FLAG_QUANTILE})
    print(f"committee: 95 % in-distribution flag thresholds on {len(frames)} calibration "
          f"frames: largest std {thresholds['max']:.4g}, RMS std {thresholds['rms']:.4g} eV/Å, "
          f"the recipes' 'auto' -> {out}")
    return out


def fit_run_uncertainty(cfg, potential_path) -> Path:
    """Fit and write the latent-distance sidecar of a run's exported potential (``cfg`` as in
    :func:`train_with_uncertainty`); returns the sidecar's path."""
    u = cfg.uncertainty
    return fit_and_save(potential_path, cfg.data.train,
                        u.calibration if u.calibration is not None else cfg.data.val,
                        max_reference_frames=u.max_reference_frames, n_reference=u.n_reference,
                        seed=cfg.train.seed, energy_mode=cfg.data.energy,
                        pool_radius=u.pool_radius, self_weight=u.self_weight)


def fit_and_save(potential_path, reference, calibration, *,
                 max_reference_frames: int | None = 2000, n_reference: int = 2048,
                 seed: int = 0, energy_mode: str = "total", pool_radius: float | None = None,
                 self_weight: float = DEFAULT_SELF_WEIGHT) -> Path:
    """Fit the latent distance of the potential file ``potential_path`` on the data files
    ``reference`` (up to ``max_reference_frames`` frames) and ``calibration``, write it as the
    file's sidecar, print one line on the fit and return the sidecar's path. Raises ValueError
    for a data file without usable frames or with elements the potential does not know."""
    from est_calc.potential import load_potential
    from est_calc.training.datasets import FrameSubset, check_species
    from est_calc.training.trainer import _open
    from est_calc.uncertainty import save_uncertainty

    potential = load_potential(str(potential_path))
    sets = []
    for label, source, limit in (("reference", reference, max_reference_frames),
                                 ("calibration", calibration, None)):
        data, good, _ = _open(source, limit, "skip", label)
        if not good:
            raise ValueError(f"{label} data {source} has no usable frames")
        frames = FrameSubset(data, good)
        check_species(frames, potential.species, what=str(source),
                      owner=f"potential {potential_path}")
        sets.append(frames)
    part, report = fit_latent_distance(potential, sets[0], sets[1], n_reference=n_reference,
                                       seed=seed, energy_mode=energy_mode,
                                       pool_radius=pool_radius, self_weight=self_weight)
    meta = {"kind": "latent_distance",
            "recipe": f"reference: {reference} (up to {max_reference_frames} frames); "
                      f"calibration: {calibration}",
            "fit": {k: v for k, v in report.items() if k != "bins"}}
    out = save_uncertainty(part, potential_path, metadata=meta)
    th = report["thresholds"]
    print(f"uncertainty: latent distance fitted (a={report['force_a']:.4g}, "
          f"b={report['force_b']:.4g}, Spearman {report['spearman_calibration']:.3f} on "
          f"{report['n_calibration_atoms']} calibration atoms; 95 % in-distribution flag "
          f"thresholds: largest std {th['max']:.4g}, RMS std {th['rms']:.4g} eV/Å, the "
          f"recipes' 'auto') -> {out}")
    return out
