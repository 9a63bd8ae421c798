#!/usr/bin/env bash
# Installs everything the tests need, then runs the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# ray: Ray Data for `caption --engine ray` (its tests start a 2-CPU local Ray; they skip without it).
bash scripts/setup.sh "serve,dev,ray"
# Headless Chromium for tests/test_browser.py; docker-compose to validate docker-compose.yml.
if ! command -v chromedriver >/dev/null || ! command -v docker-compose >/dev/null; then
  apt-get update -qq && apt-get install -y -qq chromium chromium-driver docker-compose >/dev/null
fi
# One torch thread per process: the suite runs servers and workers side by side on few cores,
# where competing thread pools slow small matrix products down by orders of magnitude.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Two workers: much of the suite waits (on servers starting, sockets, subprocesses) rather than
# computes; tests that time something are marked `alone` and run with nothing beside them.
.venv/bin/python -m pytest -n 2 --dist loadfile "$@"
