PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean

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

test: $(VENV)/.installed-test
	$(PY) -m pytest tests

bench: $(VENV)/.installed-test
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/state_api.py
	$(PY) benchmarks/pytree_flatten.py

clean:
	rm -rf $(VENV)
