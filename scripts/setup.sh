#!/usr/bin/env bash
# Makes .venv (once) and installs captioner into it, with the torch/torchvision this project is
# built and tested with. Usage: scripts/setup.sh [EXTRAS]   (EXTRAS: serve, dev, ray or several: "serve,dev")
# Run again with the same EXTRAS, pyproject.toml and this script unchanged, it does nothing (the
# install is editable: code changes need no reinstall); `rm .venv/.installed-*` forces it.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-serve}
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
stamp=".venv/.installed-${extras//,/-}"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import captioner" 2>/dev/null; then
  exit 0
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" torch==2.14.1 torchvision==0.29.1
"${pip[@]}" -e ".[$extras]"
echo "$want" > "$stamp"
