"""ESTCalculator refuses what it cannot do correctly, with a message that says why (issue 21):
cells too thin for the cutoff, unknown keyword arguments, devices that do not exist, and
out-of-memory errors turned into a MemoryError that names the system's size."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

import est_calc.calculator as calculator_module
from est_calc.calculator import ESTCalculator, resolve_device


@pytest.fixture
def pot(make_potential):
    return make_potential("est")


@pytest.fixture
def calc(pot):
    return ESTCalculator(pot, device="cpu", dtype="float64")


def _sliver(eps: float = 1e-4) -> Atoms:
    """One Cu atom in a cell with a3 = a1 + a2 + eps z (all heights about eps Å)."""
    a1, a2 = np.array([2.5, 0.0, 0.0]), np.array([0.0, 2.5, 0.0])
    return Atoms("Cu", positions=[[0, 0, 0]], cell=[a1, a2, a1 + a2 + [0, 0, eps]], pbc=True)


# ----------------------------------------------------------------------- thin cells
@pytest.mark.parametrize("skin", [0.0, 1.0])
def test_nearly_singular_cell_is_refused_at_once(pot, skin):
    calc = ESTCalculator(pot, device="cpu", dtype="float64", skin=skin)
    atoms = _sliver()
    atoms.calc = calc
    cutoff = f"cutoff {calc.cutoff_A:g} Å"
    start = time.perf_counter()
    with pytest.raises(ValueError, match=re.escape(cutoff)) as err:
        atoms.get_potential_energy()
    assert time.perf_counter() - start < 1.0
    height = float(re.search(r"height ([-+0-9.eE]+) Å", str(err.value)).group(1))
    assert height == pytest.approx(1e-4, rel=1e-2)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"height .*cutoff .*\(structure 1\)"):
        calc.calculate_batch([molecule("CO"), _sliver(1e-2)], ["energy"])
    assert time.perf_counter() - start < 1.0
    assert calc.n_model_calls == 0


# ----------------------------------------------------------------------- constructor arguments
def test_unknown_keyword_arguments_are_refused(pot):
    with pytest.raises(TypeError, match=r"dtyp\b.*dtype") as err:
        ESTCalculator(pot, device="cpu", dtyp="float64")
    assert isinstance(err.value, ValueError)  # also a ValueError, as the other option errors
    message = str(err.value)
    for valid in ("model", "device", "dtype", "neighbor_backend", "skin", "low_memory",
                  "label", "directory"):
        assert valid in message
    with pytest.raises(TypeError, match=r"lowmemory.*sikn|sikn.*lowmemory"):
        ESTCalculator(pot, device="cpu", lowmemory=True, sikn=1.0)


def test_ase_base_arguments_still_pass_through(pot, tmp_path):
    atoms = molecule("CO")
    calc = ESTCalculator(pot, device="cpu", dtype="float64", label="co",
                         directory=str(tmp_path), atoms=atoms)
    assert calc.directory == str(tmp_path) and calc.label.endswith("co")
    assert atoms.calc is calc
    assert np.isfinite(atoms.get_potential_energy())


def test_bad_device_names_the_valid_forms(pot):
    for bad in ("bogus", "gpu", "cuda:x"):
        with pytest.raises(ValueError, match=rf"{re.escape(repr(bad))}.*cpu.*cuda:N"):
            ESTCalculator(pot, device=bad)
    with pytest.raises(ValueError, match="bogus"):
        resolve_device("bogus")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_says_so(pot):
    for dev in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(ValueError, match="CUDA is not available"):
            ESTCalculator(pot, device=dev)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_index_beyond_the_devices_is_refused(pot):
    n = torch.cuda.device_count()
    with pytest.raises(ValueError, match=rf"cuda:{n}.*{n} CUDA device"):
        resolve_device(f"cuda:{n}")
    assert resolve_device("cuda") == torch.device("cuda")


# ----------------------------------------------------------------------- out of memory
_OOM_ERRORS = [
    getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)(
        "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total capacity)"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                 "memory: you tried to allocate 85899345920 bytes. Error code 12 (Cannot "
                 "allocate memory)"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:83] err == 0. DefaultCPUAllocator: not enough "
                 "memory: you tried to allocate 85899345920 bytes."),
]


def _raising(error):
    def model_call(*args, **kwargs):
        raise error
    return model_call


@pytest.mark.parametrize("error", _OOM_ERRORS, ids=["cuda", "cpu", "cpu-other-wording"])
def test_out_of_memory_becomes_a_clear_memory_error(calc, monkeypatch, error):
    monkeypatch.setattr(calculator_module, "energy_forces_stress", _raising(error))
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))  # 32 atoms
    atoms.calc = calc
    with pytest.raises(MemoryError) as err:
        atoms.get_forces()
    message = str(err.value)
    assert "32 atoms" in message and re.search(r"\b\d+ edges", message)
    assert "low_memory=True" in message and "float32" in message
    with pytest.raises(MemoryError, match=r"40 atoms .*\d+ edges.*fewer structures"):
        calc.calculate_batch([atoms, atoms[:8]], ["energy", "forces"])


def test_other_runtime_errors_are_not_hidden(calc, monkeypatch):
    error = RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)")
    monkeypatch.setattr(calculator_module, "energy_forces_stress", _raising(error))
    atoms = molecule("CO")
    atoms.calc = calc
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as err:
        atoms.get_potential_energy()
    assert err.value is error
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        calc.calculate_batch([atoms], ["energy"])


def test_close_contact_warns_naming_the_atoms_once_per_set_of_pairs(make_potential):
    """Two atoms 0.3 Å apart: a CloseContactWarning naming both (index and element) and the
    distance; the same pair on the next call does not warn again, a new pair does."""
    import warnings

    from ase import Atoms

    from est_calc.calculator import CloseContactWarning

    calc = ESTCalculator(make_potential(), device="cpu", dtype="float64")
    atoms = Atoms("CuOH", positions=[[0, 0, 0], [0, 0, 0.3], [3, 0, 0]])
    with pytest.warns(CloseContactWarning, match=r"atoms 0 \(Cu\) and 1 \(O\) at 0\.3 Å"):
        calc.get_potential_energy(atoms)
    atoms.positions[1, 2] = 0.31
    with warnings.catch_warnings():
        warnings.simplefilter("error", CloseContactWarning)
        calc.get_forces(atoms)
    atoms.positions[2] = [0, 0.4, 0]
    with pytest.warns(CloseContactWarning, match=r"atoms 0 \(Cu\) and 2 \(H\)"):
        calc.get_forces(atoms)
    atoms.positions[2] = [3, 0, 0]
    atoms.positions[1, 2] = 1.8
    with warnings.catch_warnings():
        warnings.simplefilter("error", CloseContactWarning)
        calc.get_forces(atoms)


def test_close_contact_in_a_batch_names_the_structure(make_potential):
    from ase import Atoms

    from est_calc.calculator import CloseContactWarning

    calc = ESTCalculator(make_potential(), device="cpu", dtype="float64")
    ok = Atoms("CuO", positions=[[0, 0, 0], [0, 0, 1.8]])
    bad = Atoms("CH", positions=[[0, 0, 0], [0.2, 0, 0]])
    with pytest.warns(CloseContactWarning, match=r"atoms 0 \(C\) and 1 \(H\) of structure 1"):
        calc.calculate_batch([ok, bad], ["energy"])


def test_coincident_atoms_are_refused(make_potential):
    from ase import Atoms

    calc = ESTCalculator(make_potential(), device="cpu", dtype="float64")
    atoms = Atoms("Cu2", positions=[[1, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match=r"atoms 0 \(Cu\) and 1 \(Cu\) at 0 Å: the atoms coincide"):
        calc.get_forces(atoms)


def test_legacy_norm_potential_warns_in_float32(make_potential):
    import copy

    from est_calc.calculator import LegacyNormWarning
    from est_calc.model import ESTModel, ModelConfig
    from est_calc.potential import Potential

    config = ModelConfig.preset("tiny", vector_norm="separate", zbl=False)
    legacy = Potential(ESTModel(config), config, species=[1, 6, 8, 29])
    with pytest.warns(LegacyNormWarning, match="float64"):
        ESTCalculator(legacy, device="cpu", dtype="float32")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", LegacyNormWarning)
        ESTCalculator(copy.deepcopy(legacy), device="cpu", dtype="float64")
        ESTCalculator(make_potential(), device="cpu", dtype="float32")
