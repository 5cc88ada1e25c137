"""low_memory=True (per-layer activation checkpointing) changes memory, never results."""

from __future__ import annotations

import numpy as np

from est_calc.calculator import ESTCalculator


def test_low_memory_gives_identical_results(make_potential, message, cu_slab_co, triclinic_bulk):
    pot = make_potential(message=message, n_layers=2)
    plain = ESTCalculator(pot, dtype="float64")
    lean = ESTCalculator(pot, dtype="float64", low_memory=True)
    for atoms in (cu_slab_co, triclinic_bulk):
        props = ["energy", "forces"] + (["stress"] if atoms.pbc.all() else [])
        plain.calculate(atoms, props)
        lean.calculate(atoms, props)
        for key in props:
            np.testing.assert_allclose(lean.results[key], plain.results[key], rtol=0, atol=1e-12,
                                       err_msg=key)
    batch = lean.calculate_batch([cu_slab_co, triclinic_bulk], ["energy", "forces"])
    assert np.isfinite(batch[1]["forces"]).all()
    assert not pot.model._checkpoint_layers  # the calculator's switch does not leak out


def test_checkpointing_is_really_used(make_potential, cu_slab_co, monkeypatch):
    import torch.utils.checkpoint as ckpt

    calls = []
    real = ckpt.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "checkpoint", counting)
    pot = make_potential(n_layers=2)
    ESTCalculator(pot, dtype="float64", low_memory=True).calculate(cu_slab_co, ["forces"])
    assert len(calls) == 2  # one per layer
    calls.clear()
    ESTCalculator(pot, dtype="float64").calculate(cu_slab_co, ["forces"])
    assert not calls


def test_bf16_attention_option(make_potential, cu_slab_co):
    import pytest

    pot = make_potential(message="so2", n_layers=2)
    ref = ESTCalculator(pot, dtype="float32")
    low = ESTCalculator(pot, dtype="float32", attention_precision="bfloat16")
    ref.calculate(cu_slab_co, ["energy", "forces"])
    low.calculate(cu_slab_co, ["energy", "forces"])
    f_ref, f_low = ref.results["forces"], low.results["forces"]
    assert np.isfinite(f_low).all()
    assert 0 < np.abs(f_low - f_ref).max() < 0.05 * np.abs(f_ref).max()
    with pytest.raises(ValueError, match="attention precision"):
        ESTCalculator(pot, attention_precision="fp8")
