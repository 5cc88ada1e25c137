"""est_calc.allocator: glibc's malloc thresholds are raised once per CPU process, never over the
user's own choice, and the setting does what it is for (fresh tensors stop faulting pages in).

Each case runs in a subprocess: the setting is process-wide and cannot be undone.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="needs glibc")

# Energy, forces and stress of a 66-atom CO/Cu(111) slab with the "small" architecture, ten
# times: without the setting each call's temporaries (~1-2 MB) fault hundreds of fresh pages in.
_PROBE = """
import json, resource, sys
from ase import Atoms
from ase.build import add_adsorbate, fcc111
from est_calc import allocator
from est_calc.calculator import ESTCalculator
from est_calc.potential import Potential
mode = sys.argv[1]
if mode == "direct":
    allocator.tune_malloc()
calc = ESTCalculator(Potential.from_config("small", species=[6, 8, 29]), device="cpu",
                     tune_malloc=mode == "calculator")
slab = fcc111("Cu", size=(4, 4, 4), vacuum=10.0)
add_adsorbate(slab, Atoms("CO", positions=[(0, 0, 0), (0, 0, 1.15)]), 2.0, "ontop")  # C down
slab.pbc = True
props = ["energy", "forces", "stress"]
slab.rattle(0.05, seed=1)
for _ in range(5):
    calc.calculate(slab, props)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    calc.calculate(slab, props)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
print(json.dumps({"tuned": allocator.is_tuned(), "faults": faults}))
"""

# glibc's own mechanism, deterministic: 40 MiB blocks lie above its dynamic mmap ceiling (32 MiB),
# so by default each one is a fresh mapping that faults in again; with the raised threshold the
# heap keeps and reuses it.
# numpy asks for transparent huge pages on large arrays where the kernel's THP mode is
# "madvise", which would count 2 MiB faults instead of 4 KiB ones: switched off here so the
# count measures glibc's choice alone, whatever the machine's THP setting.
_BLOCKS = """
import json, resource, sys
import numpy as np
try:
    from numpy._core.multiarray import _set_madvise_hugepage
except ImportError:
    from numpy.core.multiarray import _set_madvise_hugepage
_set_madvise_hugepage(False)
x = np.ones(10 << 20, dtype=np.float32); del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    x = np.ones(10 << 20, dtype=np.float32); del x
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _probe(mode: str, script: str = _PROBE, **env) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "EST_CALC_TUNE_MALLOC")}
    out = subprocess.run([sys.executable, "-c", script, mode], env={**clean, **env},
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_cpu_calculator_tunes_malloc_and_its_calls_stop_faulting_pages_in():
    untuned = _probe("calculator-off")
    tuned = _probe("calculator")
    assert not untuned["tuned"] and tuned["tuned"]
    # Measured on 2 cores, per call: 6-150 faults tuned; untuned 110-1,100 depending on where
    # glibc's dynamic threshold settled (so only the tuned side has a firm bound).
    assert tuned["faults"] < 200


def test_user_choices_win():
    assert not _probe("calculator-off")["tuned"]
    assert not _probe("calculator", EST_CALC_TUNE_MALLOC="0")["tuned"]
    assert not _probe("direct", MALLOC_TRIM_THRESHOLD_="1000000")["tuned"]
    assert not _probe("direct", GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000000")["tuned"]


# Blocks of 100 MiB: above glibc's largest mmap threshold (32 MiB), so even the raised
# thresholds map each one afresh; with retain=True the heap keeps and reuses it.
_LARGE = _BLOCKS.replace("10 << 20", "25 << 20").replace(
    "_set_madvise_hugepage(False)", """_set_madvise_hugepage(False)
from est_calc import allocator
if sys.argv[1] != "none":
    allocator.tune_malloc(retain=sys.argv[1] == "retain")
""")


def test_retain_keeps_blocks_above_any_threshold():
    moderate = _probe("moderate", _LARGE)
    retained = _probe("retain", _LARGE)
    by_env = _probe("moderate", _LARGE, EST_CALC_TUNE_MALLOC="retain")
    assert moderate["faults"] > 10_000  # 10 x 25,600 pages, each faulted in again
    assert retained["faults"] < 100 and by_env["faults"] < 100
    # the user's choice wins over retain=True
    assert _probe("retain", _LARGE, EST_CALC_TUNE_MALLOC="moderate")["faults"] > 10_000
    assert _probe("retain", _LARGE, EST_CALC_TUNE_MALLOC="0")["faults"] > 10_000


def test_simulation_commands_ask_for_retain(monkeypatch, tmp_path):
    from est_calc import allocator, cli

    asked = []
    monkeypatch.setattr(allocator, "tune_malloc", lambda retain=False: asked.append(retain))
    missing = str(tmp_path / "missing.xyz")
    for command in (["md", missing, "--steps", "1"], ["relax", missing]):
        assert cli.main(command) == 2  # the missing file is reported after the setting
    assert asked == [True, True]
    cli.main(["list"])
    assert asked == [True, True]


def test_malloc_env_names_the_same_thresholds():
    from est_calc.allocator import MMAP_THRESHOLD, TRIM_THRESHOLD, malloc_env

    env = malloc_env()
    assert env == {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
                   "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
    retain = malloc_env(retain=True)
    assert retain["MALLOC_MMAP_MAX_"] == "0"
    assert _probe("none", _LARGE, **retain)["faults"] < 100
    # A process started with them keeps its large blocks (numpy's, allocated by glibc).
    started = _probe("none", _BLOCKS, **env)
    default = _probe("none", _BLOCKS)
    assert default["faults"] > 1000 and started["faults"] < 100
