"""Benchmark of the HTTP service against offline batch captioning of the same images.

Starts the service under gunicorn (service/gunicorn.conf.py) on a free loopback port, drives it
with N concurrent clients for a bounded time, with micro-batching on and then off
(MAX_BATCH_SIZE=1), with --explain also batching on with explanations (explain=1: each word's
probability and attention), and reports throughput, p50/p99 latency and the mean batch size (from
/metrics). The baseline is offline captioning of the same images with captioner.batch.caption_paths
in batches of N, the CNN's and the decoder's alike (N clients never give the service's model more
at once), in the same run on the same machine: it takes turns with the service (batching on)
for --rounds rounds, so that both see the same machine (whose speed drifts by ±15% over a minute),
and the ratio is also given round by round.

    .venv/bin/python scripts/bench_service.py --clients 16 --duration 15
    .venv/bin/python scripts/bench_service.py --model runs/shapes/model.pt

Without --model, a small model is trained first (in a temporary folder, in seconds to a minute):
``--encoder resnet50 --image-size 224`` (the default) makes the model's cost per image like a
real deployment's; ``--encoder resnet18 --image-size 32`` is the tiny test model.
All traffic goes to 127.0.0.1; every loop stops after --duration seconds or --max-requests.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def add_model_arguments(parser: argparse.ArgumentParser, use: str) -> None:
    """--model, and the encoder and input size of the small model trained without it
    (``train_small_model``): the benchmark scripts' common arguments."""
    parser.add_argument("--model", help=f"model.pt to {use} (default: train a small one first)")
    parser.add_argument("--encoder", default="resnet50", help="encoder of the model trained without --model")
    parser.add_argument("--image-size", type=int, default=224, help="its input size in pixels")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, "serve")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients, and the offline batch size")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per configuration and round")
    parser.add_argument("--rounds", type=int, default=3, help="turns of offline and the service (batching on)")
    parser.add_argument("--max-requests", type=int, default=20_000, help="most requests per configuration")
    parser.add_argument("--images", type=int, default=32, help="distinct images the clients cycle through")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="the batcher's MAX_WAIT_MS")
    parser.add_argument("--mode", default="greedy", help="decoding mode of every request")
    parser.add_argument("--explain", action="store_true", help="also measure batching on with explain=1 requests")
    parser.add_argument(
        "--torch-threads",
        type=int,
        help="torch threads, offline and in the service alike (default: each picks its own, as `captioner caption` "
        "and the service do; 1 suits a machine shared with other work)",
    )
    parser.add_argument("--output", help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0:
        parser.error("--rounds must be 1 or more and --duration positive")
    return args


def train_small_model(folder: Path, encoder: str, image_size: int) -> Path:
    """A shapes-world model trained for two epochs: good enough to time, not to read."""
    from captioner.shapes import write_shapes_dataset
    from captioner.options import TrainConfig
    from captioner.training import train

    data = write_shapes_dataset(folder / "shapes", num_images=64, seed=1, image_size=64)
    config = TrainConfig(
        data=str(data),
        out=str(folder / "run"),
        encoder=encoder,
        encoder_weights="none",
        image_size=image_size,
        hidden_size=256,
        min_count=1,
        epochs=2,
        batch_size=32,
        feature_cache=str(folder / "features"),
        val_images=8,
        progress=False,
    )
    train(config)
    return folder / "run" / "model.pt"


def bench_images(folder: Path, count: int, seed: int = 2) -> list[Path]:
    from captioner.shapes import write_shapes_dataset

    write_shapes_dataset(folder / "bench-images", num_images=count, seed=seed, image_size=96)
    return sorted((folder / "bench-images" / "images").glob("*.png"))[:count]


class Offline:
    """Offline captioning with caption_paths over ``paths`` in batches of --clients (the decoder's
    too, not ``DECODE_IMAGES``), loaded and warmed up once, then run for a few seconds at a time."""

    def __init__(self, model_path: Path, paths: list[Path], args: argparse.Namespace):
        import torch

        from captioner.models.captioner import Captioner
        from captioner.options import DecodeOptions
        from captioner.runtime import torch_threads

        torch.set_num_threads(args.torch_threads or torch_threads(reserved=1))  # a CPU for the caption writer
        self.model, self.paths = Captioner.load(model_path), paths
        self.options, self.batch_size = DecodeOptions(mode=args.mode), args.clients
        self.run(0)  # warm-up: one pass

    def run(self, seconds: float) -> dict:
        """Images captioned and CPU seconds used in whole passes over the paths lasting ``seconds``."""
        from captioner.batch import caption_paths

        done, started, cpu_before = 0, time.perf_counter(), cpu_seconds(os.getpid())
        while True:
            records = caption_paths(self.model, self.paths, self.options, batch_size=self.batch_size, decode_images=self.batch_size)
            done += sum(1 for _ in records)
            if time.perf_counter() - started >= seconds:
                break
        elapsed = time.perf_counter() - started
        return {"images": done, "seconds": elapsed, "cpu_seconds": cpu_seconds(os.getpid()) - cpu_before}


def explain_model_cost(model_path: Path, paths: list[Path], args: argparse.Namespace, repeats: int = 30) -> dict:
    """Seconds of the model's decoding (``generate`` and ``describe``) per batch of 8 images, with and
    without explanations, taken in turn so that the machine's load falls on both alike."""
    import torch
    from dataclasses import replace

    from captioner.data.images import decode_image
    from captioner.options import DecodeOptions
    from captioner.models.captioner import Captioner
    from captioner.runtime import torch_threads

    torch.set_num_threads(args.torch_threads or torch_threads())  # the model process's default
    model = Captioner.load(model_path)
    images = [decode_image(p.read_bytes()).image for p in paths[:8]]
    features = model.encode(model.images_to_batch(images))  # (8, F): a batch as the service makes them
    plain = DecodeOptions(mode=args.mode)
    times = {False: [], True: []}
    for _ in range(repeats):
        for explain in (False, True):
            started = time.perf_counter()
            model.describe(model.generate(features, replace(plain, explain=explain)))
            times[explain].append(time.perf_counter() - started)
    off, on = (sorted(times[k])[repeats // 2] for k in (False, True))  # medians
    return {"decode_ms_off": off * 1000, "decode_ms_on": on * 1000, "ratio": on / off}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds that process ``pid`` has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (started from any of its threads)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError):
            pass  # gone meanwhile
    return found


def batch_totals(port: int) -> tuple[float, float]:
    """(images, model calls) so far, from the batch-size histogram in /metrics (every model's)."""
    text = http_get(port, "/metrics")[1].decode()

    def value(name):
        return sum(float(found) for found in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE))

    return value("captioner_batch_size_sum"), value("captioner_batch_size_count")


class Gunicorn:
    """The service under gunicorn with our config, on a free loopback port, stopped with SIGTERM."""

    def __init__(self, model_path: Path, log_path: Path, **settings):
        self.port = free_port()
        env = {**os.environ, "CAPTIONER_BIND": f"127.0.0.1:{self.port}", "CAPTIONER_MODEL_PATH": str(model_path)}
        env |= {f"CAPTIONER_{key.upper()}": str(value) for key, value in settings.items()}
        self.log = open(log_path, "wb")
        command = [sys.executable, "-m", "gunicorn", "-c", "service/gunicorn.conf.py"]
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited:\n{self.log_tail()}")
            try:
                if http_get(self.port, "/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"gunicorn did not become ready:\n{self.log_tail()}")

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds used so far by gunicorn's worker processes ("http") and the model processes
        they started ("model"); the master only watches them."""
        workers = children(self.process.pid)
        models = [pid for worker in workers for pid in children(worker)]
        return {"http": sum(map(cpu_seconds, workers)), "model": sum(map(cpu_seconds, models))}

    def log_tail(self, lines: int = 20) -> str:
        self.log.flush()
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


class KeptAliveClient:
    """One client's kept-alive HTTP/1.1 connection: it sends a prepared request and reads the
    answer by its Content-Length, and nothing more.

    The clients run on the same cores as the service, so what they cost is taken from it:
    http.client, which parses every answer's head with the email package, cost 0.25 ms of CPU a
    request; this costs about 0.08 (docs/performance.md, "The service's clients were part of its cost").
    """

    def __init__(self, port: int):
        self.port = port
        self.sock: socket.socket | None = None
        self.buffer = b""

    def exchange(self, request: bytes) -> int:
        """Send ``request`` and read the whole answer; its status."""
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=60)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buffer = b""
        self.sock.sendall(request)
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            self._receive()
        status_line, *lines = self.buffer[:end].decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        answer_end = end + 4 + int(headers["content-length"])  # the service always sends one
        while len(self.buffer) < answer_end:
            self._receive()
        self.buffer = self.buffer[answer_end:]
        if headers.get("connection", "").lower() == "close":
            self.close()
        return int(status_line.split()[1])

    def _receive(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("the service closed the connection in the middle of an answer")
        self.buffer += data

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def caption_request(image: bytes, query: str) -> bytes:
    head = f"POST /v1/captions?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
    return f"{head}Content-Length: {len(image)}\r\n\r\n".encode() + image


def drive(port: int, images: list[bytes], clients: int, duration: float, max_requests: int, query: str) -> dict:
    """N client threads posting images back to back until the time or request budget is spent."""
    latencies: list[float] = []
    failures: list[int] = []
    lock = threading.Lock()
    budget = iter(range(max_requests))
    deadline = time.perf_counter() + duration
    requests = [caption_request(image, query) for image in images]

    def client(offset: int):
        # One kept-alive connection per client, as an HTTP client library's pool would do.
        connection = KeptAliveClient(port)
        i = offset
        try:
            while time.perf_counter() < deadline:
                with lock:
                    if next(budget, None) is None:
                        return
                started = time.perf_counter()
                status = connection.exchange(requests[i % len(requests)])
                elapsed = time.perf_counter() - started
                with lock:
                    if status == 200:
                        latencies.append(elapsed)
                    else:
                        failures.append(status)
                i += 1
        finally:
            connection.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    latencies.sort()

    def percentile(q):
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")

    return {
        "requests_per_s": len(latencies) / elapsed,
        "requests": len(latencies),
        "failures": len(failures),
        "p50_ms": percentile(0.50),
        "p99_ms": percentile(0.99),
    }


def bench_service(model_path, images, args, folder: Path, batching: bool, explain: bool = False, offline=None) -> dict:
    """One configuration of the service; with ``offline``, taking --rounds turns with it."""
    settings = {
        "max_batch_size": args.clients if batching else 1,
        "max_wait_ms": args.max_wait_ms,
    }
    if args.torch_threads:  # else the service's own choice, a heavy CNN's spare CPUs included
        settings["torch_threads"] = args.torch_threads
    query = f"mode={args.mode}" + ("&explain=1" if explain else "")
    server = Gunicorn(model_path, folder / f"gunicorn-{'on' if batching else 'off'}-{explain}.log", **settings)
    try:
        server.wait_ready()
        drive(server.port, images, args.clients, 2.0, 4 * args.clients, query)  # warm-up
        if offline is None:
            return measure(server, images, args, query)
        rounds = [(offline.run(args.duration), measure(server, images, args, query)) for _ in range(args.rounds)]
    finally:
        server.stop()
    report = pooled([service for _, service in rounds])
    report["offline"] = {
        "images_per_s": sum(o["images"] for o, _ in rounds) / sum(o["seconds"] for o, _ in rounds),
        "cpus_busy": sum(o["cpu_seconds"] for o, _ in rounds) / sum(o["seconds"] for o, _ in rounds),
    }
    report["round_ratios"] = [s["requests_per_s"] / (o["images"] / o["seconds"]) for o, s in rounds]
    return report


def measure(server: Gunicorn, images: list[bytes], args: argparse.Namespace, query: str) -> dict:
    """Throughput, latency, CPUs busy and mean batch size of --duration seconds of load."""
    images_before, calls_before = batch_totals(server.port)
    before, client_before, started = server.cpu_seconds(), cpu_seconds(os.getpid()), time.perf_counter()
    figures = drive(server.port, images, args.clients, args.duration, args.max_requests, query)
    elapsed, after = time.perf_counter() - started, server.cpu_seconds()
    # CPUs kept busy by the HTTP process, the model process and the clients (this process).
    figures["cpus_busy"] = {key: (after[key] - before[key]) / elapsed for key in after}
    figures["cpus_busy"]["client"] = (cpu_seconds(os.getpid()) - client_before) / elapsed
    images_after, calls_after = batch_totals(server.port)
    figures["mean_batch_size"] = (images_after - images_before) / max(calls_after - calls_before, 1)
    figures["seconds"] = elapsed
    return figures


def pooled(phases: list[dict]) -> dict:
    """The figures of several phases of one configuration as one: throughput over their whole time,
    the medians of their percentiles, CPUs busy weighted by time."""
    seconds = sum(p["seconds"] for p in phases)
    return {
        "requests_per_s": sum(p["requests"] for p in phases) / seconds,
        "requests": sum(p["requests"] for p in phases),
        "failures": sum(p["failures"] for p in phases),
        "p50_ms": statistics.median(p["p50_ms"] for p in phases),
        "p99_ms": statistics.median(p["p99_ms"] for p in phases),
        "cpus_busy": {k: sum(p["cpus_busy"][k] * p["seconds"] for p in phases) / seconds for k in phases[0]["cpus_busy"]},
        "mean_batch_size": sum(p["mean_batch_size"] * p["seconds"] for p in phases) / seconds,
        "seconds": seconds,
    }


def main(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        folder = Path(tmp)
        model_path = Path(args.model) if args.model else train_small_model(folder, args.encoder, args.image_size)
        paths = bench_images(folder, args.images)
        images = [p.read_bytes() for p in paths]
        print(
            f"model {model_path.name}; {len(images)} images; {args.clients} clients; {args.duration:g} s each;"
            f" offline and batching on take {args.rounds} turns",
            flush=True,
        )
        report = {"batching_on": bench_service(model_path, images, args, folder, True, offline=Offline(model_path, paths, args))}
        report["offline"] = report["batching_on"].pop("offline")
        report["batching_off"] = bench_service(model_path, images, args, folder, batching=False)
        if args.explain:
            report["explain_on"] = bench_service(model_path, images, args, folder, batching=True, explain=True)
            report["explain_model_cost"] = explain_model_cost(model_path, paths, args)
    offline = report["offline"]["images_per_s"]
    ratios = report["batching_on"]["round_ratios"]
    print(f"{'':14}{'img/s':>9}{'vs offline':>12}{'p50 ms':>9}{'p99 ms':>9}{'batch':>7}{'fails':>7}", end="")
    print(f"{'CPUs busy: http + model + client':>34}")
    print(f"{'offline':14}{offline:9.1f}{1:12.2f}{'':39}{report['offline']['cpus_busy']:34.2f}")
    for name in [k for k in ("batching_on", "batching_off", "explain_on") if k in report]:
        r = report[name]
        r["vs_offline"] = r["requests_per_s"] / offline
        print(
            f"{name:14}{r['requests_per_s']:9.1f}{r['vs_offline']:12.2f}{r['p50_ms']:9.1f}"
            f"{r['p99_ms']:9.1f}{r['mean_batch_size']:7.2f}{r['failures']:7d}"
            f"{'{http:.2f} + {model:.2f} + {client:.2f}'.format(**r['cpus_busy']):>34}"
        )
    print(f"batching on against offline, round by round: {', '.join(f'{r:.2f}' for r in ratios)} (median {statistics.median(ratios):.2f})")
    if "explain_on" in report:
        cost = report["explain_on"]["requests_per_s"] / report["batching_on"]["requests_per_s"]
        report["explain_throughput_ratio"] = cost
        print(f"explanations on: {cost:.2f} of the throughput with them off (batching on, same run)")
        model_cost = report["explain_model_cost"]
        print(
            f"decoding a batch of 8 ({args.mode}): {model_cost['decode_ms_off']:.1f} ms, with explanations "
            f"{model_cost['decode_ms_on']:.1f} ms ({model_cost['ratio']:.2f} times; medians, taken in turn)"
        )
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main(parse_args())
