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
    # batches take the paired-edge path of the so2 blocks (the torch cell list mirrors pairs)
    batch = lean.calculate_batch([cu_slab_co, triclinic_bulk], ["energy", "forces"])
    ref = plain.calculate_batch([cu_slab_co, triclinic_bulk], ["energy", "forces"])
    for got, want in zip(batch, ref):
        np.testing.assert_allclose(got["forces"], want["forces"], rtol=0, atol=1e-12)
        assert abs(got["energy"] - want["energy"]) < 1e-12
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


def test_recomputation_in_another_thread_keeps_the_attention_settings(make_potential, cu_slab_co):
    """On CUDA, autograd runs the backward (and so the checkpointed layers' recomputation) in
    its own thread. Here the backward is run in another thread on purpose: with a bf16 attention
    core (a setting of the accelerated model's modules, not of the thread) the recomputation must
    use it too (else checkpoint refuses the mismatch, as it did on an H100 at 97k atoms when the
    setting was thread-local) and give the forces of the one-thread path."""
    import dataclasses
    import threading

    import torch

    from est_calc.accel import accelerate
    from est_calc.batch import AtomsBatch
    from est_calc.neighbors import build_graph

    pot = make_potential(message="so2", n_layers=2)
    fast = accelerate(pot, inference=True, attention_dtype=torch.bfloat16)
    batch = AtomsBatch.from_atoms(cu_slab_co, dtype=torch.float32)
    graph = build_graph(batch, pot.cutoff_A)

    def forces(other_thread: bool):
        pos = batch.positions.clone().requires_grad_(True)
        b = dataclasses.replace(batch, positions=pos)
        with fast.model.checkpoint_layers():
            energy = fast.model(b, graph).energy.sum()
        out, errors = {}, []

        def grad():
            try:
                out["f"] = -torch.autograd.grad(energy, pos)[0]
            except Exception as err:  # surfaced below with its message
                errors.append(err)
        if other_thread:
            t = threading.Thread(target=grad)
            t.start()
            t.join()
        else:
            grad()
        assert not errors, errors
        return out["f"]

    np.testing.assert_allclose(forces(True).numpy(), forces(False).numpy(), rtol=0, atol=1e-6)
