#!/usr/bin/env bash
# Idempotent setup for benchmarks/bench_core.py and bench_inference.py; run from anywhere.
#   .bench-venv/            this repo (editable) + the pinned peers
#   .bench-vendor/psm03/    py-stateful-map 0.3 (same import name as ours), used via PYTHONPATH
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

if [ ! -x .bench-venv/bin/python ]; then
    "$PYTHON" -m venv .bench-venv
fi
.bench-venv/bin/python -m pip install --quiet -e . -r benchmarks/requirements.txt

if [ ! -f .bench-vendor/psm03/py_stateful_map.py ]; then
    rm -rf .bench-vendor/psm03
    .bench-venv/bin/python -m pip install --quiet --no-deps --target .bench-vendor/psm03 \
        py-stateful-map==0.3
fi
echo "ready: .bench-venv/bin/python benchmarks/bench_core.py [--quick]"
echo "       .bench-venv/bin/python benchmarks/bench_inference.py [--quick] [--device cuda]"
