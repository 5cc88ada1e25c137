"""MD recipe with EMT: conservation, thermostat and barostat targets, exact restarts, outputs."""

import warnings

import numpy as np
import pytest
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc111
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.io import read

from md_recipes import ENSEMBLES, read_checkpoint, run_md


def _bulk(n=2, a=3.59):
    return bulk("Cu", "fcc", a=a, cubic=True) * (n, n, n)


def test_bad_ensemble_lists_choices():
    with pytest.raises(ValueError, match="nve.*nvt-langevin.*npt"):
        run_md(_bulk(), EMT(), ensemble="nvt-berendsen", n_steps=1, progress=False)


@pytest.mark.parametrize("ensemble", ENSEMBLES)
def test_restart_reproduces_uninterrupted_run(tmp_path, ensemble):
    kw = dict(ensemble=ensemble, temperature_K=400.0, timestep_fs=2.0, seed=7, log_every=5,
              progress=False)
    with warnings.catch_warnings():
        # No deprecated ASE path may be taken (MaxwellBoltzmannDistribution, fixcm=True, ...).
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        full = run_md(_bulk(), EMT(), n_steps=20, **kw)
        ck = str(tmp_path / "md.npz")
        first = run_md(_bulk(), EMT(), n_steps=10, restart=ck, **kw)
        header, arrays = read_checkpoint(ck)
        assert header["step"] == 10 and header["ensemble"] == ensemble
        rest = run_md(_bulk(), EMT(), n_steps=20, restart=ck, **kw)
    assert first.n_steps == 10 and rest.step[0] == 15 and rest.step[-1] == 20
    np.testing.assert_allclose(rest.atoms.positions, full.atoms.positions, rtol=0, atol=1e-10)
    np.testing.assert_allclose(rest.atoms.get_momenta(), full.atoms.get_momenta(), atol=1e-10)
    np.testing.assert_allclose(rest.atoms.cell[:], full.atoms.cell[:], atol=1e-10)
    # The run actually moved (a restart that froze the atoms would trivially "agree").
    assert np.abs(full.atoms.positions - _bulk().positions).max() > 1e-3


