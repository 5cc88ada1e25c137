"""`est train`, `est eval` and `est convert` (wired into est_calc.cli)."""

from __future__ import annotations

import argparse

__all__ = ["add_training_parsers"]


def add_training_parsers(sub) -> None:
    p = sub.add_parser("train", help="train an EST potential from a YAML config")
    p.add_argument("config", help="YAML file (see examples/train_small.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=100 (repeatable)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue from output_dir/checkpoint.pt")
    mode.add_argument("--overwrite", action="store_true",
                      help="replace the run in output_dir (its checkpoint.pt, potential.pt, "
                           "metrics.csv and learning_curves.png; other files stay)")
    p.add_argument("--init", default=None, metavar="POTENTIAL",
                   help="fine-tune this potential (registry name or path) instead of starting fresh")
    unc = p.add_mutually_exclusive_group()
    unc.add_argument("--committee", type=_committee_size, default=None, metavar="K",
                     help="train K potentials with seeds seed..seed+K-1 into output_dir/member<k> "
                          "(a committee: ESTCalculator(model=[...], uncertainty=True))")
    unc.add_argument("--uncertainty", action="store_true",
                     help="after training, fit the latent-distance uncertainty of the exported "
                          "potential (calibrated on data.val or uncertainty.calibration)")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="OC20 S2EF metrics of a potential on a data set")
    p.add_argument("potential", help="registry name or path of a potential")
    p.add_argument("data", help="data in any supported format")
    p.add_argument("--energy", choices=["total", "referenced"], default="total")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--max-frames", type=_positive_int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--all-atoms", action="store_true", help="force metrics on all atoms, not only free ones")
    p.set_defaults(func=_eval)

    p = sub.add_parser("fit-uncertainty",
                       help="fit the latent-distance uncertainty of an existing potential file, "
                            "or the flag thresholds of a committee of files")
    p.add_argument("potential", nargs="+",
                   help="path of a potential .pt file (the sidecar goes beside it); several: "
                        "the members of a committee (their .committee file goes beside the "
                        "first)")
    p.add_argument("--reference", default=None,
                   help="the frames the potential was trained on (any supported format; "
                        "needed for one potential, not for a committee)")
    p.add_argument("--calibration", required=True,
                   help="held-out labelled frames of the same distribution (calibration and the "
                        "95 %% flag thresholds, the recipes' 'auto')")
    p.add_argument("--energy", choices=["total", "referenced"], default="total")
    p.add_argument("--n-reference", type=_positive_int, default=2048,
                   help="reference atoms kept per element (default 2048)")
    p.add_argument("--max-reference-frames", type=_positive_int, default=2000)
    p.add_argument("--overwrite", action="store_true", help="replace an existing sidecar")
    p.set_defaults(func=_fit_uncertainty)

    p = sub.add_parser("convert", help="convert a data set to the packed HDF5 format (or another format)")
    p.add_argument("input")
    p.add_argument("output")
    p.set_defaults(func=_convert)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _committee_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 2:
        raise argparse.ArgumentTypeError(f"a committee needs K >= 2 members, got {text!r}")
    return value


def _train(args) -> int:
    from est_calc.training.config import load_config
    from est_calc.training.uncertainty import train_with_uncertainty

    sets = list(args.set)
    if args.committee is not None:
        sets += ["uncertainty.kind=committee", f"uncertainty.committee_size={args.committee}"]
    elif args.uncertainty:
        sets += ["uncertainty.kind=latent"]
    cfg = load_config(args.config, sets)
    paths = train_with_uncertainty(cfg, init=args.init, resume=args.resume,
                                   overwrite=args.overwrite)
    for path in paths:
        print(f"exported {path}")
    if len(paths) > 1:
        names = ", ".join(repr(str(p)) for p in paths)
        print(f"committee: ESTCalculator(model=[{names}], uncertainty=True)")
    return 0


def _eval(args) -> int:
    from est_calc.calculator import resolve_dtype
    from est_calc.devices import resolve_device
    from est_calc.potential import load_potential
    from est_calc.training.datasets import (FrameSubset, check_species, open_dataset,
                                            validate_frames)
    from est_calc.training.metrics import format_metrics
    from est_calc.training.trainer import evaluate

    device = resolve_device(args.device, what="--device")
    pot = load_potential(args.potential, device=device, dtype=resolve_dtype(args.dtype))
    data = open_dataset(args.data)
    good, report = validate_frames(data, policy="stop")
    good = list(good)[: args.max_frames] if args.max_frames else list(good)
    frames = FrameSubset(data, good)
    check_species(frames, pot.species, what=str(args.data), owner=f"potential {args.potential}")
    m = evaluate(pot, frames, energy_mode=args.energy, batch_size=args.batch_size, device=device,
                 free_atoms_only=not args.all_atoms)
    print(format_metrics(m, title=f"{args.potential} on {args.data} ({len(frames)} frames)"))
    return 0


def _fit_uncertainty(args) -> int:
    """``est fit-uncertainty``: what ``est train --uncertainty`` does after training, for a
    potential file that exists already (trained elsewhere, or before the option)."""
    from pathlib import Path

    from est_calc.training.uncertainty import fit_and_save, fit_committee_thresholds
    from est_calc.uncertainty import committee_sidecar_path, sidecar_path

    paths = [Path(p) for p in args.potential]
    for path in paths:
        if not path.is_file():
            raise ValueError(f"potential file {path} not found (give the path of a .pt file: "
                             f"the uncertainty part is written beside it)")
    if len(paths) > 1:
        if args.reference is not None:
            raise ValueError("--reference is for one potential's latent part; a committee's "
                             "thresholds need only --calibration")
        side = committee_sidecar_path(paths[0])
        if side.exists() and not args.overwrite:
            raise ValueError(f"{side} exists; pass --overwrite to replace it")
        fit_committee_thresholds(paths, args.calibration)
        names = ", ".join(repr(str(p)) for p in paths)
        print(f"use: ESTCalculator(model=[{names}], uncertainty=True)")
        return 0
    path = paths[0]
    if args.reference is None:
        raise ValueError("--reference (the frames the potential was trained on) is needed to "
                         "fit one potential's latent part")
    side = sidecar_path(path)
    if side.exists() and not args.overwrite:
        raise ValueError(f"{side} exists; pass --overwrite to replace it")
    fit_and_save(path, args.reference, args.calibration,
                 max_reference_frames=args.max_reference_frames, n_reference=args.n_reference,
                 energy_mode=args.energy)
    print(f"use: ESTCalculator(model={str(path)!r}, uncertainty=True)")
    return 0


def _convert(args) -> int:
    from est_calc.training.datasets import convert

    n = convert(args.input, args.output)
    print(f"wrote {n} frames to {args.output}")
    return 0
