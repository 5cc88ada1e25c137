"""`est convert`, `est eval`, `est train` (with --set, --resume and --init) from the command line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from ase.build import bulk
from ase.calculators.emt import EMT

from est_calc.cli import main
from est_calc.model import ModelConfig
from est_calc.potential import Potential, load_potential, save_potential
from est_calc.training.datasets import frame_from_atoms, open_dataset, write_extxyz_with_sidecar


def _frames(n, seed):
    out = []
    for k in range(n):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.rattle(0.05, seed=seed * 100 + k)
        atoms.calc = EMT()
        atoms.get_potential_energy()
        out.append(frame_from_atoms(atoms, sid=k, fid=0, reference_energy=0.5))
    return out


@pytest.fixture(scope="module")
def extxyz(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    write_extxyz_with_sidecar(_frames(6, 1), d / "train.extxyz")
    return d / "train.extxyz"


def test_convert_then_eval_prints_oc20_metrics(extxyz, tmp_path, capsys):
    out = tmp_path / "train.h5"
    assert main(["convert", str(extxyz), str(out)]) == 0
    a, b = open_dataset(extxyz), open_dataset(out)
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(b[3].forces, a[3].forces)
    assert b[3].reference_energy == pytest.approx(0.5)

    pot = Potential.from_config("tiny", species=[29])
    save_potential(pot, tmp_path / "p.pt")
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "p.pt"), str(out), "--dtype", "float64"]) == 0
    text = capsys.readouterr().out
    for label in ("energy MAE", "force MAE", "force cosine", "EwT", "EFwT"):
        assert label in text


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing.extxyz"), str(tmp_path / "o.h5")]) == 2
    err = capsys.readouterr().err
    assert "missing.extxyz" in err and "Traceback" not in err


@pytest.mark.slow
def test_train_with_overrides_resume_and_init(extxyz, tmp_path, capsys):
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "data": {"train": str(extxyz), "val": str(extxyz)},
        "model": {"preset": "tiny"},
        "train": {"max_steps": 4, "batch_size": 2, "eval_every": 2, "checkpoint_every": 2,
                  "device": "cpu", "dtype": "float64", "progress": False},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--set", "train.max_steps=2"]) == 0
    out = capsys.readouterr().out  # the trainer logs; the command prints its records
    assert "frames; problems: none" in out and "exported" in out
    first = tmp_path / "run" / "potential.pt"
    assert first.exists()
    # --resume continues the same run to a longer max_steps.
    assert main(["train", str(path), "--resume"]) == 0
    resumed = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert resumed["step"] == 4
    # --init starts from the exported weights instead of a fresh initialisation.
    init = load_potential(first, dtype=torch.float64)
    assert main(["train", str(path), "--init", str(first), "--set", f"output_dir={tmp_path / 'ft'}",
                 "--set", "train.max_steps=1", "--set", "train.lr=0.0"]) == 0
    tuned = load_potential(tmp_path / "ft" / "potential.pt", dtype=torch.float64)
    for (k, v), (k2, v2) in zip(init.state_dict().items(), tuned.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(v2, v, rtol=1e-6, atol=1e-7)  # lr = 0: weights unchanged
    assert tuned.metadata["training"]["init"] == str(first)
    assert tuned.metadata["training"]["init_training"]["steps"] == 4  # the first run's record (resumed to 4)

    # train.init in the config may name a training checkpoint: the run starts from its EMA
    # weights (not its raw weights, not a fresh model) and records where it came from.
    ckpt = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    assert any(not torch.equal(state["ema"][k], state["model"][k]) for k in state["model"])
    assert main(["train", str(path), "--set", f"train.init={ckpt}", "--set", f"output_dir={tmp_path / 'ck'}",
                 "--set", "train.max_steps=1", "--set", "train.lr=0.0"]) == 0
    staged = load_potential(tmp_path / "ck" / "potential.pt", dtype=torch.float64)
    for k, v in staged.state_dict().items():
        torch.testing.assert_close(v, state["ema"][k].to(v.dtype), rtol=1e-6, atol=1e-7)
    assert staged.metadata["training"]["init"] == str(ckpt)
    assert staged.metadata["training"]["init_training"]["steps"] == 4
    # ... also when the second stage is interrupted and resumed: the record travels in its checkpoint.
    stage = ["--set", f"train.init={ckpt}", "--set", f"output_dir={tmp_path / 'ck2'}"]
    assert main(["train", str(path), *stage, "--set", "train.max_steps=1"]) == 0
    assert main(["train", str(path), *stage, "--set", "train.max_steps=2", "--resume"]) == 0
    resumed = load_potential(tmp_path / "ck2" / "potential.pt")
    assert resumed.metadata["training"]["steps"] == 2
    assert resumed.metadata["training"]["init_training"]["steps"] == 4
    # A file that is neither a checkpoint nor a potential is a clear error.
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    assert main(["train", str(path), "--set", f"train.init={bad}", "--set", f"output_dir={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err
    assert "neither an est_calc training checkpoint nor a potential" in err and "bad.pt" in err


@pytest.mark.parametrize("config", ["examples/train_small.yaml", "training_runs/est-emt-small.yaml"])
def test_shipped_configs_run_on_the_generator_output(config, tmp_path, monkeypatch):
    """The example config and the default potential's config point at the files `est generate`
    writes (paths relative to the repository), and train for a step as documented."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    raw = yaml.safe_load((root / config).read_text())
    monkeypatch.chdir(tmp_path)
    # the same seed for both: a one-system validation set of another seed may hold elements the
    # one-system training set lacks, which training from scratch refuses
    for split, seed in (("train", 1), ("val", 1)):
        out = Path(raw["data"][split]).parent
        assert main(["generate", str(out), "--n-systems", "1", "--seed", str(seed),
                     "--formats", "hdf5", "--frames-per-system", "2", "--no-bulk", "--no-gas",
                     "--quiet"]) == 0
        assert Path(raw["data"][split]).is_file(), f"{config}: {raw['data'][split]} not written"
    overrides = ["train.max_steps=1", "train.eval_every=1", "train.checkpoint_every=1",
                 "model.preset=tiny", f"output_dir={tmp_path / 'run'}"]
    args = ["train", str(root / config)] + [x for o in overrides for x in ("--set", o)]
    assert main(args) == 0
    assert (tmp_path / "run" / "potential.pt").is_file()


