"""The production command under hostile load: slow clients, overload, deep images, SIGTERM.

Each test runs the real gunicorn (service/gunicorn.conf.py) on loopback, so the worker class,
the admission limit and the decode bound are what production runs. Durations are shorter than
the README's bars, the shapes the same; the README's figures come from these tests run with
CAPTIONER_HOSTILE_MODEL=runs/shapes/model.pt CAPTIONER_HOSTILE_SECONDS=30 (slow clients; 20 for
the overload test).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import ROOT, free_port, red_png, request, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.alone]  # each starts gunicorn and loads a model; latencies measured
SECONDS = float(os.environ.get("CAPTIONER_HOSTILE_SECONDS", "0"))  # 0: each test's own, short


class Gunicorn:
    """A gunicorn master serving ``model`` on a free loopback port, with extra environment."""

    def __init__(self, model: Path, log: Path, **env):
        self.port = free_port()
        self.log_path = log
        environment = {
            **os.environ,
            "CAPTIONER_BIND": f"127.0.0.1:{self.port}",
            "CAPTIONER_MODEL_PATH": str(model),
            "CAPTIONER_TORCH_THREADS": "1",
            **{key: str(value) for key, value in env.items()},
        }
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", "service/gunicorn.conf.py"],
                cwd=ROOT,
                env=environment,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_ready(self.port, self.process)

    def worker_pid(self) -> int:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        assert len(children) == 1, children
        return int(children[0])

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        output = self.log_path.read_text()
        assert "Traceback" not in output, output[-3000:]
        return output


def _model(trained_run) -> Path:
    return Path(os.environ.get("CAPTIONER_HOSTILE_MODEL") or trained_run / "model.pt").resolve()


@pytest.fixture
def serve(trained_run, tmp_path):
    """Starts a gunicorn with settings of the test's own; each is stopped after the test."""
    started = []

    def start(**env) -> Gunicorn:
        server = Gunicorn(_model(trained_run), tmp_path / f"gunicorn{len(started)}.log", **env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def _default_servers(trained_run, tmp_path_factory):
    started = []
    yield started, lambda: Gunicorn(_model(trained_run), tmp_path_factory.mktemp("gunicorn") / "gunicorn.log")
    for server in started:
        server.stop()


@pytest.fixture
def default_server(_default_servers):
    """A gunicorn with the production defaults, shared by the tests that need nothing else (each
    start is seconds of importing torch twice). One a test has stopped (SIGTERM) is replaced."""
    started, start = _default_servers
    if not started or started[-1].process.poll() is not None:
        started.append(start())
    server = started[-1]
    yield server
    output = server.log_path.read_text()
    assert "Traceback" not in output, output[-3000:]


def timed(port: int, method: str, path: str, body: bytes | None = None, headers=None):
    started = time.perf_counter()
    status, answer = request(port, method, path, body, headers)
    return status, answer, time.perf_counter() - started


def trickle(port: int, stop: threading.Event, outcome: list) -> None:
    """A client sending its request one byte a second, again whenever the server drops it."""
    message = b"POST /v1/captions HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 50\r\n\r\n"
    while not stop.is_set():
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            try:
                for byte in message:
                    if stop.is_set():
                        return
                    sock.sendall(bytes([byte]))
                    time.sleep(1.0)
                outcome.append("sent everything")
                return
            except OSError:
                outcome.append("dropped")


def test_slow_clients_cannot_starve_normal_ones(serve):
    server = serve(CAPTIONER_THREADS=4, CAPTIONER_READ_TIMEOUT_S=6)
    stop, outcomes = threading.Event(), []
    slow = [threading.Thread(target=trickle, args=(server.port, stop, outcomes)) for _ in range(40)]
    for thread in slow:
        thread.start()
    time.sleep(1.5)  # all 40 have begun: ten times the request threads
    seconds = []
    try:
        # By default until every slow client has been cut at the read deadline (6 s) and has
        # come back to hold the threads again for a while (about 10 s in all); 30 s at most.
        deadline = time.monotonic() + (SECONDS or 30)
        dropped_at = None
        while time.monotonic() < deadline:
            if not SECONDS and dropped_at is None and outcomes.count("dropped") >= len(slow):
                dropped_at = time.monotonic()
            if dropped_at is not None and time.monotonic() > dropped_at + 2.0:
                break
            status, body, took = timed(server.port, "GET", "/healthz")
            assert status == 200, body
            seconds.append(took)
            headers = {"Content-Type": "image/png"}
            status, body, took = timed(server.port, "POST", "/v1/captions?max_length=5", red_png(), headers)
            assert status == 200, body
            seconds.append(took)
            time.sleep(0.3)
    finally:
        stop.set()
        for thread in slow:
            thread.join()
    print(f"normal client: {len(seconds)} answers, slowest {max(seconds):.2f} s")
    assert max(seconds) < 3.0, seconds
    assert outcomes.count("dropped") >= 40 and "sent everything" not in outcomes, outcomes  # cut at the deadline
    server.stop()


def test_gunicorns_own_errors_and_chunked_overflow_are_json(serve):
    server = serve(CAPTIONER_MAX_CONTENT_LENGTH=20_000)
    for path, headers, status in (
        ("/" + "a" * 5000, {}, 414),
        ("/healthz", {"X-Big": "a" * 9000}, 431),
    ):
        got, body = request(server.port, "GET", path, headers=headers)
        assert got == status and json.loads(body)["error"]["code"], body
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400") and b"application/json" in answer, answer
    # A valid PNG and then more than the limit, chunked: refused whole, not cut and captioned.
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = iter([red_png(), b"\0" * 30_000])
    connection.request("POST", "/v1/captions", body=body, headers={"Content-Type": "image/png"}, encode_chunked=True)
    try:
        response = connection.getresponse()
        assert response.status == 413 and json.loads(response.read())["error"]["code"] == "too_large"
    finally:
        connection.close()
    server.stop()


def heavy_client(port: int, until: float, results: list) -> None:
    query = "/v1/captions?mode=beam&beam_size=8&num_captions=4"
    while time.monotonic() < until:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            started = time.perf_counter()
            connection.request("POST", query, red_png(), {"Content-Type": "image/png"})
            response = connection.getresponse()
            response.read()
            results.append((response.status, time.perf_counter() - started, response.getheader("Retry-After")))
            if response.status == 429:
                time.sleep(0.2)
        finally:
            connection.close()


def test_overload_is_answered_429_with_retry_after_and_health_stays_prompt(default_server):
    server = default_server  # the production defaults: 32 threads, 16 requests admitted
    results, health = [], []
    # 6 s: on 2 busy cores about a thousand 200s and more 429s, and a dozen health checks.
    until = time.monotonic() + (SECONDS or 6)
    with ThreadPoolExecutor(64) as pool:
        clients = [pool.submit(heavy_client, server.port, until, results) for _ in range(64)]
        while time.monotonic() < until:
            health.append(timed(server.port, "GET", "/healthz")[2])
            time.sleep(0.5)
        for client in clients:
            client.result()
    statuses = [status for status, _, _ in results]
    ok = sorted(seconds for status, seconds, _ in results if status == 200)
    p99 = ok[int(0.99 * (len(ok) - 1))]
    counts = f"{statuses.count(200)} x 200, {statuses.count(429)} x 429"
    print(f"{counts}, p99 of 200s {p99:.2f} s, slowest health {max(health):.2f} s")
    assert set(statuses) <= {200, 429}, set(statuses)
    assert statuses.count(429) > 0 and statuses.count(200) > 0
    assert all(retry and int(retry) >= 1 for status, _, retry in results if status == 429)
    assert p99 < 5.0 and max(health) < 3.0


def big_png(seed: int = 0) -> bytes:
    """A PNG of random pixels, about half a megabyte: more than gunicorn reads to reach the next
    request (64 KiB) and than the worker reads with a request's head (256 KiB)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def kept_alive_client(port: int, body: bytes, requests: int | None, until: float, outcomes: list) -> None:
    """Posts ``body`` on one kept-alive connection, ``requests`` times or until ``until``; records
    each answer as (status, Retry-After), each failure by its exception's name. http.client opens
    a new connection only after an answer that said "Connection: close"."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    sent = 0
    try:
        while (requests is None or sent < requests) and time.monotonic() < until:
            sent += 1
            try:
                connection.request("POST", "/v1/captions", body, {"Content-Type": "image/png"})
                response = connection.getresponse()
                response.read()
                outcomes.append((response.status, response.getheader("Retry-After")))
                if response.status == 429 and requests is None:
                    time.sleep(0.2)
            except OSError as error:  # a reset, a broken pipe, RemoteDisconnected
                outcomes.append(type(error).__name__)
                connection.close()
    finally:
        connection.close()


def test_a_429_to_a_large_body_on_a_kept_alive_connection_keeps_its_word(default_server):
    """Overloaded by 64 clients posting half a megabyte, the service answers 429 before reading a
    body: then it reads the body and throws it away, and the connection serves the next request as
    the answer said. Before, it closed the connection after 64 KiB: the client's next request (or
    the rest of its body) met a reset."""
    server = default_server  # the production defaults: 32 threads, 16 requests admitted
    body = big_png()
    assert len(body) > 400_000
    load, probes = [], []
    until = time.monotonic() + (SECONDS or 8)
    with ThreadPoolExecutor(64 + 8) as pool:
        clients = [pool.submit(kept_alive_client, server.port, body, None, until, load) for _ in range(64)]
        time.sleep(1.0)  # the load is on
        # 8 kept-alive connections, three requests each: each request answered.
        checks = [pool.submit(kept_alive_client, server.port, body, 3, until + 60, probes) for _ in range(8)]
        for future in clients + checks:
            future.result()
    statuses = [outcome[0] if isinstance(outcome, tuple) else outcome for outcome in load]
    print(f"load: {statuses.count(200)} x 200, {statuses.count(429)} x 429; probes: {probes}")
    assert len(probes) == 24 and all(isinstance(outcome, tuple) for outcome in probes), probes
    answers = load + probes
    assert {outcome for outcome in answers if not isinstance(outcome, tuple)} == set()  # no reset, ever
    assert {status for status, _ in answers} <= {200, 429}
    assert all(retry and int(retry) >= 1 for status, retry in answers if status == 429)
    assert statuses.count(429) > 0 and statuses.count(200) > 0  # it was overloaded, and served


def test_a_refused_body_sent_slowly_is_read_for_seconds_not_the_whole_read_deadline(default_server):
    """Reading a refused request's body holds a request thread: a client sending it slowly is cut
    after DRAIN_TIMEOUT_S (5 s), not at the request's read deadline (20 s)."""
    server = default_server
    head = b"POST /v1/captions?model=nobody HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000000\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + b"\0" * 300_000)  # past what the worker reads with the head
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 400") and b"Connection: close" not in answer, answer[:300]
        started = time.monotonic()
        sock.settimeout(0.5)
        closed = False
        while not closed and time.monotonic() - started < 15:
            try:
                sock.sendall(b"\0" * 1024)  # a kilobyte every half second
                closed = sock.recv(65536) == b""
            except TimeoutError:
                pass
            except OSError:  # reset
                closed = True
        took = time.monotonic() - started
    assert closed and 3 < took < 10, took


def rss_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(field)


def noise_png() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def deep_png() -> bytes:
    """A 16-bit grey 6000x6000 PNG of about 70 KB (inside the default 40 Mpixel limit)."""
    values = np.zeros((6000, 6000), dtype=np.uint16)
    values[::97, ::89] = 60000
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, "PNG")
    return buffer.getvalue()


