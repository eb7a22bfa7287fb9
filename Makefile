# pvlab: `make demo` runs the main job, `make test` the test suite, `make check`
# the fast lane of the edit loop. `make help` says more.
# The virtual environment is made on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pytest-xdist workers: one per core; JOBS=0 runs the tests in this process
JOBS ?= auto
# worksteal: an idle worker takes tests queued for a busy one, so the long
# save/restore and balloon tests do not leave a core idle at the end
PYTEST := $(PY) -m pytest -n $(JOBS) --dist worksteal

.PHONY: help venv demo test check lint bench firmware clean grade

help:
	@echo "make demo      the save/restore demo"
	@echo "make test      the whole test suite, slow tests included, on every core"
	@echo "make check     the edit loop's fast lane: ruff, then the tests not marked slow"
	@echo "make grade LAB=NAME  grade your work on a teaching lab (pvlab lab list names them)"
	@echo "make lint      ruff only"
	@echo "make bench     the benchmarks' figures"
	@echo "make firmware  rebuild the x86 firmware (needs GNU binutils)"
	@echo "make venv      only make the virtual environment (.venv)"
	@echo "make clean     remove the virtual environment and build output"
	@echo "JOBS=N sets the number of test processes (default: one per core; 0: this one only)."
	@echo "PVLAB_TEST_SEED=N repeats a run's extra seed (the test report's header prints it)."

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pvlab demo

test: $(STAMP)
	$(PYTEST)

grade: $(STAMP)
	@test -n "$(LAB)" || { echo "make grade LAB=NAME: name a lab (.venv/bin/pvlab lab list)"; exit 2; }
	$(VENV)/bin/pvlab lab grade $(LAB)

check: lint
	$(PYTEST) -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check hypervisor guestos labs tests tools tools/save-restore-demo bench

bench: $(STAMP)
	$(PY) bench/vcpu.py
	$(PY) bench/saverestore.py
	$(PY) bench/receive.py
	$(PY) bench/remus.py
	$(PY) bench/schedule.py
	$(PY) bench/debugger.py
	$(PY) bench/daemon.py
	$(PY) bench/blk.py
	$(PY) bench/migrate.py
	$(PY) bench/postcopy.py
	$(PY) bench/console.py
	$(PY) bench/net.py

firmware:
	$(MAKE) -C firmware

clean:
	rm -rf $(VENV) build *.egg-info
