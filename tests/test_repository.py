"""The repository holds code, configs and one results document, and its docs point at real things.

Run outputs (checkpoints, logs, plots, per-run reports) belong in the git-ignored ``runs/``; the
numbers they produce go into ``benchmarks/RESULTS.md``. These checks keep the lab notebook from
coming back into the tree, keep the links of the documentation resolvable and keep ``est`` from
advertising a command that does not exist.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Model weights: only the shipped potentials (and test fixtures) may be tracked.
WEIGHT_SUFFIXES = {".pt", ".pt2", ".pth", ".ckpt", ".safetensors", ".uncertainty"}
#: Plots and pictures: only a figure a model card links may be tracked.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".svg", ".pdf"}
#: What a run writes and the repository never holds, wherever it is.
RUN_OUTPUT_SUFFIXES = {".log", ".traj", ".npz", ".h5", ".hdf5", ".lmdb", ".aselmdb", ".xz"}
RUN_OUTPUT_NAMES = {"metrics.csv", "train_report.json", "card_numbers.json", "card_numbers.md",
                    "adsorption_vs_emt.md", "learning_curves.png", "checkpoint.pt", "potential.pt"}
#: What each folder of recipes and scripts may hold (suffixes, or exact names).
FOLDER_CONTENTS = {
    "training_runs": {".yaml", ".py", "README.md"},
    "benchmarks": {".py", ".sh", ".md"},
}
#: Top-level folders whose paths the docs may name in backticks; such a path must exist.
TRACKED_TOPS = ("est_calc", "md_recipes", "benchmarks", "training_runs", "tests", "examples",
                "potentials")


def _tracked() -> list[PurePosixPath]:
    """Files git tracks in this checkout (the test is skipped outside a git work tree)."""
    try:
        proc = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True,
                              timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("git is not available")
    if proc.returncode != 0:
        pytest.skip("not a git work tree (an installed copy or an sdist)")
    return [PurePosixPath(p) for p in proc.stdout.decode().split("\0") if p]


def _model_card_links() -> set[PurePosixPath]:
    """Files the model cards in potentials/ link to, relative to the repository."""
    linked = set()
    for card in (ROOT / "potentials").glob("*.md"):
        for target in _links(card.read_text(encoding="utf-8")):
            path = (card.parent / target).resolve()
            if path.is_relative_to(ROOT):
                linked.add(PurePosixPath(path.relative_to(ROOT).as_posix()))
    return linked


def test_no_run_outputs_in_the_tree():
    """No checkpoints outside potentials/ and tests/, no plots but a model card's figures, no
    logs or per-run reports anywhere, and the recipe and benchmark folders hold recipes and
    scripts only."""
    files = _tracked()
    assert files, "git lists no files"
    card_figures = _model_card_links()
    problems = []
    for path in files:
        top, suffix = path.parts[0], path.suffix.lower()
        if suffix in WEIGHT_SUFFIXES and top not in ("potentials", "tests"):
            problems.append(f"{path}: weights outside potentials/ (run outputs go to runs/)")
        if suffix in IMAGE_SUFFIXES and path not in card_figures:
            problems.append(f"{path}: a plot no model card links (plots go to runs/)")
        if suffix in RUN_OUTPUT_SUFFIXES or path.name in RUN_OUTPUT_NAMES:
            problems.append(f"{path}: a run output (results go to benchmarks/RESULTS.md)")
        if top in ("runs", "data") or path.parts[:2] == ("benchmarks", "results"):
            problems.append(f"{path}: inside a git-ignored output folder")
        allowed = FOLDER_CONTENTS.get(top)
        if allowed is not None and len(path.parts) > 1 and (
                (path.name not in allowed and suffix not in allowed) or len(path.parts) > 2):
            problems.append(f"{path}: {top}/ holds only {sorted(allowed)} at its top level")
    assert not problems, "\n".join(problems)


def test_runs_folder_is_ignored():
    lines = (ROOT / ".gitignore").read_text().split()
    assert "runs/" in lines or "/runs/" in lines


def _links(text: str) -> list[str]:
    """Relative targets of the markdown links of ``text`` (no URLs, no in-page anchors)."""
    out = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        out.append(target.split("#", 1)[0])
    return out


def _docs() -> list[Path]:
    names = ["README.md", "CONVENTIONS.md", "benchmarks/README.md", "benchmarks/RESULTS.md",
             "training_runs/README.md"]
    cards = sorted((ROOT / "potentials").glob("*.md"))
    return [ROOT / n for n in names if (ROOT / n).is_file()] + cards


def test_results_document_exists_and_the_readme_links_it():
    """The README shows one headline table of numbers (besides the shipped potential's row) and
    links the results document for everything else."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert (ROOT / "benchmarks" / "RESULTS.md").is_file()
    assert "benchmarks/RESULTS.md" in _links(readme)
    tables = re.findall(r"^\|[ :|-]*---", readme, re.MULTILINE)  # one delimiter row per table
    assert len(tables) <= 2, f"the README holds {len(tables)} tables; results go to RESULTS.md"
    assert readme.count("<!-- headline:") == 1


@pytest.mark.parametrize("doc", _docs(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_doc_links_and_named_paths_exist(doc):
    """Every relative link of the document resolves, and every repository path it names in
    backticks (``benchmarks/gpu.py``, ``potentials/est-emt-small.md``) exists."""
    text = doc.read_text(encoding="utf-8")
    missing = [t for t in _links(text) if not (doc.parent / t).exists()]
    for token in re.findall(r"`([^`\s]+)`", text):
        token = token.rstrip(".,;:")
        if not token.startswith(tuple(f"{top}/" for top in TRACKED_TOPS)):
            continue
        if re.search(r"[<>*{}$\[\]]|\.\.\.", token):
            continue  # a pattern or a placeholder, not a path
        if token.startswith("benchmarks/results/"):
            continue  # run_all.py's git-ignored output
        if not (ROOT / token.split("::")[0]).exists():
            missing.append(token)
    assert not missing, f"{doc.relative_to(ROOT)} names missing files: {missing}"


def test_make_targets_named_in_the_readme_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.MULTILINE))
    named = set(re.findall(r"(?:^|`)make ([a-z][a-z-]*)", readme, re.MULTILINE))
    assert named, "the README names no make target"
    assert named <= targets, f"README names make targets the Makefile lacks: {named - targets}"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    from est_calc.cli import build_parser

    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return dict(actions[0].choices)


def test_every_advertised_command_exists_and_answers_help(capsys):
    """``est --help``, the cli module's docstring and the README advertise only commands that
    exist, and each registered command parses ``--help``."""
    from est_calc import cli

    commands = _subcommands()
    advertised = set()
    for line in (cli.__doc__ or "").splitlines():
        m = re.match(r"\s+est ((?:[a-z][a-z-]*(?: \| )?)+)", line)
        if m:
            advertised |= {w.strip() for w in m.group(1).split("|")}
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    advertised |= set(re.findall(r"(?:^|`|\$ )est ([a-z][a-z-]*)", readme, re.MULTILINE))
    assert {"demo", "relax", "md", "train"} <= advertised
    assert advertised <= set(commands), f"advertised but missing: {advertised - set(commands)}"
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    listed = capsys.readouterr().out
    for name in commands:
        assert name in listed
        with pytest.raises(SystemExit) as exc:
            cli.main([name, "--help"])
        assert exc.value.code == 0, name
    assert "bench" not in commands  # the benchmarks run from a checkout: make bench


def test_every_optional_command_module_imports():
    """``_optional`` skips a subcommand whose module is missing; every module cli.py names must
    therefore exist, or its command would vanish from ``est --help`` without a word."""
    import importlib

    source = (ROOT / "est_calc" / "cli.py").read_text()
    named = re.findall(r'_optional\("([\w.]+)", "(\w+)"', source)
    assert named
    for module, attr in named:
        assert callable(getattr(importlib.import_module(module), attr)), f"{module}.{attr}"


def test_test_files_have_unique_basenames():
    """tests/ has no __init__.py files, so pytest imports each test module by its basename: two
    files of one name in different folders stop the whole collection."""
    seen: dict[str, Path] = {}
    clashes = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        if path.name in seen:
            clashes.append(f"{seen[path.name].relative_to(ROOT)} and {path.relative_to(ROOT)}")
        seen.setdefault(path.name, path)
    assert not clashes, "test modules with the same basename: " + "; ".join(clashes)
