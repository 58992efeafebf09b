# Two entry points: `make run` (the main job) and `make test` (the test suite); `make docs` builds
# the documentation site (mkdocs.yml) into site/.
# Both create the virtual environment in .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-slow bench docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) examples/cd7_escalation.py --out out

# Lint and type-check first (about 10 s), then the default tests (slow ones: make test-slow, run by .ci/run).
test: $(STAMP)
	$(VENV)/bin/ruff check -q src models tests examples benchmarks calibration
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -n 2 -p no:cacheprovider --dist loadscope

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow -p no:cacheprovider

bench: $(STAMP)
	$(PY) benchmarks/simulate_throughput.py
	$(PY) benchmarks/ensemble_throughput.py
	$(PY) benchmarks/fit_stein.py

# Strict: any warning (a broken link, an unresolved API reference, a missing page) fails the build.
# Not -q: with --quiet mkdocs 1.6 drops warnings before strict mode counts them, so the build passes
# (mkdocs issue 4126). NO_MKDOCS_2_WARNING only silences mkdocs-material's end-of-life banner.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) out site
