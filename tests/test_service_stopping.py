"""The service stops when asked: Ctrl-C and SIGTERM on ``captioner serve``, and a script that made
an app exits when it returns. Real processes and real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, children, free_port, red_png, request, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.alone]  # servers and interpreters of their own; how long a stop takes is timed


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not _gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_captioner_serve_stops_on_ctrl_c_and_sigterm_with_a_request_in_flight(trained_run, tmp_path, how):
    port = free_port()
    stderr_path = tmp_path / "stderr"
    with open(stderr_path, "wb") as stderr:
        # A session of its own: Ctrl-C in a terminal signals the whole foreground process group.
        server = subprocess.Popen(
            [sys.executable, "-m", "captioner", "serve", str(trained_run / "model.pt"), "--port", str(port)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
            # A terminal's foreground job: SIGINT at its default. Inherited as ignored (a background
            # job's, or a test before this one that ran model-process code here), it would stay
            # ignored in the server, as a program must leave it.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        wait_ready(port, server)
        processes = children(server.pid)  # the model process, and multiprocessing's resource tracker
        [model_pid] = [pid for pid in processes if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        answers = []
        query = "/v1/captions?mode=beam&beam_size=16&num_captions=10&max_length=100"
        in_flight = threading.Thread(
            target=lambda: answers.append(request(port, "POST", query, red_png(), {"Content-Type": "image/png"}))
        )
        in_flight.start()
        time.sleep(0.05)
        if how == "ctrl-c":
            os.killpg(server.pid, signal.SIGINT)
        else:
            server.send_signal(signal.SIGTERM)
        started = time.monotonic()
        status = server.wait(timeout=30)
        took = time.monotonic() - started
        in_flight.join(30)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    output = stderr_path.read_text()
    assert took < 5, f"it took {took:.1f} s to stop"  # the bar
    assert status in (0, 130), output
    assert "Traceback" not in output, output
    assert all(_wait_gone(pid, 5) for pid in processes), "a process of the server outlived it"
    # The request in flight was answered, or refused in JSON, or its connection closed: never hung.
    assert len(answers) <= 1
    if answers and answers[0][0] != 200:
        assert answers[0][0] == 503 and json.loads(answers[0][1])["error"]["code"] == "not_ready"


_SCRIPT = """
import sys, time
from service import create_app

def main():
    app = create_app({{"MODEL_PATH": {model!r}}})
    client = app.test_client()
    while client.get("/readyz").status_code != 200:
        time.sleep(0.05)
    response = client.post("/v1/captions", data={image!r}, content_type="image/png")
    assert response.status_code == 200, response.get_json()
    print(app.extensions["captioner"].model_process.pid, time.monotonic(), flush=True)

if __name__ == "__main__":  # the model process is spawned: it imports this file again
    main()
"""


def test_a_script_that_made_an_app_exits_when_it_returns(trained_run):
    script = _SCRIPT.format(model=str(trained_run / "model.pt"), image=red_png())
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        model_pid, returned = process.stdout.readline().split()
        status = process.wait(timeout=60)
        took = time.monotonic() - float(returned)
        stderr = process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()
    assert status == 0, stderr
    assert took < 5, f"the interpreter took {took:.1f} s to exit after the script returned"  # the bar
    assert "Traceback" not in stderr, stderr
    assert _gone(int(model_pid))
