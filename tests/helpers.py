"""Helpers that several test modules share, each defined once here (#47).

Not a test module, and not conftest.py: the fixtures stay in conftest.py, and test modules import
these by name (``from tests.helpers import ...``), never from one another. conftest.py has pytest
rewrite this module's asserts, so a failing check here reports its values as a test's own does.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.options import TrainConfig
from captioner.shapes import GRID, Scene, ShapeObject

ROOT = Path(__file__).resolve().parent.parent  # the repository


# --- a tiny model -------------------------------------------------------------------------

TINY = dict(
    encoder="resnet18",
    encoder_weights="none",  # a random-weight torchvision backbone: nothing to download
    image_size=32,
    pool_grid=1,
    hidden_size=48,
    min_count=1,
    batch_size=16,
    lr=1e-2,
    progress=False,
)


def tiny_config(data: Path, out: Path, cache: Path, **overrides) -> TrainConfig:
    """Training options for a model that trains in seconds on the tiny shapes world."""
    return TrainConfig(data=str(data), out=str(out), feature_cache=str(cache), **{**TINY, "epochs": 3, **overrides})


def assert_same_captions(got, expected):
    """Same images, errors and caption texts; scores to float precision (batches may be cut apart
    elsewhere, and matrix kernels round differently for another batch size)."""

    def texts(record):
        return record["image"], record.get("error"), [c["text"] for c in record.get("captions", [])]

    assert [texts(g) for g in got] == [texts(e) for e in expected]
    for g, e in zip(got, expected):
        scores = [c["log_prob"] for c in e.get("captions", [])]
        assert [c["log_prob"] for c in g.get("captions", [])] == pytest.approx(scores, rel=1e-5)


# --- the shapes world ---------------------------------------------------------------------


def scene_object(shape, colour, size, row, col):
    """An object centred in its grid cell."""
    return ShapeObject(shape, colour, size, row, col, (col + 0.5) / GRID, (row + 0.5) / GRID)


# red circle top-left, blue square top-right, green star bottom-middle.
SCENE = Scene(
    (
        scene_object("circle", "red", "large", 0, 0),
        scene_object("square", "blue", "small", 0, 2),
        scene_object("star", "green", "large", 2, 1),
    )
)


# --- the command line, in process --------------------------------------------------------


def run(capsys, *argv):
    """``captioner`` with ``argv`` in this process: (exit code, stdout, stderr)."""
    from captioner.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 1
    assert err.startswith("captioner: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err


# --- CPUs ---------------------------------------------------------------------------------


def threads_cpus(pid: int) -> set[tuple[int, ...]]:
    """The CPUs each thread of process ``pid`` may run on."""
    return {tuple(sorted(os.sched_getaffinity(int(thread)))) for thread in os.listdir(f"/proc/{pid}/task")}


def send_own_cpus(conn) -> None:
    """A child process's first act: send the CPUs it started on."""
    conn.send(sorted(os.sched_getaffinity(0)))


# --- images -------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def noise(size=(40, 30), seed=0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png(seed=0, size=(40, 30)) -> bytes:
    """A PNG of random pixels."""
    return encode(noise(size, seed), "PNG")


def red_png() -> bytes:
    """A small PNG of one colour (24x16, red)."""
    return encode(Image.new("RGB", (24, 16), (200, 40, 40)), "PNG")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def blank_png(width: int, height: int) -> bytes:
    """A genuine black 1-bit greyscale PNG, built by hand so huge sizes stay cheap to make: 30,000
    x 30,000 pixels in about 110 KB."""
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    rows_per_chunk = max(1, 4_000_000 // len(row))
    idat = b"".join(
        compressor.compress(row * min(rows_per_chunk, height - y))
        for y in range(0, height, rows_per_chunk)
    )
    idat += compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grey, no interlace
    chunks = png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


# --- model files --------------------------------------------------------------------------


def checksum_broken(source: Path, destination: Path) -> Path:
    """A copy of the model file ``source`` with one weight changed after its checksum was taken:
    read_checkpoint refuses it ("does not match the checksum")."""
    import torch

    state = torch.load(source, map_location="cpu", weights_only=True)
    weights = state["decoder"]["state_dict"]
    name = next(key for key, value in weights.items() if value.is_floating_point())
    weights[name] = weights[name] + 1.0
    torch.save(state, destination)
    return destination


# --- the service's model process ----------------------------------------------------------


# --- the service in process (Flask's test client) -----------------------------------------


def ready(app):
    """The app's model process (its ModelProcess handle), once its model is loaded."""
    model_process = app.extensions["captioner"].model_process
    assert model_process.wait_ready(60), model_process.load_error
    return model_process


def post_image(client, data: bytes, query: str = "", content_type="image/png", **kwargs):
    return client.post(f"/v1/captions?{query}", data=data, content_type=content_type, **kwargs)


def error_of(response, status: int, code: str) -> str:
    """Assert a JSON error with ``status`` and ``code``, safe to show; return its message."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    text = response.get_data(as_text=True)
    assert "<html" not in text.lower() and "Traceback" not in text and "/tmp" not in text
    return body["error"]["message"]


def metric(app, name: str, labels: str = "") -> float:
    """A sample's value from the app's /metrics (0 when absent)."""
    text = app.test_client().get("/metrics").get_data(as_text=True)
    pattern = rf"^{re.escape(name)}{re.escape('{' + labels + '}') if labels else ''} (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


# --- servers and processes of their own ---------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, method: str, path: str, body: bytes | None = None, headers=None):
    """(status, body bytes) of one loopback request."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def wait_ready(port: int, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "gunicorn exited before it was ready"
        try:
            if request(port, "GET", "/readyz")[0] == 200:
                return
        except OSError:
            pass  # not listening yet
        time.sleep(0.2)
    raise AssertionError("gunicorn did not become ready in time")


def gunicorn(port: int, log: Path, **env: str) -> subprocess.Popen:
    """gunicorn with the service's config on loopback ``port``, one torch thread, its output in
    ``log``; ``env``: CAPTIONER_* settings (others from the environment are left out)."""
    environment = {
        **{key: value for key, value in os.environ.items() if not key.startswith("CAPTIONER_")},
        "CAPTIONER_BIND": f"127.0.0.1:{port}",
        "CAPTIONER_TORCH_THREADS": "1",
        **env,
    }
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "service/gunicorn.conf.py"], cwd=ROOT, env=environment, stdout=out, stderr=subprocess.STDOUT
        )


def logged(text: str) -> list[dict]:
    """The JSON lines of a log."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid``, started from any of its threads (live ones)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:  # the thread ended meanwhile
            pass
    return found


def write_flickr_slice(root: Path, flickr8k: Path) -> Path:
    """A Flickr8k token file and split lists for 200 training and 40 dev photographs in ``root``,
    whose photographs stay in ``flickr8k`` (read through --images); returns ``root``."""
    lists = {
        split: (flickr8k / f"Flickr_8k.{split}Images.txt").read_text().split()[:count]
        for split, count in (("train", 200), ("dev", 40))
    }
    wanted = {name for names in lists.values() for name in names}
    lines = [line for line in (flickr8k / "Flickr8k.token.txt").read_text().splitlines() if line.split("#")[0] in wanted]
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    for split, names in lists.items():
        (root / f"Flickr_8k.{split}Images.txt").write_text("\n".join(names) + "\n")
    return root
