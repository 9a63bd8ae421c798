"""Two measurements of the service under gunicorn (service/gunicorn.conf.py), on loopback:

``overload``: 64 clients post a ~0.5 MB PNG on kept-alive connections (after a 429 each waits
0.2 s) and 8 more kept-alive connections send three requests each, one second into the load;
counts every answer by status (a 429 without Retry-After apart) and every failure by the name of
its exception (a reset, a broken pipe, RemoteDisconnected), and the 200s' rate and p50/p99.

``swap``: clients caption without pause while the model file is replaced and gunicorn's master
gets SIGHUP (``--hup-at`` seconds in); counts answers by status and error code, and by the
version of the model that gave them, and the slowest answer.

    .venv/bin/python scripts/bench_overload_swap.py overload --model runs/shapes/model.pt --seconds 15
    .venv/bin/python scripts/bench_overload_swap.py swap --model runs/shapes/model.pt --new other/model.pt

``--tree`` serves another checkout of the project with this interpreter (``git archive COMMIT |
tar -x -C /tmp/before``: the service as it was). Every loop ends after ``--seconds``.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def random_png(side: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(tree: Path, port: int, settings: dict, log: Path) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CAPTIONER_")}
    env |= {"CAPTIONER_BIND": f"127.0.0.1:{port}", "CAPTIONER_TORCH_THREADS": "1", **settings}
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "service/gunicorn.conf.py"], cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"gunicorn exited; see {log}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/readyz")
            if connection.getresponse().status == 200:
                return server
        except OSError:
            pass
        time.sleep(0.2)
    server.kill()
    raise SystemExit("gunicorn was not ready in time")


def stop(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def poster(port: int, body: bytes, headers: dict, until: float, requests: int | None, record) -> None:
    """Posts ``body`` on one kept-alive connection (http.client opens another only after an
    answer that said "Connection: close"), ``requests`` times or until ``until``."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    sent = 0
    while (requests is None or sent < requests) and time.monotonic() < until:
        sent += 1
        started = time.perf_counter()
        try:
            connection.request("POST", "/v1/captions", body, headers)
            response = connection.getresponse()
            answer = response.read()
            record(response, answer, time.perf_counter() - started)
            if response.status == 429 and requests is None:
                time.sleep(0.2)
        except OSError as error:
            record(None, type(error).__name__, time.perf_counter() - started)
            connection.close()
    connection.close()


def overload(args) -> dict:
    port, body = free_port(), random_png(400)
    server = start(args.tree, port, {"CAPTIONER_MODEL_PATH": str(args.model)}, args.log)
    counts = {"load": collections.Counter(), "probes": collections.Counter()}
    ok, lock = [], threading.Lock()

    def recorder(group):
        def record(response, answer, seconds):
            if response is None:
                key = answer
            elif response.status == 429 and not response.getheader("Retry-After"):
                key = "429 without Retry-After"
            else:
                key = response.status
            with lock:
                counts[group][key] += 1
                if group == "load" and key == 200:
                    ok.append(seconds)

        return record

    headers = {"Content-Type": "image/png"}
    try:
        until = time.monotonic() + args.seconds
        threads = [threading.Thread(target=poster, args=(port, body, headers, until, None, recorder("load"))) for _ in range(64)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        probes = [threading.Thread(target=poster, args=(port, body, headers, until + 60, 3, recorder("probes"))) for _ in range(8)]
        for thread in probes:
            thread.start()
        for thread in threads + probes:
            thread.join()
    finally:
        stop(server)
    ok.sort()
    quantile = lambda q: round(ok[int(q * (len(ok) - 1))], 3) if ok else None  # noqa: E731
    return {
        "body_bytes": len(body),
        "load": dict(counts["load"]),
        "probes": dict(counts["probes"]),
        "load_200_per_s": round(counts["load"][200] / args.seconds, 1),
        "load_200_p50_s": quantile(0.5),
        "load_200_p99_s": quantile(0.99),
    }


def swap(args) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="captioner-swap-"))
    served = folder / "model.pt"
    shutil.copy(args.model, served)
    port = free_port()
    server = start(args.tree, port, {"CAPTIONER_MODEL_PATH": str(served), "CAPTIONER_THREADS": "8"}, args.log)
    counts, versions, slowest, lock = collections.Counter(), collections.Counter(), [0.0], threading.Lock()

    def record(response, answer, seconds):
        with lock:
            slowest[0] = max(slowest[0], seconds)
            if response is None:
                counts[answer] += 1
                return
            body = json.loads(answer)
            if response.status == 200:
                counts[200] += 1
                versions[body["model"]["version"]] += 1
            else:
                counts[f"{response.status} {body['error']['code']}"] += 1

    try:
        started = time.monotonic()
        until = started + args.seconds
        headers = {"Content-Type": "image/png"}
        threads = [
            threading.Thread(target=poster, args=(port, random_png(32, seed), headers, until, None, record)) for seed in range(args.clients)
        ]
        for thread in threads:
            thread.start()
        time.sleep(args.hup_at)
        shutil.copy(args.new, folder / "new.pt")
        os.replace(folder / "new.pt", served)
        server.send_signal(signal.SIGHUP)
        for thread in threads:
            thread.join()
    finally:
        stop(server)
        shutil.rmtree(folder, ignore_errors=True)
    return {"answers": dict(counts), "versions": dict(versions), "slowest_s": round(slowest[0], 2), "hup_at_s": args.hup_at, "seconds": args.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("overload", "swap"))
    parser.add_argument("--model", type=Path, required=True, help="the model file served")
    parser.add_argument("--new", type=Path, help="swap: the file that replaces it")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--clients", type=int, default=8, help="swap: clients")
    parser.add_argument("--hup-at", type=float, default=5.0, help="swap: seconds before the file is replaced and SIGHUP sent")
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout of the project to serve")
    parser.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "captioner-bench-gunicorn.log")
    args = parser.parse_args()
    args.model, args.tree = args.model.resolve(), args.tree.resolve()
    if args.what == "swap" and args.new is None:
        parser.error("swap needs --new")
    print(json.dumps(overload(args) if args.what == "overload" else swap(args)))


if __name__ == "__main__":
    main()
