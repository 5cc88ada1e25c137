# Two-command quick start: `make demo`, then `make test`.
# torch is installed first and pinned so that pip never resolves a multi-GB CUDA build.
# For a CUDA machine: make demo TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.est_calc_installed

.PHONY: demo test test-fast bench install clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m est_calc.cli demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

# Each code runs with the OpenMP settings its users get: est_calc sets its short spin on import
# (est_calc/threads.py), MACE keeps torch's defaults.
bench: $(STAMP)
	bash benchmarks/setup_mace_env.sh || echo "MACE peer env unavailable: tables will say so"
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
