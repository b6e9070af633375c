#!/usr/bin/env bash
# Set up (idempotent) and run every check CI runs: lint, format, types, unit and end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# lm-evaluation-harness too, so the test of the lm-eval export loads it with the real harness.
.venv/bin/python -m pip --disable-pip-version-check -q install -c requirements/constraints.txt -e ".[dev,interop]"
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
