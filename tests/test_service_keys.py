"""Who may call the service: API keys, the metrics key, refusals counted and slowed (#35).

The app through Flask's test client here; real gunicorn and ``captioner serve`` at the end.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from captioner.errors import CaptionerError
from service import create_app, stop_app
from service.keys import REFUSALS_PER_WINDOW, ApiKeys, key_id, read_key_file

from tests.helpers import ROOT, error_of, free_port, metric, png, post_image, ready, request, wait_ready, wait_until

KEY = "alice-0123456789abcdef"
OTHER_KEY = "bob-fedcba9876543210"
METRICS_KEY = "scraper-00112233445566"


def key_file(folder: Path, *keys: str, mode: int = 0o600) -> Path:
    path = folder / "keys"
    path.write_text("# who may call the service\n" + "".join(f"{key}  # a client\n" for key in keys))
    path.chmod(mode)
    return path


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def locked(trained_run, tmp_path_factory):
    """An app with API keys and a metrics key, its model loaded."""
    keys = key_file(tmp_path_factory.mktemp("keys"), KEY)
    app = create_app({"MODEL_PATH": str(trained_run / "model.pt"), "API_KEYS_FILE": str(keys), "METRICS_KEY": METRICS_KEY})
    ready(app)
    yield app
    stop_app(app)


@pytest.fixture(scope="module")
def open_app(trained_run):
    app = create_app({"MODEL_PATH": str(trained_run / "model.pt")})
    ready(app)
    yield app
    stop_app(app)


def client_at(app, address: str):
    """A test client whose requests come from ``address`` (refusals are counted by address)."""
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = address
    return client


class UnreadBody(io.BytesIO):
    """A request body that records whether anyone read it."""

    read_at_all = False

    def read(self, *args):
        UnreadBody.read_at_all = True
        return super().read(*args)

    readinto = readline = read


# --- the key file -------------------------------------------------------------------------


def test_a_key_file_is_read_with_its_comments(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# team a\n\n{KEY} # alice\n   {OTHER_KEY}\n")
    path.chmod(0o600)
    assert read_key_file(str(path)) == (KEY.encode(), OTHER_KEY.encode())


@pytest.mark.parametrize(
    "content, mode, problem",
    [
        (None, 0o600, "does not exist"),
        (f"{KEY}\n", 0o644, "can be read by every user"),
        ("# only a comment\n\n", 0o600, "holds no keys"),
        ("", 0o600, "holds no keys"),
        (f"{KEY} and words\n", 0o600, "line 1 of the API key file"),
        ("short\n", 0o600, "too short"),
        ("folder", 0o700, "cannot be read"),
    ],
)
def test_a_key_file_that_is_not_right_refuses_the_app_in_one_line(trained_run, tmp_path, content, mode, problem):
    path = tmp_path / "keys"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    if path.exists():
        path.chmod(mode)
    with pytest.raises(CaptionerError, match=problem) as refused:
        create_app({"MODEL_PATH": str(trained_run / "model.pt"), "API_KEYS_FILE": str(path)})
    assert "\n" not in str(refused.value) and KEY not in str(refused.value)


def test_an_empty_key_setting_refuses_the_app(trained_run, monkeypatch):
    monkeypatch.setenv("CAPTIONER_API_KEYS_FILE", "")
    with pytest.raises(CaptionerError, match="API_KEYS_FILE"):
        create_app({"MODEL_PATH": str(trained_run / "model.pt")})


def test_a_metrics_key_of_digits_from_the_environment_stays_text(trained_run, monkeypatch):
    monkeypatch.setenv("CAPTIONER_METRICS_KEY", "1234567890123456e7")  # JSON would read a float
    app = create_app({"MODEL_PATH": str(trained_run / "model.pt")})
    try:
        assert app.test_client().get("/metrics", headers=bearer("1234567890123456e7")).status_code == 200
    finally:
        stop_app(app)


# --- requests -----------------------------------------------------------------------------


def test_no_key_is_401_before_the_body_is_read(locked):
    UnreadBody.read_at_all = False
    response = client_at(locked, "10.0.1.1").post(
        "/v1/captions", input_stream=UnreadBody(png()), content_type="image/png", content_length=len(png())
    )
    assert "API key" in error_of(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert not UnreadBody.read_at_all


def test_a_wrong_key_is_401_and_is_never_echoed(locked):
    wrong = "mallory-0000000000000000"
    response = post_image(client_at(locked, "10.0.1.2"), png(), headers=bearer(wrong))
    error_of(response, 401, "unauthorized")
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    assert wrong not in response.get_data(as_text=True)
    error_of(client_at(locked, "10.0.1.2").get("/v1/model", headers={"Authorization": f"Basic {KEY}"}), 401, "unauthorized")
    error_of(client_at(locked, "10.0.1.2").get("/v1/models"), 401, "unauthorized")  # the list of models too
    assert client_at(locked, "10.0.1.2").get("/v1/models", headers=bearer(KEY)).status_code == 200


@pytest.mark.slow  # the only user of a second app
def test_the_right_key_gets_the_same_caption_as_without_keys(locked, open_app, capsys):
    client = client_at(locked, "10.0.1.3")
    response = post_image(client, png(), "mode=beam&num_captions=2", headers=bearer(KEY))
    assert response.status_code == 200, response.get_json()
    expected = post_image(open_app.test_client(), png(), "mode=beam&num_captions=2").get_json()
    assert response.get_json()["captions"] == expected["captions"]
    assert client.get("/v1/model", headers=bearer(KEY)).status_code == 200
    # The log names the key by its short hash, and never carries the key.
    logged = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert {entry.get("key") for entry in logged if entry.get("path") == "/v1/captions"} >= {key_id(KEY.encode())}
    assert KEY not in json.dumps(logged)


def test_the_probes_need_no_key_and_metrics_needs_its_own(locked):
    client = client_at(locked, "10.0.1.4")
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    with client.get("/") as page:  # the page, which asks for a key itself
        assert page.status_code == 200
    error_of(client.get("/metrics"), 401, "unauthorized")
    error_of(client.get("/metrics", headers=bearer(KEY)), 401, "unauthorized")  # an API key is not the metrics key
    assert client.get("/metrics", headers=bearer(METRICS_KEY)).status_code == 200


def test_refusals_are_counted_and_an_address_that_keeps_guessing_is_slowed_alone(locked):
    scraper = client_at(locked, "10.0.2.1").get
    error_of(scraper("/metrics"), 401, "unauthorized")
    text = scraper("/metrics", headers=bearer(METRICS_KEY)).get_data(as_text=True)
    assert 'captioner_unauthorized_total{endpoint="/metrics",reason="missing"}' in text
    guesser, other = client_at(locked, "10.0.2.2"), client_at(locked, "10.0.2.3")
    for attempt in range(REFUSALS_PER_WINDOW):
        error_of(guesser.get("/v1/model", headers=bearer(f"guess-{attempt:016d}")), 401, "unauthorized")
    # Now even the right key waits: a guesser must not learn which guess was right.
    slowed = guesser.get("/v1/model", headers=bearer(KEY))
    error_of(slowed, 429, "too_many_refusals")
    assert 1 <= int(slowed.headers["Retry-After"]) <= 60
    assert other.get("/v1/model", headers=bearer(KEY)).status_code == 200
    error_of(other.get("/v1/model"), 401, "unauthorized")  # and is refused as ever, not slowed
    text = scraper("/metrics", headers=bearer(METRICS_KEY)).get_data(as_text=True)
    assert f'captioner_unauthorized_total{{endpoint="/v1/model",reason="wrong"}} {REFUSALS_PER_WINDOW}.0' in text


def test_keys_read_again_take_effect_and_a_file_gone_bad_keeps_the_keys_in_use(tmp_path, capsys):
    path = key_file(tmp_path, KEY)
    keys = ApiKeys.from_file(str(path))
    assert keys.identify(f"Bearer {OTHER_KEY}") == (None, "wrong")
    key_file(tmp_path, KEY, OTHER_KEY)
    keys.reload()
    assert keys.identify(f"Bearer {OTHER_KEY}") == (key_id(OTHER_KEY.encode()), "ok")
    path.chmod(0o644)
    keys.reload()
    assert keys.identify(f"bearer {OTHER_KEY}")[1] == "ok"
    assert "can be read by every user" in capsys.readouterr().err
    assert keys.identify(None) == (None, "missing") and keys.identify("Bearer ") == (None, "missing")


# --- real servers ---------------------------------------------------------------------------


def _gunicorn(port: int, keys: Path, log: Path, model: Path) -> subprocess.Popen:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_")},
        "CAPTIONER_BIND": f"127.0.0.1:{port}",
        "CAPTIONER_MODEL_PATH": str(model),
        "CAPTIONER_THREADS": "8",
        "CAPTIONER_TORCH_THREADS": "1",
        "CAPTIONER_API_KEYS_FILE": str(keys),
    }
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "service/gunicorn.conf.py"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )


def _head_only(port: int, headers: str) -> bytes:
    """Send a caption request's head announcing a 1 MB body, none of it; return the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(f"POST /v1/captions HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000000\r\n{headers}\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