def test_eight_deep_pngs_at_once_stay_within_a_gigabyte(default_server):
    server = default_server
    pid = server.worker_pid()
    assert request(server.port, "POST", "/v1/captions", red_png(), {"Content-Type": "image/png"})[0] == 200
    data = deep_png()
    assert len(data) < 200_000
    time.sleep(1)
    baseline = rss_mb(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak (VmHWM) to now
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: request(server.port, "POST", "/v1/captions", data), range(8)))
    assert all(status == 200 for status, _ in answers), answers[0]
    assert json.loads(answers[0][1])["image"] == {"width": 6000, "height": 6000, "format": "PNG"}
    peak, after = rss_mb(pid, "VmHWM"), rss_mb(pid, "VmRSS")
    print(f"worker RSS: baseline {baseline:.0f} MB, peak {peak:.0f} MB, after {after:.0f} MB")
    assert peak - baseline < 1024
    assert after - baseline < 300


def test_sigterm_answers_the_next_request_on_kept_alive_connections(default_server):
    server = default_server  # stopped here: a test after this one gets a new one
    idle = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    idle.request("GET", "/healthz")
    assert idle.getresponse().read()
    # A request in flight across the signal: its body arrives in two parts, 3 s apart.
    image = noise_png()
    assert len(image) > 1000
    head = f"POST /v1/captions HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(image)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as busy:
        busy.sendall(head.encode() + image[:100])
        time.sleep(0.3)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(3.0)  # longer than gunicorn's own 2 s linger for kept-alive connections
        busy.sendall(image[100:])
        answer = busy.makefile("rb").read()  # to the end: the server closes after answering
    assert answer.startswith(b"HTTP/1.1 200") and b"Connection: close" in answer, answer[:300]
    # The idle client's next request, sent just after: answered, not met by a closed socket.
    idle.request("GET", "/healthz")
    response = idle.getresponse()
    assert response.status == 200 and response.getheader("Connection") == "close"
    response.read()
    idle.close()
    assert server.process.wait(timeout=30) == 0
    server.stop()
