"""ESTCalculator basics: energy, forces and stress of a Cu(111) slab with O, then a batch.

Run with ``python examples/calculator_basics.py``. It uses the shipped default potential when one
ships; otherwise it says so and uses an UNTRAINED "tiny" EST model, whose numbers only show that
the pipeline runs and mean nothing physically.
"""

from __future__ import annotations

from ase import Atoms
from ase.build import add_adsorbate, fcc111

from est_calc.calculator import DefaultPotentialMissing, ESTCalculator
from est_calc.potential import Potential


def make_calculator() -> ESTCalculator:
    """The default potential, or an untrained tiny one (with a notice) when none ships."""
    try:
        return ESTCalculator(device="auto")
    except DefaultPotentialMissing as err:
        print(f"[{err}]")
        print("[using an UNTRAINED 'tiny' EST model: the numbers below are not physical]")
        return ESTCalculator(Potential.from_config("tiny", species=[1, 6, 8, 29]), device="auto")


def main() -> None:
    calc = make_calculator()
    print(f"device {calc.device}, dtype {calc.dtype}, cutoff {calc.cutoff_A} Å, "
          f"elements {calc.supported_elements()}")

    slab = fcc111("Cu", size=(2, 2, 3), vacuum=6.0)  # pbc (T, T, F), cell with vacuum along z
    add_adsorbate(slab, "O", 1.2, "fcc")
    slab.calc = calc
    print(f"energy  {slab.get_potential_energy():.6f} eV")
    print(f"max |F| {abs(slab.get_forces()).max():.6f} eV/Å")
    print(f"stress  {slab.get_stress().round(6)} eV/Å^3 (xx yy zz yz xz xy)")
    print(f"model passes so far: {calc.n_model_calls} (energy+forces, then stress)")

    co = Atoms("CO", positions=[[0.0, 0.0, 0.0], [0.0, 0.0, 1.15]])
    results = calc.calculate_batch([slab, co], ["energy", "forces", "stress"])
    for name, res in zip(["slab", "CO"], results):
        if "stress" in res:
            extra = f", stress {res['stress'].round(6)}"
        else:
            extra = " (no stress: pbc False)"
        print(f"batch {name}: E = {res['energy']:.6f} eV{extra}")
    print(f"model passes: {calc.n_model_calls} (the batch was one pass)")


if __name__ == "__main__":
    main()
