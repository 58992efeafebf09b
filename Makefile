# Two entry points: `make run` (the main job) and `make test` (the test suite).
# Both create the virtual environment in .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-slow bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) examples/cd7_escalation.py --out out

test: $(STAMP)
	$(PY) -m pytest -q -n 2 -p no:cacheprovider

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow -p no:cacheprovider

bench: $(STAMP)
	$(PY) benchmarks/simulate_throughput.py
	$(PY) benchmarks/fit_stein.py

clean:
	rm -rf $(VENV) out