def _generate_recipe_data(raw: dict, headers: list[str], where) -> None:
    """Run the data commands in the headers of training_runs/est-emt-small-{headers}.yaml at toy
    size in ``where``, and check they write every file the config ``raw`` reads. The commands
    are plain `est generate ...` lines (no shell syntax, checked), run through the `est` entry
    point's own function in this process: a subprocess each spent ~4 s importing torch, 50 s of
    the longest header chain."""
    import os
    import re
    import shlex
    from pathlib import Path

    from est_calc.cli import main as est_main

    root = Path(__file__).resolve().parents[2]
    commands = []
    for name in headers:  # the header's shell commands: "#   cmd" lines
        text = (root / "training_runs" / f"est-emt-small-{name}.yaml").read_text()
        commands += [m.group(1) for m in re.finditer(r"^#   (est generate .*)$", text, re.M)]
    tiny = ["--n-systems", "1", "--frames-per-system", "2", "--no-bulk", "--no-gas", "--quiet"]
    here = os.getcwd()
    try:
        os.chdir(where)
        for cmd in commands:
            assert not set(cmd) & set("|&;<>$`\\"), f"not a plain command: {cmd}"
            argv = shlex.split(cmd)
            assert argv[:2] == ["est", "generate"], cmd
            assert est_main(argv[1:] + tiny) == 0, cmd
    finally:
        os.chdir(here)
    assert len(raw["data"]["train"]) == len(commands) - 1  # all but the validation seed
    assert all((where / p).is_file() for p in raw["data"]["train"])
    assert (where / raw["data"]["val"]).is_file()


def _recipes() -> dict[str, dict]:
    """Every config of training_runs/, by name (the file stem)."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "training_runs"
    return {p.stem: yaml.safe_load(p.read_text()) for p in sorted(folder.glob("*.yaml"))}


def _stage_before(raw: dict, recipes: dict[str, dict]) -> str | None:
    """The config whose run ``raw``'s ``train.init`` reads (None: no init, or a file a script
    makes, such as upgrade_norm.py's runs/upgraded_init.pt)."""
    init = raw["train"].get("init")
    for name, other in recipes.items():
        if init == f"{other['output_dir']}/checkpoint.pt":
            return name
    return None


