#!/usr/bin/env bash
# Set up (idempotent) and run every check CI runs: lint, format, types, the docs build, unit and end-to-end
# tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Debian's Chromium and its driver, for the browser test of `rolevec monitor`'s page
# (tests/test_monitor_browser.py; selenium uses these two binaries and never downloads a browser). Only
# where apt exists and we are root; elsewhere install them yourself (with CI=true that test fails without).
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if command -v apt-get > /dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver
  else
    echo "note: /usr/bin/chromium or /usr/bin/chromedriver is missing and cannot be installed here (needs" \
      "apt-get and root); install Debian's chromium and chromium-driver, or tests/test_monitor_browser.py" \
      "is skipped (and fails with CI=true)" >&2
  fi
fi
# lm-evaluation-harness too, so the test of the lm-eval export loads it with the real harness, and the
# documentation tools, so a broken page, link or API reference fails here, and Ray, so the distributed
# executor's tests run on a local Ray instance.
.venv/bin/python -m pip --disable-pip-version-check -q install -c requirements/constraints.txt -e ".[dev,interop,docs,ray]"
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/mypy
# the architecture (pyproject.toml [tool.importlinter]): a wrong-way import between layers fails here
.venv/bin/lint-imports --no-cache
site_dir=$(mktemp -d)
trap 'rm -rf "$site_dir"' EXIT
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict -q -d "$site_dir"
.venv/bin/python -m pytest -q "$@"
