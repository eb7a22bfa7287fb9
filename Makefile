# pvlab: `make demo` runs the main job, `make test` the test suite.
# The virtual environment is made on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint bench firmware clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) tools/save-restore-demo

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check hypervisor guestos tests tools tools/save-restore-demo bench

bench: $(STAMP)
	$(PY) bench/vcpu.py
	$(PY) bench/saverestore.py

firmware:
	$(MAKE) -C firmware

clean:
	rm -rf $(VENV) build *.egg-info