def test_recipes_write_under_runs_and_chain_through_it():
    """Run outputs stay out of git: every config writes to runs/<its name>, and each train.init
    reads the checkpoint of another config's run there (or, for version 8's first stage, the
    file its header's upgrade_norm.py command writes)."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "training_runs"
    recipes = _recipes()
    assert len(recipes) >= 10
    for name, raw in recipes.items():
        assert raw["output_dir"] == f"runs/{name}", name
        init = raw["train"].get("init")
        if init is None:
            continue
        assert init.startswith("runs/"), f"{name}: train.init {init} is not a run output"
        if _stage_before(raw, recipes) is None:
            header = (folder / f"{name}.yaml").read_text()
            assert "upgrade_norm.py" in header and init in header, f"{name}: nothing writes {init}"


def test_every_recipe_is_a_valid_training_config():
    """Every YAML of training_runs/ passes TrainConfig's full validation (the check every
    `est train` makes before any work). The recipes run below cover each kind of header and
    init chain; running all ten took five minutes of the suite's fifteen."""
    from est_calc.training.config import TrainConfig

    for name, raw in _recipes().items():
        TrainConfig.from_dict(raw)  # raises a one-line ValueError on any bad value


@pytest.mark.parametrize("stage,headers", [
    ("est-emt-small-stage2", ["stage2"]),
    ("est-emt-small-stage5", ["stage2", "stage3", "stage4", "stage5"]),  # the longest header chain
    ("est-emt-small-gpu", ["stage2", "stage3"]),  # the GPU stages read five of the seeds
    ("est-emt-fast-stage3", ["stage2", "stage3", "stage4", "stage5"]),  # version 7's chain
])
def test_staged_recipes_of_the_default_potential_run_as_written(stage, headers, tmp_path,
                                                                 monkeypatch):
    """training_runs/est-emt-small-{stage2,...,stage6,gpu,gpu2}.yaml and est-emt-fast-{gpu,gpu2,stage3}.yaml:
    the data commands in the headers (run as written, at toy size) produce what the data section
    reads, and a run starts from the weights its train.init hands it. Run outputs are not in git,
    so an untrained potential with the architecture of the chain's from-scratch stage and the
    shipped potential's elements stands in for the stage before's checkpoint."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    config = root / "training_runs" / f"{stage}.yaml"
    raw = yaml.safe_load(config.read_text())
    _generate_recipe_data(raw, headers, tmp_path)

    recipes, first = _recipes(), stage
    while (before := _stage_before(recipes[first], recipes)) is not None:
        first = before
    model = recipes[first]["model"]
    assert recipes[first]["train"].get("init") is None, f"{stage}: the chain has no first stage"
    mcfg = ModelConfig.preset(model["preset"], **model.get("overrides", {}))
    init = save_potential(Potential.from_config(mcfg, load_potential("est-emt-small").species),
                          tmp_path / "init.pt")
    monkeypatch.chdir(tmp_path)
    overrides = ["train.max_steps=1", "train.lr=0.0", "train.eval_every=1", "train.checkpoint_every=1",
                 "train.device=cpu", f"train.init={init}", f"output_dir={tmp_path / 'run'}"]
    assert main(["train", str(config)] + [x for o in overrides for x in ("--set", o)]) == 0
    out = load_potential(tmp_path / "run" / "potential.pt", dtype=torch.float64)
    start = load_potential(init, dtype=torch.float64).state_dict()
    for k, v in out.state_dict().items():  # lr = 0: the weights it started from, unchanged
        torch.testing.assert_close(v, start[k], rtol=1e-6, atol=1e-7)
    assert out.metadata["training"]["init"] == str(init)


def test_fast_candidate_recipe_runs_as_written(tmp_path, monkeypatch):
    """training_runs/est-emt-fast.yaml (stage 1 of version 7 of the default, from scratch): its
    data are the eleven seeds, and it builds the "small" preset, under 0.6x the parameters of
    the "small" of versions 1-6."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    config = root / "training_runs" / "est-emt-fast.yaml"
    raw = yaml.safe_load(config.read_text())
    assert "init" not in raw["train"]
    _generate_recipe_data(raw, ["stage2", "stage3", "stage4", "stage5"], tmp_path)
    monkeypatch.chdir(tmp_path)
    overrides = ["train.max_steps=1", "train.eval_every=1", "train.checkpoint_every=1",
                 "train.device=cpu", f"output_dir={tmp_path / 'run'}"]
    assert main(["train", str(config)] + [x for o in overrides for x in ("--set", o)]) == 0
    out = load_potential(tmp_path / "run" / "potential.pt")
    c = out.config
    assert (c.channels, c.n_points, c.so2_m_max, c.message) == (24, 32, 1, "so2")
    assert c == Potential.from_config("small", species=out.species).config  # the preset since v7
    old = ModelConfig.preset("small", channels=32, radial_hidden=32, n_points=48, so2_m_max=2)
    assert out.model.num_parameters() < 0.6 * Potential.from_config(old, out.species).model.num_parameters()
