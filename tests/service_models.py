"""Model loaders for the service's tests, with switches a test turns on and off.

They run in the model process, which is spawned: they must be importable functions, and they read
their switches as files in the folder named by CAPTIONER_TEST_SWITCHES (set before the app starts).
"""

import os
import signal
import time
from pathlib import Path

from service.model import load_model


def switch(name: str) -> Path:
    return Path(os.environ["CAPTIONER_TEST_SWITCHES"]) / name


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("a test switch was never turned")
        time.sleep(0.01)


def load_when_allowed(*args):
    """``load_model``, once the "load" switch is on (turning "loading" on meanwhile)."""
    switch("loading").touch()
    _wait_for(switch("load").exists)
    return load_model(*args)


def load_faulty(*args):
    """``load_model``'s model, whose encoder fails while "broken" is on, and while "pause" is on
    waits (having turned "paused" on) until it is off."""
    model = load_model(*args)
    encode = model.encode

    def faulty_encode(batch):
        if switch("broken").exists():
            raise RuntimeError("CUDA exploded in /srv/secret/model.py")
        if switch("pause").exists():
            switch("paused").touch()
            _wait_for(lambda: not switch("pause").exists())
        return encode(batch)

    model.encode = faulty_encode
    return model


def load_killed(*args):
    """Dies as a process killed while loading does, having added the time to the "starts" switch."""
    with switch("starts").open("a") as starts:
        starts.write(f"{time.monotonic()}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def load_slow_ones_when_allowed(path, *args):
    """``load_model``, at once for most files; a file named slow*.pt waits for the "load" switch."""
    if Path(str(path)).name.startswith("slow"):
        return load_when_allowed(path, *args)
    return load_model(path, *args)


def load_with_default_decoding(*args):
    """``load_model``'s model; one of the shapes world carries a default decoding as a checkpoint
    does (beam of 5, two captions): what the service and the page start from."""
    model = load_model(*args)
    if model.data.get("world") == "shapes":
        model.default_decoding = {"mode": "beam", "beam_size": 5, "num_captions": 2}
    return model
