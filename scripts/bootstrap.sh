#!/usr/bin/env bash
# Set up .venv/ at the repo root with bindsearch and its test tools. Idempotent and quick when
# nothing changed. Uses pip (not uv): pip honours the machine's configured find-links, which
# offer the CPU torch wheel; the pinned torch==2.13.0 never pulls CUDA packages there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.bindsearch-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[cpu,dev]"
  touch "$stamp"
fi
