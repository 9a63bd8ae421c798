#!/usr/bin/env bash
# Installs everything the tests need, then runs the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "serve,dev"
.venv/bin/python -m pytest "$@"
