#!/usr/bin/env bash
# Makes .venv (once) and installs captioner into it, with the torch/torchvision this project is
# built and tested with. Usage: scripts/setup.sh [EXTRAS]   (EXTRAS: serve, dev, ray or several: "serve,dev")
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-serve}
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" torch==2.14.1 torchvision==0.29.1
"${pip[@]}" -e ".[$extras]"
