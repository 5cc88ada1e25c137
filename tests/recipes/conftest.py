"""Shared fixtures of the md_recipes tests: EMT is the calculator (the recipes are model-free)."""

import pytest
from ase.calculators.emt import EMT


class BatchEMT(EMT):
    """EMT with a ``calculate_batch`` that loops internally (stands in for a batched model)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.n_batch_calls = 0

    def calculate_batch(self, atoms_list, properties=("energy", "forces")):
        self.n_batch_calls += 1
        out = []
        for atoms in atoms_list:
            a = atoms.copy()
            a.calc = EMT()
            out.append({"energy": a.get_potential_energy(),
                        "forces": a.get_forces(apply_constraint=False)})
        return out


@pytest.fixture
def batch_emt():
    return BatchEMT()
