"""The intra-op thread choice of est_calc.threads (issue 23): its rules and that it restores."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from est_calc import threads


def test_small_calls_run_on_one_thread_large_ones_on_the_available_cpus(monkeypatch):
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    assert threads.choose_threads(threads.PARALLEL_MIN_EDGES - 1) == 1
    big = threads.choose_threads(threads.PARALLEL_MIN_EDGES)
    assert big == max(1, min(threads.available_cpus(), torch.get_num_threads()))


def test_the_users_choice_wins(monkeypatch):
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    assert threads.choose_threads(10, requested=3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.choose_threads(10) is None
    assert threads.choose_threads(10**6) is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # never exceeded
        assert threads.choose_threads(10**6) == 1
    finally:
        torch.set_num_threads(previous)


def test_intra_op_threads_restores_the_count():
    previous = torch.get_num_threads()
    with threads.intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == previous
    with threads.intra_op_threads(None):
        assert torch.get_num_threads() == previous


def test_calculator_uses_and_restores_the_count(make_potential, cu_slab_co, monkeypatch):
    """A small call runs on one thread, threads=N on N; torch's count is restored after."""
    import pytest

    import est_calc.calculator as calculator_module
    from est_calc.calculator import ESTCalculator

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    seen = []
    real = calculator_module.energy_forces_stress

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(calculator_module, "energy_forces_stress", spy)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        cu_slab_co.calc = ESTCalculator(make_potential(), device="cpu", dtype="float64")
        cu_slab_co.get_forces()
        assert seen == [1] and torch.get_num_threads() == 2
        cu_slab_co.calc = ESTCalculator(make_potential(), device="cpu", dtype="float64", threads=2)
        cu_slab_co.get_forces()
        assert seen == [1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        ESTCalculator(make_potential(), device="cpu", dtype="float64", threads=0)


def test_importing_est_calc_sets_a_short_spin_unless_a_policy_was_chosen():
    code = ("import est_calc, os; "
            "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}

    def run(extra: dict, program: str = code) -> str:
        return subprocess.run([sys.executable, "-c", program], env={**env, **extra},
                              capture_output=True, text=True, check=True).stdout.strip()

    assert run({}) == "1000 None"
    assert run({"OMP_WAIT_POLICY": "ACTIVE"}) == "None ACTIVE"
    assert run({"OMP_WAIT_POLICY": "PASSIVE"}) == "None PASSIVE"
    assert run({"GOMP_SPINCOUNT": "50"}) == "50 None"
    # too late once torch is loaded: left as it was
    assert run({}, "import torch; " + code) == "None None"
