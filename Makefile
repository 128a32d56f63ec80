# Two entry points for a fresh Linux machine with Python 3.10+:
#   make demo   - create .venv on first use, install, run the multi-device inference demo
#   make test   - create .venv on first use, install, run the whole test suite
#                 (ruff, mypy --strict on src/, pytest)
# Versions are pinned by constraints/ci.txt so every run installs the same thing.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test pytest lint typecheck bench clean

$(STAMP): pyproject.toml constraints/ci.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints/ci.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/multi_gpu_inference.py

test: lint typecheck pytest

pytest: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/ruff format --check src

typecheck: $(STAMP)
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/bench_core.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
