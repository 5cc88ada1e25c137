"""``est export POTENTIAL -o model.pt2 [--dtype float64] [--device cpu|cuda] [--overwrite]
[--openmp]``."""

from __future__ import annotations

__all__ = ["add_export_parser"]


def add_export_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="export a potential to a compiled deployment package (.pt2) for ASE "
                       "and LAMMPS")
    p.add_argument("potential", help="registry name or path of a potential (.pt)")
    p.add_argument("-o", "--output", required=True, metavar="FILE.pt2",
                   help="the package to write (atomically: complete or not at all)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                   help="dtype of the package's inputs and outputs (default float32)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="device the package is compiled for (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing FILE.pt2")
    p.add_argument("--openmp", action="store_true",
                   help="CPU: OpenMP-parallel kernels, run on OMP_NUM_THREADS threads (default: "
                        "serial kernels, about 1.3x faster on one thread: one thread per MPI "
                        "rank, LAMMPS's usual layout)")
    p.set_defaults(func=_export)


def _export(args) -> int:
    from est_calc.deploy.export import export_potential

    result = export_potential(args.potential, args.output, dtype=args.dtype, device=args.device,
                              overwrite=args.overwrite, openmp=args.openmp)
    meta = result.metadata
    print(f"wrote {result.path}: {meta['symbols']}, cutoff {meta['cutoff_A']} Å, "
          f"{meta['n_layers']} layers (ghost atoms to {float(meta['interaction_range_A']):g} Å), "
          f"{meta['dtype']} on {meta['device']} ({meta['threads']} kernels); traced in "
          f"{result.trace_s:.0f} s, compiled in "
          f"{result.compile_s:.0f} s, max deviation from the eager potential "
          f"{result.max_deviation:.1e}")
    return 0
