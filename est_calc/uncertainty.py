"""Uncertainty of a potential's predictions: a committee of potentials, or a latent distance.

Two estimates, both returned as :class:`UncertaintyEstimate` (``energy_std`` per structure in eV,
``forces_std`` per atom in eV/Å):

**Committee** (:func:`committee_forces_stress`): K potentials of one architecture evaluated on one
graph. Every member gets its own leaf copy of the positions (and of the zero strain); the summed
energy of all members is differentiated once, which gives every member's forces, since member k's
energy depends on its own leaves only. With E_k, F_k the members' predictions,

    E     = mean_k E_k,               energy_std = std_k E_k             (sample std, K - 1)
    F_i   = mean_k F_ik,              forces_std_i = sqrt(sum_a var_k F_ika)

so ``forces_std_i`` is the RMS length of the members' deviations from the mean force vector, the
quantity comparable to the error norm |F_i - F_i^ref|. Cost: K forward passes (one graph, one
backward call over K times the work).

**Latent distance** (:class:`LatentDistance`): a single model's own per-atom features h_i
(:meth:`est_calc.model.ESTModel.recording_features`, the (C,) scalar vector that enters the energy
head) are compared with reference features of the training set. Per element Z the reference
features have mean mu_Z and covariance S_Z; features are whitened, w = W_Z^T (h - mu_Z) with
W_Z W_Z^T = (S_Z + 1e-3 I)^-1, and a random sample of the whitened reference atoms is stored as
centres c_{Z,m}:

    d_i          = min_m |W_Z^T (h_i - mu_Z) - c_{Z_i, m}|                 (whitened units)
    D_i          = sqrt((w0 d_i^2 + sum_j c_ij d_j^2) / (w0 + sum_j c_ij))    (pooled, below)
    forces_std_i = a * D_i ** b                                           (eV/Å)
    energy_std   = kappa * sqrt(sum_{i in structure} forces_std_i ** 2)   (eV; kappa in Å)

The pooling follows from F_i = -sum_j dE_j/dr_i: the force on atom i is made of the energies of
every atom near it, so its error inherits their novelty, not only its own. The sum runs over the
neighbours j within the pooling radius R (the potential's cutoff) with the cosine weight
c_ij = (1 + cos(pi r_ij / R)) / 2, and w0 (the self weight) keeps the atom's own distance the
largest single term. A part without pooling (R = 0, as format-1 files) uses D_i = d_i.

a, b (b >= 0, so the map is monotone) and kappa are fitted on held-out frames
(``est_calc/training/uncertainty.py``) so that within bins of d the median force error is that of
a Gaussian error with per-component sigma forces_std_i / sqrt(3). No extra backward pass: the
features come from the forward pass that gives the energy, and the distance costs
n_atoms * n_centres * C multiply-adds.

The latent-distance state ships as a sidecar file next to the potential file,
``<stem>.uncertainty`` (:func:`save_uncertainty`, read by :func:`load_uncertainty` with
``torch.load(weights_only=True)``), which holds the sha256 of the potential file it was fitted
for; a sidecar of another file is not used.

A committee's flag thresholds (the values of the largest and of the RMS per-atom ``forces_std``
that 95 % of in-distribution frames stay under, the recipes' ``"auto"``) are a JSON file beside a
member, ``<stem>.committee`` (:func:`save_committee_thresholds`), which lists the sha256 of every
member it was fitted for; it is used only for exactly that set of members, in any order
(:func:`load_committee_thresholds`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from est_calc.atomic_io import atomic_torch_save, atomic_write_text
from est_calc.forces import Prediction, _check_volumes
from est_calc.geometry import apply_strain, symmetrize

__all__ = ["UncertaintyEstimate", "LatentDistance", "committee_forces_stress", "committee_models",
           "check_committee", "check_uncertainty_request", "latent_forces_stress", "sidecar_path",
           "graph_pairs", "frame_statistics",
           "STD_PROPERTIES",
           "save_uncertainty", "load_uncertainty", "file_sha256", "SIDECAR_SUFFIX",
           "COMMITTEE_SUFFIX", "committee_sidecar_path", "save_committee_thresholds",
           "load_committee_thresholds", "check_thresholds"]

#: The results ``uncertainty=True`` adds: eV per structure, eV/Å per atom.
STD_PROPERTIES = ("energy_std", "forces_std")
FORMAT = "est_calc.uncertainty"
FORMAT_VERSION = 2
SIDECAR_SUFFIX = ".uncertainty"
COMMITTEE_FORMAT = "est_calc.committee"
COMMITTEE_SUFFIX = ".committee"


class UncertaintyEstimate(NamedTuple):
    """energy_std (n_systems,) eV and forces_std (n_atoms,) eV/Å (RMS length of the force
    vector's spread, see the module docstring)."""

    energy_std: Tensor
    forces_std: Tensor


class LatentDistance(nn.Module):
    """Per-atom force std from the feature distance to the training set (module docstring).

    Args:
        species: (S,) atomic numbers with centres.
        centres: (S, M, C) whitened reference features per species; rows past
            ``n_centres[s]`` are padding and never the nearest.
        mean: (S, C) mean reference feature per species.
        whiten: (S, C, C) whitening matrix W per species (module docstring).
        n_centres: (S,) how many rows of ``centres`` are real for each species.
        force_a, force_b: the map forces_std = a * d ** b (eV/Å), b >= 0.
        energy_kappa: energy_std = kappa * sqrt(sum forces_std^2), Å.
        unknown_distance: distance given to an atom whose species has no centres (an element
            absent from the reference frames): the largest distance met while fitting.
        pool_radius: R of the neighbour pooling, Å (module docstring); 0 turns it off.
        self_weight: w0 of the pooling (> 0).
        thresholds: {"max": eV/Å, "rms": eV/Å}: the 95th percentiles, over the calibration
            frames, of a frame's largest per-atom forces_std and of its RMS over the atoms (the
            recipes' ``uncertainty_threshold="auto"`` and ``uncertainty_rms_threshold="auto"``);
            empty for a part fitted before they were stored.
    """

    def __init__(self, species: Tensor, centres: Tensor, n_centres: Tensor, mean: Tensor,
                 whiten: Tensor, *, force_a: float,
                 force_b: float, energy_kappa: float, unknown_distance: float,
                 pool_radius: float = 0.0, self_weight: float = 1.0,
                 thresholds: dict | None = None):
        super().__init__()
        if centres.ndim != 3 or centres.shape[0] != len(species):
            raise ValueError(f"centres must be (S, M, C) with S = {len(species)} species, got "
                             f"{tuple(centres.shape)}")
        if not (force_a > 0 and force_b >= 0 and energy_kappa >= 0 and unknown_distance > 0):
            raise ValueError(f"LatentDistance needs a > 0, b >= 0, kappa >= 0 and "
                             f"unknown_distance > 0; got a={force_a}, b={force_b}, "
                             f"kappa={energy_kappa}, unknown_distance={unknown_distance}")
        if not (pool_radius >= 0 and self_weight > 0):
            raise ValueError(f"LatentDistance needs pool_radius >= 0 and self_weight > 0; got "
                             f"{pool_radius}, {self_weight}")
        lookup = torch.full((119,), -1, dtype=torch.long)
        lookup[torch.as_tensor(species, dtype=torch.long)] = torch.arange(len(species))
        self.register_buffer("species", torch.as_tensor(species, dtype=torch.long))
        self.register_buffer("row_of_z", lookup)
        self.register_buffer("centres", centres.detach().clone())
        self.register_buffer("n_centres", torch.as_tensor(n_centres, dtype=torch.long))
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("whiten", whiten.detach().clone())
        self.force_a = float(force_a)
        self.force_b = float(force_b)
        self.energy_kappa = float(energy_kappa)
        self.unknown_distance = float(unknown_distance)
        self.pool_radius = float(pool_radius)
        self.self_weight = float(self_weight)
        self.thresholds = check_thresholds(thresholds, "LatentDistance thresholds")

    @property
    def n_features(self) -> int:
        return int(self.centres.shape[-1])

    def distance(self, z: Tensor, features: Tensor) -> Tensor:
        """d_i (n,) of atoms z (n,) with features (n, C): distance to the nearest centre of the
        atom's own element."""
        if features.shape[-1] != self.n_features:
            raise ValueError(f"features have {features.shape[-1]} channels, the centres "
                             f"{self.n_features}: the uncertainty part belongs to another model")
        features = features.to(self.centres.dtype)
        d = features.new_full((features.shape[0],), self.unknown_distance)
        rows = self.row_of_z[z.to(self.row_of_z.device)]
        for s in torch.unique(rows).tolist():
            if s < 0:
                continue
            atoms = (rows == s).nonzero().squeeze(1)
            n = int(self.n_centres[s])
            if n == 0:
                continue
            w = (features[atoms] - self.mean[s]) @ self.whiten[s]
            d[atoms] = torch.cdist(w, self.centres[s, :n]).amin(dim=1)
        return d

    def check_pool_radius(self, cutoff_A: float) -> None:
        """Raise ValueError when the pooling radius is beyond the potential's cutoff: the graph
        holds the pairs up to the cutoff (and a Verlet skin's share beyond it), so a larger
        radius would pool over a skin-dependent subset of the pairs it names."""
        if self.pool_radius > cutoff_A + 1e-9:
            raise ValueError(f"pool_radius {self.pool_radius:g} Å is beyond the potential's "
                             f"cutoff of {cutoff_A:g} Å; the pooling reads the model's own pairs "
                             "(refit with pool_radius <= the cutoff)")

    def pooled(self, d: Tensor, pairs: tuple[Tensor, Tensor, Tensor] | None) -> Tensor:
        """D_i (n,) from the atoms' own distances d (n,) and ``pairs`` = (i, j, r_ij): every
        ordered neighbour pair of the structures (both directions), any radius (pairs beyond
        ``pool_radius`` get no weight). Without pooling (``pool_radius`` 0), D = d."""
        if self.pool_radius <= 0:
            return d
        if pairs is None:
            raise ValueError("this uncertainty part pools over neighbours (pool_radius "
                             f"{self.pool_radius:g} Å) and needs the pairs (graph_pairs)")
        i, j, r = (t.to(d.device) for t in pairs)
        r = r.to(d.dtype)
        c = torch.where(r < self.pool_radius,
                        0.5 * (1 + torch.cos(torch.pi * r / self.pool_radius)),
                        torch.zeros_like(r))
        num = (self.self_weight * d ** 2).index_add(0, i, c * d[j] ** 2)
        den = torch.full_like(d, self.self_weight).index_add(0, i, c)
        return (num / den).sqrt()

    def forward(self, z: Tensor, features: Tensor, system_idx: Tensor, n_systems: int,
                pairs: tuple[Tensor, Tensor, Tensor] | None = None) -> UncertaintyEstimate:
        """The estimate of a batch: z (n,), features (n, C), system_idx (n,); ``pairs`` as in
        :meth:`pooled` (needed when the part pools)."""
        with torch.no_grad():
            d = self.pooled(self.distance(z, features), pairs)
            forces_std = self.force_a * d.clamp_min(0) ** self.force_b
            var = forces_std.new_zeros(n_systems).index_add(
                0, system_idx.to(forces_std.device), forces_std ** 2)
            return UncertaintyEstimate(self.energy_kappa * var.sqrt(), forces_std)

    def state(self) -> dict:
        """Plain tensors and values for :func:`save_uncertainty`."""
        return {"kind": "latent_distance",
                "tensors": {"species": self.species.cpu(), "centres": self.centres.float().cpu(),
                            "n_centres": self.n_centres.cpu(), "mean": self.mean.float().cpu(),
                            "whiten": self.whiten.float().cpu()},
                "force_a": self.force_a, "force_b": self.force_b,
                "energy_kappa": self.energy_kappa, "unknown_distance": self.unknown_distance,
                "pool_radius": self.pool_radius, "self_weight": self.self_weight,
                "thresholds": dict(self.thresholds)}

    @classmethod
    def from_state(cls, state: dict) -> "LatentDistance":
        t = state["tensors"]
        return cls(t["species"], t["centres"], t["n_centres"], t["mean"], t["whiten"],
                   force_a=state["force_a"],
                   force_b=state["force_b"], energy_kappa=state["energy_kappa"],
                   unknown_distance=state["unknown_distance"],
                   pool_radius=state.get("pool_radius", 0.0),
                   self_weight=state.get("self_weight", 1.0),
                   thresholds=state.get("thresholds"))

    def extra_repr(self) -> str:
        return (f"species={self.species.tolist()}, centres={tuple(self.centres.shape)}, "
                f"a={self.force_a:.4g}, b={self.force_b:.4g}, kappa={self.energy_kappa:.4g}, "
                f"pool_radius={self.pool_radius:.4g}, self_weight={self.self_weight:.4g}")


# ------------------------------------------------------------------------------ committee


def latent_forces_stress(potential, batch, graph, *, compute_stress: bool = False,
                         extra_energy=None) -> tuple[Prediction, UncertaintyEstimate]:
    """:func:`est_calc.forces.energy_forces_stress` of ``potential`` and, from the features of
    that same pass, its :class:`LatentDistance` estimate (``potential.uncertainty``), pooled over
    the pairs of ``graph``."""
    from est_calc.forces import energy_forces_stress

    part = potential.uncertainty
    part.check_pool_radius(potential.cutoff_A)
    with potential.model.recording_features() as features:
        pred = energy_forces_stress(potential, batch, graph, compute_stress=compute_stress,
                                    create_graph=False, extra_energy=extra_energy)
    estimate = part(batch.atomic_numbers, features[0], batch.system_idx, batch.n_systems,
                    pairs=graph_pairs(batch, graph))
    return pred, estimate


def frame_statistics(forces_std, frame=None, n_frames: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The two per-frame statistics that flag a frame: the largest per-atom force std and the
    root mean square of the per-atom stds over the frame's atoms (eV/Å).

    Args:
        forces_std: per-atom stds (eV/Å), of one frame or of several frames one after another.
        frame: each atom's frame index (0 .. F - 1); None: all atoms are one frame.
        n_frames: F (default: the largest index + 1), so trailing frames without atoms count.

    Returns:
        (largest, rms), arrays of length F; a frame without atoms gets 0 for both.
    """
    std = np.asarray(forces_std, dtype=float).reshape(-1)
    frame = np.zeros(len(std), dtype=np.int64) if frame is None else np.asarray(frame)
    if frame.shape != std.shape:
        raise ValueError(f"frame_statistics: {len(std)} stds but {frame.size} frame indices")
    n = int(frame.max()) + 1 if n_frames is None and len(frame) else int(n_frames or 1)
    count = np.bincount(frame, minlength=n)
    largest = np.zeros(n)
    np.maximum.at(largest, frame, std)               # stds are >= 0, so 0 is a neutral start
    rms = np.sqrt(np.bincount(frame, weights=std ** 2, minlength=n) / np.maximum(count, 1))
    return largest, rms


def graph_pairs(batch, graph) -> tuple[Tensor, Tensor, Tensor]:
    """(i, j, r_ij) of every edge of ``graph`` (a full list: both directions of each pair), the
    pairs :meth:`LatentDistance.pooled` takes."""
    from est_calc.geometry import edge_vectors

    with torch.no_grad():
        r = edge_vectors(batch.positions.detach(), batch.cell.detach(), graph.edge_index,
                         graph.shifts, batch.system_idx).norm(dim=-1)
    return graph.edge_index[0], graph.edge_index[1], r


def committee_models(models) -> list:
    """The members of ``model=[...]``, refused when the list cannot be a committee."""
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"a committee needs at least two potentials, got {len(models)}; pass "
                         "one potential on its own (model='file.pt')")
    for m in models:
        if getattr(m, "differentiates_itself", False) or str(m).endswith(".pt2"):
            raise ValueError(f"committee member {str(m)!r} is a compiled package; a committee "
                             "needs potential files (.pt) or Potentials")
    return models


def check_committee(members: Sequence, models: Sequence) -> None:
    """Raise ValueError unless every member has the first one's architecture and elements."""
    first = members[0]
    for k, member in enumerate(members[1:], start=1):
        if member.config != first.config:
            raise ValueError(f"committee member {k} ({str(models[k])!r}) has another "
                             f"architecture than member 0 ({str(models[0])!r}); a committee "
                             "shares one graph and needs one ModelConfig")
        if member.species != first.species:
            raise ValueError(f"committee member {k} ({str(models[k])!r}) knows elements "
                             f"{list(member.species)}, member 0 {list(first.species)}")


def committee_forces_stress(members: Sequence[nn.Module], batch, graph, *,
                            compute_stress: bool = False,
                            extra_energy=None) -> tuple[Prediction, UncertaintyEstimate]:
    """Mean prediction and spread of a committee (module docstring) on one graph.

    Args:
        members: K >= 1 potentials (each maps ``(batch, graph)`` to energy and energies).
        batch: the structures, on the members' device and dtype.
        graph: the graph of ``batch`` (every member has the same cutoff).
        compute_stress: also return the mean stress (n_systems, 3, 3) eV/Å^3.
        extra_energy: as in :func:`est_calc.forces.energy_forces_stress`, added to every
            member (so it does not change the spread).

    Returns:
        (Prediction of the committee mean, UncertaintyEstimate); the std of a committee of one
        is zero.
    """
    volume = _check_volumes(batch.cell) if compute_stress else None
    energies_k, energy_k, leaves = [], [], []
    with torch.enable_grad():
        for member in members:
            positions = batch.positions.detach().requires_grad_(True)
            cell = batch.cell
            inputs = [positions]
            if compute_stress:
                strain = torch.zeros(batch.n_systems, 3, 3, dtype=positions.dtype,
                                     device=positions.device, requires_grad=True)
                inputs.append(strain)
                positions, cell = apply_strain(positions, cell, symmetrize(strain),
                                               batch.system_idx)
            work = batch.replace(positions=positions, cell=cell)
            out = member(work, graph)
            energy, energies = out.energy, out.energies
            if extra_energy is not None:
                extra = extra_energy(work)
                energy = energy + extra.energy.to(energy.dtype)
                energies = energies + extra.energies.to(energies.dtype)
            energy_k.append(energy)
            energies_k.append(energies)
            leaves.append(inputs)
        flat = [leaf for inputs in leaves for leaf in inputs]
        total = torch.stack(energy_k).sum()
        grads = (torch.autograd.grad(total, flat, allow_unused=True) if total.requires_grad
                 else [None] * len(flat))
    width = 2 if compute_stress else 1
    forces_k, stress_k = [], []
    for k in range(len(members)):
        g = grads[k * width]
        forces_k.append(-g if g is not None else torch.zeros_like(batch.positions))
        if compute_stress:
            s = grads[k * width + 1]
            s = s if s is not None else torch.zeros_like(batch.cell)
            stress_k.append(s / volume.to(s.dtype)[:, None, None])
    ddof = 1 if len(members) > 1 else 0

    def spread(values: list[Tensor]) -> tuple[Tensor, Tensor]:
        # Shifted by member 0: identical members give exactly member 0 and a zero variance.
        x = torch.stack(values).detach()
        dx = x - x[0]
        return x[0] + dx.mean(0), dx.var(dim=0, correction=ddof)

    energy, energy_var = spread(energy_k)
    forces, forces_var = spread(forces_k)
    pred = Prediction(energy=energy, energies=spread(energies_k)[0], forces=forces,
                      stress=spread(stress_k)[0] if compute_stress else None)
    return pred, UncertaintyEstimate(energy_var.sqrt(), forces_var.sum(-1).sqrt())


# ------------------------------------------------------------------------------ files


def file_sha256(path) -> str:
    """sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_thresholds(thresholds, what: str) -> dict:
    """``thresholds`` as {"max": x, "rms": y} of floats (either key may be absent; None: {}),
    or ValueError naming ``what`` unless every value is a finite number > 0."""
    try:
        out = {str(k): float(v) for k, v in (thresholds or {}).items()}
    except (AttributeError, TypeError, ValueError):
        out = None
    if out is None or set(out) - {"max", "rms"} or not all(0 < v < float("inf")
                                                           for v in out.values()):
        raise ValueError(f"{what} must be {{'max': x, 'rms': y}} with values > 0 (eV/Å), got "
                         f"{thresholds!r}")
    return out


def sidecar_path(potential_path) -> Path:
    """``<folder>/<stem>.uncertainty`` of a potential file ``<folder>/<stem>.pt``."""
    path = Path(potential_path)
    return path.with_name(path.stem + SIDECAR_SUFFIX)


def save_uncertainty(part: LatentDistance, potential_path, *, metadata: dict | None = None
                     ) -> Path:
    """Write ``part`` as the sidecar of the potential file ``potential_path`` (atomically),
    bound to that file's sha256; returns the sidecar's path."""
    path = Path(potential_path)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION,
               "potential_sha256": file_sha256(path), "metadata": dict(metadata or {}),
               **part.state()}
    return atomic_torch_save(payload, sidecar_path(path))


def load_uncertainty(potential_path) -> tuple[LatentDistance | None, str | None]:
    """(the sidecar's LatentDistance, None), or (None, why there is none) for the potential file
    ``potential_path``. A sidecar fitted for another file, or an unreadable one, is not used."""
    path = Path(potential_path)
    side = sidecar_path(path)
    if not side.is_file():
        return None, f"{path.name} has no uncertainty part (no {side.name} beside it)"
    try:
        payload = torch.load(side, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling errors come in many types
        return None, f"{side} is unreadable ({type(err).__name__})"
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        return None, f"{side} is not an est_calc uncertainty file"
    if payload.get("format_version", 0) > FORMAT_VERSION:
        return None, f"{side} was written by a newer est_calc (format_version " \
                     f"{payload.get('format_version')}); upgrade est_calc"
    if payload.get("potential_sha256") != file_sha256(path):
        return None, (f"{side.name} was fitted for another version of {path.name} (sha256 "
                      "differs); refit it (est train --uncertainty, or "
                      "fit_latent_distance in est_calc/training/uncertainty.py)")
    try:
        return LatentDistance.from_state(payload), None
    except (KeyError, TypeError, ValueError) as err:
        return None, f"{side} is incomplete or invalid ({err})"


def check_uncertainty_request(uncertainty, potential, committee, cuda_graph) -> None:
    """Raise ValueError (naming the problem) for an ``ESTCalculator(uncertainty=...)`` that
    cannot be honoured: not a bool, a single potential without an uncertainty part, or a
    committee or uncertainty with ``cuda_graph=True``."""
    if not isinstance(uncertainty, bool):
        raise ValueError(f"uncertainty must be True or False, got {uncertainty!r}")
    if uncertainty and not committee and getattr(potential, "uncertainty", None) is None:
        reason = getattr(potential, "uncertainty_problem", None)
        raise ValueError(
            f"uncertainty=True needs a committee (model=[file1, file2, ...]) or a potential "
            f"with an uncertainty part; {reason or 'this potential has no uncertainty part'} "
            "(fit one with `est train --uncertainty`)")
    if (uncertainty or committee) and cuda_graph is True:
        raise ValueError("cuda_graph=True cannot be combined with a committee or "
                         "uncertainty=True (the captured step records one model's energy and "
                         "forces only)")


def committee_sidecar_path(member_path) -> Path:
    """``<folder>/<stem>.committee`` of a member file ``<folder>/<stem>.pt``."""
    path = Path(member_path)
    return path.with_name(path.stem + COMMITTEE_SUFFIX)


def save_committee_thresholds(member_paths: Sequence, thresholds: dict, *,
                              metadata: dict | None = None) -> Path:
    """Write the flag thresholds of the committee of the files ``member_paths`` as a JSON file
    beside the first member (atomically), bound to the sha256 of every member; returns its path.
    """
    paths = [Path(p) for p in member_paths]
    if len(paths) < 2:
        raise ValueError(f"a committee needs at least two members, got {len(paths)}")
    payload = {"format": COMMITTEE_FORMAT, "format_version": 1,
               "members": [{"file": p.name, "sha256": file_sha256(p)} for p in paths],
               "thresholds": check_thresholds(thresholds, "committee thresholds"),
               "metadata": dict(metadata or {})}
    return atomic_write_text(json.dumps(payload, indent=1) + "\n",
                             committee_sidecar_path(paths[0]))


def load_committee_thresholds(member_paths: Sequence) -> tuple[dict, str | None]:
    """(thresholds, None) from the ``.committee`` file beside any of the members that was
    fitted for exactly these members (by sha256, in any order), or ({}, why there are none)."""
    paths = [Path(p) for p in member_paths]
    wanted = sorted(file_sha256(p) for p in paths)
    problems = []
    for path in paths:
        side = committee_sidecar_path(path)
        if not side.is_file():
            continue
        try:
            payload = json.loads(side.read_text())
            if payload.get("format") != COMMITTEE_FORMAT:
                raise ValueError("not a committee file")
            members = sorted(str(m["sha256"]) for m in payload["members"])
            thresholds = check_thresholds(payload["thresholds"], f"{side}'s thresholds")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            problems.append(f"{side} is unreadable ({type(err).__name__})")
            continue
        if members == wanted:
            return thresholds, None
        problems.append(f"{side} was fitted for other members")
    if not problems:
        problems.append(f"no {COMMITTEE_SUFFIX} file beside the members")
    return {}, "; ".join(problems)
