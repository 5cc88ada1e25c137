"""MD and relaxations stop, loudly, on non-finite or runaway values (no silent wrong answers)."""

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import read

from md_recipes import SimulationUnstable, relax, relax_many, run_md


def _bulk(n=2, a=3.59):
    return bulk("Cu", "fcc", a=a, cubic=True) * (n, n, n)


def _log_rows(path):
    return [ln.split() for ln in open(path) if not ln.startswith("#")]


class NaNAfter(EMT):
    """EMT whose forces turn NaN from its ``n_good + 1``-th calculation on."""

    def __init__(self, n_good, **kwargs):
        super().__init__(**kwargs)
        self.n_good = n_good
        self.n_calls = 0

    def calculate(self, *args, **kwargs):
        super().calculate(*args, **kwargs)
        self.n_calls += 1
        if self.n_calls > self.n_good:
            self.results["forces"] = np.full_like(self.results["forces"], np.nan)


def test_huge_timestep_nve_stops_at_first_step_and_keeps_outputs(tmp_path):
    traj, log, ck = tmp_path / "md.traj", tmp_path / "md.log", tmp_path / "ck.npz"
    with pytest.raises(SimulationUnstable, match=r"step 1\b") as info:
        run_md(_bulk(), EMT(), ensemble="nve", timestep_fs=1e4, n_steps=20, log_every=1,
               trajectory=str(traj), logfile=str(log), restart=str(ck), progress=False)
    err = info.value
    assert err.step == 1 and "\n" not in str(err)
    assert isinstance(err, RuntimeError)
    # What was written before the failure is intact: step 0 only, in trajectory, log, checkpoint.
    assert len(read(traj, ":")) == 1
    assert [int(r[0]) for r in _log_rows(log)] == [0]
    assert any("step 1" in ln for ln in open(log) if ln.startswith("#"))
    assert not ck.exists() or not any(p.name.startswith("ck.npz.tmp") for p in tmp_path.iterdir())


def test_nve_energy_jump_is_named(tmp_path):
    # 50 fs for Cu: Etot moves by 0.13 eV/atom in the first step, the atoms blow up by step 3.
    with pytest.raises(SimulationUnstable, match=r"step 1\b.*total energy") as info:
        run_md(_bulk(), EMT(), ensemble="nve", timestep_fs=50.0, n_steps=10, progress=False,
               max_force_eV_per_A=None)
    assert info.value.quantity == "total energy"


@pytest.mark.parametrize("ensemble", ["nvt-langevin", "nvt-bussi", "nvt-nose-hoover", "npt"])
def test_thermostatted_runaway_temperature_is_named(ensemble):
    with pytest.raises(SimulationUnstable, match="temperature") as info:
        run_md(_bulk(), EMT(), ensemble=ensemble, temperature_K=300.0, timestep_fs=50.0,
               n_steps=20, progress=False, max_force_eV_per_A=None)
    assert info.value.quantity == "temperature" and 0 < info.value.step <= 20
    assert info.value.value > info.value.limit == pytest.approx(3000.0)


def test_low_target_temperature_has_a_floor():
    # 10 K target: the bound is 10 x 100 K, not 100 K; a sane run at 2 fs passes.
    res = run_md(_bulk(), EMT(), ensemble="nvt-bussi", temperature_K=10.0, timestep_fs=2.0,
                 n_steps=10, progress=False)
    assert res.n_steps == 10


def test_large_force_stops_md_at_step_0():
    atoms = _bulk()
    atoms.positions[1] = atoms.positions[0] + [1.2, 0.0, 0.0]  # 1.2 Å apart: ~130 eV/Å
    with pytest.raises(SimulationUnstable, match=r"step 0\b.*force") as info:
        run_md(atoms, EMT(), ensemble="nve", n_steps=5, progress=False)
    assert info.value.quantity == "max force" and info.value.value > 50.0
    # The bound can be loosened or disabled.
    run_md(atoms, EMT(), ensemble="nve", n_steps=1, timestep_fs=0.1, progress=False,
           max_force_eV_per_A=None, max_energy_drift_eV_per_atom=None)


def test_non_finite_forces_stop_md(tmp_path):
    with pytest.raises(SimulationUnstable, match=r"step 3\b.*non-finite forces"):
        run_md(_bulk(), NaNAfter(3), ensemble="nvt-langevin", n_steps=10, log_every=1,
               trajectory=str(tmp_path / "md.traj"), progress=False)
    assert len(read(tmp_path / "md.traj", ":")) == 3  # steps 0, 1, 2


def test_checks_can_be_disabled():
    # The old behaviour, on request: the run ends with an absurd temperature and no error.
    res = run_md(_bulk(), EMT(), ensemble="nve", timestep_fs=1e4, n_steps=3, progress=False,
                 max_force_eV_per_A=None, max_energy_drift_eV_per_atom=None)
    assert res.temperature[-1] > 1e6


@pytest.mark.parametrize("kw", [dict(max_force_eV_per_A=0.0),
                                dict(max_force_eV_per_A=float("nan")),
                                dict(max_temperature_ratio=-1.0),
                                dict(max_energy_drift_eV_per_atom=float("inf"))])
def test_bad_bounds_are_rejected(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        run_md(_bulk(), EMT(), n_steps=1, progress=False, **kw)


def _dimer(d=1.2):
    atoms = Atoms("Cu2", positions=[[0, 0, 0], [d, 0, 0]])
    atoms.center(vacuum=5.0)
    return atoms


def test_relax_stops_on_huge_force(tmp_path):
    """Relaxations allow poor starting guesses (default bound 500 eV/Å); two Cu atoms 0.5 Å
    apart (EMT: 1,021 eV/Å) are beyond it."""
    with pytest.raises(SimulationUnstable, match=r"step 0\b.*max force"):
        relax(_dimer(0.5), EMT(), trajectory=str(tmp_path / "r.traj"))
    with pytest.warns(RuntimeWarning, match="NOT converge"):
        res = relax(_dimer(0.5), EMT(), max_force_eV_per_A=None, max_steps=5)
    assert res.steps == 5


def test_relax_stops_on_non_finite_forces():
    with pytest.raises(SimulationUnstable, match=r"step 2\b.*non-finite forces"):
        relax(_rattled(), NaNAfter(2))


def _rattled():
    atoms = _bulk(1)
    atoms.rattle(0.1, seed=1)
    return atoms


def test_relax_many_stops_on_huge_force(batch_emt):
    with pytest.raises(SimulationUnstable, match=r"structure 1.*step 0\b.*max force"):
        relax_many([_rattled(), _dimer(0.5)], batch_emt)
    with pytest.warns(RuntimeWarning, match="NOT converge"):
        res = relax_many([_rattled(), _dimer(0.5)], batch_emt, max_force_eV_per_A=None,
                         max_steps=3)
    assert res[1].steps == 3


def test_relax_many_fallback_passes_the_bound():
    with pytest.raises(SimulationUnstable, match="max force"):
        relax_many([_dimer(0.5)], EMT())