@pytest.mark.slow
def test_nve_conserves_energy_slab_with_adsorbate(tmp_path):
    slab = fcc111("Cu", (4, 4, 6), a=3.59, vacuum=8.0)  # 96 Cu + O = 97 atoms
    add_adsorbate(slab, "O", 1.2, "fcc")
    slab.set_constraint(FixAtoms(mask=slab.get_tags() == 6))
    dt, n = 2.0, 100
    res = run_md(slab, EMT(), ensemble="nve", temperature_K=300.0, timestep_fs=dt, n_steps=n,
                 log_every=5, progress=False, logfile=str(tmp_path / "md.log"),
                 trajectory=str(tmp_path / "md.traj"), plot=str(tmp_path / "md.png"))
    drift = np.polyfit(res.time_fs / 1000.0, res.etot, 1)[0]  # eV / ps
    spread = np.ptp(res.etot)
    print(f"NVE drift {drift / len(slab) * 1e3:.3f} meV/atom/ps, Etot spread {spread * 1e3:.2f} meV,"
          f" Ekin spread {np.ptp(res.ekin) * 1e3:.1f} meV")
    assert spread < 0.05 * np.ptp(res.ekin)  # energy flows between Ekin and Epot, Etot stays
    assert abs(drift) / len(slab) < 1e-3  # < 1 meV/atom/ps
    assert res.pressure is None  # a slab has no pressure
    lines = [ln for ln in open(tmp_path / "md.log") if not ln.startswith("#")]
    assert len(lines) == n // 5 + 1
    from ase.io import read

    assert len(read(tmp_path / "md.traj", ":")) == n // 5 + 1
    with open(tmp_path / "md.png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_langevin_reaches_target_temperature():
    target = 500.0
    res = run_md(_bulk(3), EMT(), ensemble="nvt-langevin", temperature_K=target,
                 timestep_fs=2.0, n_steps=800, log_every=4, friction_per_fs=0.02, seed=3,
                 progress=False)
    second = res.temperature[len(res.temperature) // 2:]
    print(f"Langevin <T> over the second half: {second.mean():.1f} K (target {target} K)")
    assert abs(second.mean() - target) < 0.05 * target


@pytest.mark.slow
def test_npt_holds_target_pressure():
    # Start 1.5% expanded: the barostat must shrink the cell to bring P back to the target.
    atoms = _bulk(3, a=3.59 * 1.015)
    res = run_md(atoms, EMT(), ensemble="npt", temperature_K=300.0, pressure_GPa=0.0,
                 timestep_fs=2.0, n_steps=300, log_every=3, taup_fs=150.0, progress=False)
    second = res.pressure[len(res.pressure) // 2:]
    print(f"NPT <P> over the second half: {second.mean():.3f} GPa (start {res.pressure[0]:.2f})")
    assert res.pressure[0] < -2.0  # the expanded start is under tension
    assert abs(second.mean()) < 0.5
    assert res.atoms.get_volume() < atoms.get_volume()


def test_checkpoint_is_not_pickled(tmp_path):
    ck = tmp_path / "ck.npz"
    run_md(_bulk(), EMT(), ensemble="nvt-bussi", n_steps=3, restart=str(ck), progress=False)
    with np.load(ck, allow_pickle=False) as data:  # would raise on any object array
        assert "positions" in data.files
    assert not any(p.name.startswith("ck.npz.tmp") for p in tmp_path.iterdir())


def test_restart_rejects_other_structure(tmp_path):
    ck = str(tmp_path / "ck.npz")
    run_md(_bulk(), EMT(), ensemble="nve", n_steps=2, restart=ck, progress=False)
    with pytest.raises(ValueError, match="different structure"):
        run_md(Atoms("Cu2", positions=[[0, 0, 0], [2.5, 0, 0]]), EMT(), ensemble="nve",
               n_steps=4, restart=ck, progress=False)
    with pytest.raises(ValueError, match="ensemble"):
        run_md(_bulk(), EMT(), ensemble="nvt-langevin", n_steps=4, restart=ck, progress=False)
    with pytest.warns(RuntimeWarning, match="changed settings"):
        run_md(_bulk(), EMT(), ensemble="nve", n_steps=4, restart=ck, timestep_fs=0.5,
               progress=False)


def test_initial_velocities_are_seeded_and_stationary():
    a = run_md(_bulk(), EMT(), ensemble="nve", n_steps=0, seed=11, progress=False).atoms
    b = run_md(_bulk(), EMT(), ensemble="nve", n_steps=0, seed=11, progress=False).atoms
    c = run_md(_bulk(), EMT(), ensemble="nve", n_steps=0, seed=12, progress=False).atoms
    np.testing.assert_array_equal(a.get_momenta(), b.get_momenta())
    assert np.abs(a.get_momenta() - c.get_momenta()).max() > 1e-3
    assert np.abs(a.get_momenta().sum(axis=0)).max() < 1e-10


@pytest.mark.parametrize("ensemble", ["nvt-langevin", "nvt-bussi", "nvt-nose-hoover"])
def test_thermostats_keep_fixed_atoms_fixed(ensemble):
    slab = fcc111("Cu", (2, 2, 3), a=3.59, vacuum=6.0)
    slab.set_constraint(FixAtoms(mask=slab.get_tags() == 3))
    fixed = slab.constraints[0].get_indices()
    res = run_md(slab, EMT(), ensemble=ensemble, temperature_K=600.0, timestep_fs=2.0,
                 n_steps=10, progress=False)
    np.testing.assert_array_equal(res.atoms.positions[fixed], slab.positions[fixed])
    assert np.abs(res.atoms.positions - slab.positions).max() > 1e-3
    assert len(res.atoms.constraints) == 1  # no helper constraint leaks into the result


def test_npt_refuses_constraints():
    slab = fcc111("Cu", (2, 2, 3), a=3.59, vacuum=6.0)
    slab.set_constraint(FixAtoms(indices=[0]))
    with pytest.raises(ValueError, match="constraints"):
        run_md(slab, EMT(), ensemble="npt", n_steps=1, progress=False)


def test_rerunning_a_finished_run_writes_nothing(tmp_path):
    traj, log, ck = tmp_path / "md.traj", tmp_path / "md.log", tmp_path / "ck.npz"
    kw = dict(ensemble="nvt-bussi", n_steps=6, log_every=3, trajectory=str(traj),
              logfile=str(log), restart=str(ck), progress=False)
    first = run_md(_bulk(), EMT(), **kw)
    before = {p: p.read_bytes() for p in (traj, log, ck)}
    again = run_md(_bulk(), EMT(), **kw)
    after = {p: p.read_bytes() for p in (traj, log, ck)}
    assert after == before  # no duplicate frame, no duplicate log row, checkpoint untouched
    assert len(read(traj, ":")) == 3
    assert again.start_step == again.n_steps == 6 and first.start_step == 0
    assert list(again.step) == [6]
    np.testing.assert_allclose(again.atoms.positions, first.atoms.positions, atol=1e-12)
    np.testing.assert_allclose(again.epot, first.epot[-1:], atol=1e-10)


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_corrupt_restart_file_is_named(tmp_path, damage):
    ck = tmp_path / "ck.npz"
    run_md(_bulk(), EMT(), ensemble="nve", n_steps=2, restart=str(ck), progress=False)
    data = ck.read_bytes()
    ck.write_bytes({"empty": b"", "truncated": data[: len(data) // 2],
                    "garbage": b"not a checkpoint"}[damage])
    with pytest.raises(ValueError, match=r"ck\.npz.*(unreadable|corrupt)"):
        run_md(_bulk(), EMT(), ensemble="nve", n_steps=4, restart=str(ck), progress=False)
    with pytest.raises(ValueError, match=r"ck\.npz.*(unreadable|corrupt)"):
        read_checkpoint(str(ck))


def test_restart_that_is_a_directory_is_named(tmp_path):
    with pytest.raises(ValueError, match="ck.npz"):
        (tmp_path / "ck.npz").mkdir()
        run_md(_bulk(), EMT(), ensemble="nve", n_steps=2, restart=str(tmp_path / "ck.npz"),
               progress=False)


@pytest.mark.parametrize("kw, name", [
    (dict(temperature_K=float("nan")), "temperature_K"),
    (dict(temperature_K=float("inf")), "temperature_K"),
    (dict(temperature_K=-1.0), "temperature_K"),
    (dict(timestep_fs=float("nan")), "timestep_fs"),
    (dict(timestep_fs=float("inf")), "timestep_fs"),
    (dict(timestep_fs=0.0), "timestep_fs"),
    (dict(pressure_GPa=float("nan"), ensemble="npt"), "pressure_GPa"),
    (dict(friction_per_fs=float("nan"), ensemble="nvt-langevin"), "friction_per_fs"),
    (dict(taut_fs=-5.0, ensemble="nvt-bussi"), "taut_fs"),
    (dict(n_steps=2.5), "n_steps"),
    (dict(n_steps=-1), "n_steps"),
])
def test_bad_arguments_are_named_before_any_work(kw, name):
    calls = []

    class Counting(EMT):
        def calculate(self, *args, **kwargs):
            calls.append(1)
            super().calculate(*args, **kwargs)

    kw = dict(dict(n_steps=2), **kw)
    with pytest.raises(ValueError, match=name):
        run_md(_bulk(), Counting(), progress=False, **kw)
    assert not calls


def test_output_folders_are_checked_before_the_run(tmp_path):
    calls = []

    class Counting(EMT):
        def calculate(self, *args, **kwargs):
            calls.append(1)
            super().calculate(*args, **kwargs)

    for key in ("plot", "trajectory", "logfile", "restart"):
        with pytest.raises(ValueError, match=f"{key}.*missing"):
            run_md(_bulk(), Counting(), n_steps=2, progress=False,
                   **{key: str(tmp_path / "missing" / "out")})
    assert not calls


def test_checkpoint_mode_follows_umask_and_failed_writes_leave_nothing(tmp_path, monkeypatch):
    import os

    old = os.umask(0o022)
    try:
        ck = tmp_path / "ck.npz"
        run_md(_bulk(), EMT(), ensemble="nve", n_steps=2, restart=str(ck), progress=False)
        assert ck.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)
    good = ck.read_bytes()

    def broken_savez(fh, **arrays):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        run_md(_bulk(), EMT(), ensemble="nve", n_steps=4, restart=str(ck), progress=False)
    assert ck.read_bytes() == good  # the last good checkpoint survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz"]  # no temp file left


def test_plot_is_written_atomically_with_umask_mode(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        run_md(_bulk(), EMT(), n_steps=2, progress=False, plot=str(tmp_path / "md.png"))
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["md.png"]
    assert (tmp_path / "md.png").stat().st_mode & 0o777 == 0o644
