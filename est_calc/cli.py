"""The ``est`` command line: a thin dispatcher over library functions.

    est demo                      relax CO/Cu(111) and run a short MD with the default potential
    est list                      shipped potentials
    est relax | md | adsorb       md_recipes on the command line
    est generate                  OC20-style synthetic data with EMT as the teacher
    est convert IN OUT.h5         any supported data format to packed HDF5
    est train CONFIG.yaml         train an EST potential
    est eval POTENTIAL DATA       OC20 metrics of a potential on a data set
    est fit-uncertainty POT.pt    the latent uncertainty part of an existing potential file
                                  (several files: a committee's flag thresholds)
    est export POTENTIAL -o F.pt2 a compiled deployment package for ASE and LAMMPS

Each subcommand imports its module lazily so that ``est --help`` stays fast. The library reports
through :mod:`logging` (loggers under ``est_calc``); while a subcommand runs, its INFO records
are printed to stdout as plain lines (:func:`log_to_stdout`). The benchmarks are not a
subcommand: they need a source checkout and the MACE peer's environment, and run with
``make bench`` (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

__all__ = ["main", "build_parser", "log_to_stdout"]


@contextlib.contextmanager
def log_to_stdout(level: int = logging.INFO):
    """Within the block, print the ``est_calc`` loggers' records of ``level`` and above to the
    current ``sys.stdout``, one plain line each (the message only), and only there; the
    loggers' handlers, level and propagation are restored afterwards."""
    logger = logging.getLogger("est_calc")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="relax CO/Cu(111) and run a short MD with the default potential")
    p.add_argument("--steps", type=int, default=100, help="MD steps (default 100)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from est_calc.demo import run_demo

    return run_demo(md_steps=args.steps, device=args.device)


def _add_list(sub) -> None:
    p = sub.add_parser("list", help="list the shipped potentials")
    p.set_defaults(func=_run_list)


def _run_list(args) -> int:
    from est_calc.potential import list_potentials

    names = list_potentials()
    if not names:
        print("no potentials ship with this installation")
    for name in names:
        print(name)
    return 0


def _optional(register_path: str, attr: str, sub) -> None:
    """Register a subcommand whose parser lives in another module, if that module exists."""
    import importlib

    try:
        module = importlib.import_module(register_path)
    except ModuleNotFoundError as exc:
        if exc.name and register_path.startswith(exc.name):
            return
        raise
    getattr(module, attr)(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="est", description="Equivariant Spherical Transformer potentials for ASE"
    )
    from est_calc import __version__

    parser.add_argument("--version", action="version", version=f"est_calc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(sub)
    _add_list(sub)
    _optional("md_recipes.cli", "add_relax_parser", sub)
    _optional("md_recipes.cli", "add_md_parser", sub)
    _optional("md_recipes.cli", "add_adsorb_parser", sub)
    _optional("est_calc.training.synthetic", "add_generate_parser", sub)
    _optional("est_calc.training.cli", "add_training_parsers", sub)
    _optional("est_calc.deploy.cli", "add_export_parser", sub)
    return parser


#: Commands whose process does nothing but simulate: glibc keeps their freed memory for reuse.
SIMULATION_COMMANDS = ("md", "relax", "adsorb")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    if args.command in SIMULATION_COMMANDS:
        # A process that only simulates keeps its largest step's memory for the next steps
        # (est_calc.allocator, retain=True; EST_CALC_TUNE_MALLOC=0 or =moderate says otherwise).
        from est_calc.allocator import tune_malloc

        tune_malloc(retain=True)
    return run_command(args)


def _user_errors() -> tuple[type[Exception], ...]:
    """Failures of the input or of the run, not of the program: bad values and damaged files
    (ValueError), files and devices the system refuses (OSError: missing, unreadable, a folder,
    disk full), running out of memory (MemoryError, whose message from the calculator says what
    to change) and md_recipes' SimulationUnstable (a run that left the physical regime).
    Anything else (TypeError, AttributeError, ...) is a bug and keeps its traceback."""
    errors: tuple[type[Exception], ...] = (ValueError, OSError, MemoryError)
    try:
        from md_recipes.safety import SimulationUnstable
    except ImportError:
        return errors
    return errors + (SimulationUnstable,)


def run_command(args: argparse.Namespace) -> int:
    """Run ``args.func(args)``; report a user error (see :func:`_user_errors`) as the single
    line ``est <command>: error: <message>`` on stderr and return 2; let anything else through."""
    try:
        with log_to_stdout():
            return int(args.func(args) or 0)
    except _user_errors() as exc:  # evaluated only when an exception arrives
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"est {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
