"""Tests of how the service is deployed: gunicorn with our config as a real process, and Docker files."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.helpers import ROOT, children, free_port, red_png, request, threads_cpus, wait_ready


def test_each_worker_takes_the_lowest_free_slot_for_its_model_processes_cpus():
    conf = runpy.run_path(str(ROOT / "service/gunicorn.conf.py"))
    server = SimpleNamespace(WORKERS={}, num_workers=2)
    for pid in (101, 102):
        server.WORKERS[pid] = worker = SimpleNamespace()
        conf["pre_fork"](server, worker)
    assert [w.captioner_slot for w in server.WORKERS.values()] == [0, 1]
    del server.WORKERS[101]  # it died: its replacement takes its CPUs
    conf["pre_fork"](server, replacement := SimpleNamespace())
    assert replacement.captioner_slot == 0
    server.WORKERS[103] = replacement
    conf["pre_fork"](server, extra := SimpleNamespace())  # beyond the workers (a reload): no CPUs of its own
    assert extra.captioner_slot == 2


# post_fork run as a gunicorn worker would, on 8 CPUs (pinning only recorded), in a process of its
# own: it sets torch's threads and glibc's malloc for the whole process.
_POST_FORK = """
import json, os, runpy, sys
from types import SimpleNamespace
import captioner.runtime
captioner.runtime.usable_cpus = lambda: 8.0
os.sched_getaffinity = lambda pid: set(range(8))
captioner.runtime.pin_process = lambda cpus: None
conf = runpy.run_path("service/gunicorn.conf.py")
server = SimpleNamespace(num_workers=int(sys.argv[1]), log=SimpleNamespace(info=lambda *args: None))
conf["post_fork"](server, SimpleNamespace(pid=1, captioner_slot=0))
print(json.dumps({key: os.environ.get(f"CAPTIONER_{key}") for key in ("MODEL_CPUS", "HEAVY_CNN_CPUS")}))
"""


@pytest.mark.slow  # a Python subprocess, per case
@pytest.mark.parametrize(
    "workers, threads, expected",
    [
        (1, None, {"MODEL_CPUS": "[1, 2, 3, 4, 5, 6, 7]", "HEAVY_CNN_CPUS": "[0]"}),
        (2, None, {"MODEL_CPUS": "[2, 3, 4]", "HEAVY_CNN_CPUS": None}),  # the HTTP CPUs serve both workers
        (1, "3", {"MODEL_CPUS": "[5, 6, 7]", "HEAVY_CNN_CPUS": None}),  # threads chosen by hand stay so
    ],
)
def test_a_heavy_cnn_may_take_the_http_side_cpus_with_one_worker_and_threads_left_to_the_service(workers, threads, expected):
    env = {key: value for key, value in os.environ.items() if not key.startswith("CAPTIONER_")}
    env |= {"CAPTIONER_TORCH_THREADS": threads} if threads else {}
    run = subprocess.run([sys.executable, "-c", _POST_FORK, str(workers)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == expected


@pytest.mark.slow  # a gunicorn master and worker
def test_gunicorn_loads_the_model_after_fork_serves_and_stops_on_sigterm(trained_run, tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "CAPTIONER_BIND": f"127.0.0.1:{port}",
        "CAPTIONER_MODEL_PATH": str(trained_run / "model.pt"),
        "CAPTIONER_THREADS": "4",
        "CAPTIONER_TORCH_THREADS": "1",
    }
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "service/gunicorn.conf.py"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_ready(port, process)
            # The master never imports torch: the model is loaded in the worker, after the fork.
            master_libraries = Path(f"/proc/{process.pid}/maps").read_text()
            assert "libtorch" not in master_libraries
            # The model process has a CPU of its own (its one torch thread's), the worker the rest.
            [worker] = children(process.pid)
            [model] = [pid for pid in children(worker) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
            cpus = sorted(os.sched_getaffinity(0))
            pinned = len(cpus) >= 2
            assert threads_cpus(model) == {(cpus[-1],) if pinned else tuple(cpus)}
            assert threads_cpus(worker) == {tuple(cpus[:-1]) if pinned else tuple(cpus)}

            headers = {"Content-Type": "image/png"}
            status, body = request(port, "POST", "/v1/captions?mode=beam&num_captions=2", red_png(), headers)
            assert status == 200, body
            answer = json.loads(body)
            assert answer["image"] == {"width": 24, "height": 16, "format": "PNG"}
            assert len(answer["captions"]) == 2
            status, body = request(port, "GET", "/metrics")
            assert b'captioner_batch_size_count{model="default"} 1.0' in body
            # The page's files go out by sendfile: whole, byte for byte.
            assert request(port, "GET", "/") == (200, (ROOT / "service/static/index.html").read_bytes())
            assert request(port, "GET", "/static/app.js") == (200, (ROOT / "service/static/app.js").read_bytes())

            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    output = log_path.read_text()
    assert "Traceback" not in output, output
    logged = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert any(e.get("path") == "/v1/captions" and e.get("status") == 200 for e in logged), output
    assert "Shutting down: Master" in output  # gunicorn's own word for a clean exit


# --- Docker -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_trains_into_a_volume_the_service_serves_from(compose):
    train, service = compose["services"]["train"], compose["services"]["service"]
    assert "models" in compose["volumes"]
    mounts = {name: dict(v.split(":")[:2] for v in spec["volumes"]) for name, spec in compose["services"].items()}
    assert mounts["train"]["models"] == mounts["service"]["models"] == "/models"  # one named volume, shared
    model_path = service["environment"]["CAPTIONER_MODEL_PATH"]
    assert model_path.startswith(mounts["service"]["models"] + "/")
    command = " ".join(train["command"])
    assert f"--out {Path(model_path).parent}" in command and f"test -f {model_path}" in command
    # The service starts only once training has finished well, and reports ready on /readyz.
    assert service["depends_on"]["train"]["condition"] == "service_completed_successfully"
    assert any("/readyz" in part for part in service["healthcheck"]["test"])
    assert "gunicorn.conf.py" in " ".join(service["command"])


@pytest.mark.slow  # runs docker-compose
def test_docker_compose_accepts_the_file():
    assert shutil.which("docker-compose"), "docker-compose is not installed (apt-get install docker-compose)"
    result = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_dockerfile_runs_gunicorn_with_a_readiness_healthcheck():
    dockerfile = (ROOT / "Dockerfile").read_text()
    healthcheck = next(line for line in dockerfile.splitlines() if "urlopen" in line)
    assert "/readyz" in healthcheck
    assert 'CMD ["gunicorn", "-c", "service/gunicorn.conf.py"]' in dockerfile
    assert "USER captioner" in dockerfile
    # .dockerignore drops everything, then lets in only what the image installs.
    patterns = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert patterns[0] == "**"
    let_in = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    assert let_in == {"pyproject.toml", "README.md", "scripts/setup.sh", "captioner", "service"}