@pytest.mark.slow  # a gunicorn master and worker
def test_gunicorn_with_keys_refuses_without_the_key_and_reads_new_keys_on_sighup_dropping_nothing(trained_run, tmp_path):
    keys, log = key_file(tmp_path, KEY), tmp_path / "gunicorn.log"
    port = free_port()
    server = _gunicorn(port, keys, log, trained_run / "model.pt")
    image, headers = png(), {"Content-Type": "image/png"}
    try:
        wait_ready(port, server)  # /readyz needs no key
        assert request(port, "GET", "/healthz")[0] == 200
        # No key: 401 on the headers alone, the announced megabyte never sent.
        answer = _head_only(port, "")
        assert answer.startswith(b"HTTP/1.1 401") and b"WWW-Authenticate: Bearer" in answer, answer
        assert request(port, "POST", "/v1/captions", image, {**headers, **bearer(OTHER_KEY)})[0] == 401
        status, body = request(port, "POST", "/v1/captions", image, {**headers, **bearer(KEY)})
        assert status == 200, body

        # A key added and SIGHUP sent while a client keeps asking: nothing fails, the new key works.
        statuses, stop = [], threading.Event()

        def keep_asking():
            while not stop.is_set():
                try:
                    statuses.append(request(port, "POST", "/v1/captions", image, {**headers, **bearer(KEY)})[0])
                except OSError as error:
                    statuses.append(repr(error))

        worker = threading.Thread(target=keep_asking)
        worker.start()
        try:
            wait_until(lambda: len(statuses) >= 5, timeout=30)
            key_file(tmp_path, KEY, OTHER_KEY)
            server.send_signal(signal.SIGHUP)
            wait_until(lambda: request(port, "GET", "/v1/model", None, bearer(OTHER_KEY))[0] == 200, timeout=30)
            count = len(statuses)
            wait_until(lambda: len(statuses) >= count + 5, timeout=30)
        finally:
            stop.set()
            worker.join(60)
        assert set(statuses) == {200}, [s for s in statuses if s != 200]
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    output = log.read_text()
    assert "Traceback" not in output, output
    assert KEY not in output and OTHER_KEY not in output
    logged = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert any(entry.get("status") == 401 and entry.get("key") == "missing" for entry in logged)
    assert any(entry.get("message") == "API keys read again" for entry in logged)


@pytest.mark.slow  # gunicorn and captioner serve, as processes
@pytest.mark.parametrize("content, mode, problem", [(f"{KEY}\n", 0o644, "can be read by every user"), ("", 0o600, "holds no keys")])
def test_a_bad_key_file_stops_gunicorn_and_captioner_serve_in_one_line(trained_run, tmp_path, content, mode, problem):
    keys = tmp_path / "keys"
    keys.write_text(content)
    keys.chmod(mode)
    log = tmp_path / "gunicorn.log"
    server = _gunicorn(free_port(), keys, log, trained_run / "model.pt")
    try:
        assert server.wait(timeout=60) != 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    lines = log.read_text().splitlines()
    assert [line for line in lines if problem in line] and len(lines) <= 3, lines  # gunicorn's start line, ours
    assert "Traceback" not in log.read_text()
    serve = subprocess.run(
        [sys.executable, "-m", "captioner", "serve", str(trained_run / "model.pt"), "--port", str(free_port()), "--api-keys-file", str(keys)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert serve.returncode == 1
    assert serve.stderr.strip().count("\n") == 0 and problem in serve.stderr, serve.stderr
