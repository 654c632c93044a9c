PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo lint test bench clean

$(PY):
	@$(PYTHON) -c "import sys; assert sys.version_info >= (3, 11), \"arbax needs Python >= 3.11; set PYTHON=/path/to/python3.11\""
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

$(VENV)/.installed-demo: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[demo]'
	touch $@

demo: $(VENV)/.installed-demo
	$(PY) examples/demo.py

# ruff (style, likely bugs) over all Python code; pyright (basic mode) over the package.
# Settings are in pyproject.toml. pyright runs even when ruff fails, so one pass shows every finding;
# the pinned pyright is used as is (IGNORE_WARNINGS: no network check for a newer release).
lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check arbax tests examples benchmarks; ruff=$$?; \
	PYRIGHT_PYTHON_IGNORE_WARNINGS=1 $(VENV)/bin/pyright arbax && exit $$ruff

# Lint first, then the tests and every docstring example in arbax (--doctest-modules).
# tests/sharding_scripts are scripts that configure JAX when imported: not doctest material.
# Tests marked slow have a short version here; `make stress` runs them.
test: lint
	$(PY) -m pytest tests arbax --doctest-modules --ignore=tests/sharding_scripts -m 'not slow'

# The cache state machine (tests/test_cache_stateful.py) with 5,000 examples instead of 200.
# The data-parallel nnx.jit loop on 8 CPU devices for thousands of steps (tests/test_data_parallel.py).
.PHONY: stress
stress: $(VENV)/.installed-test
	ARBAX_HYPOTHESIS_PROFILE=stress ARBAX_CHECK_CACHE=1 $(PY) -m pytest tests/test_cache_stateful.py -k Machine
	$(PY) -m pytest -m slow tests/test_data_parallel.py

# make bench BENCH_ARGS=--quick; BENCH_PY=/path/to/python for a venv with the bench extra
bench: $(VENV)/.installed-test
	$(or $(BENCH_PY),$(PY)) benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV)
