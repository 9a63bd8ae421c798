"""Shared fixtures (a tiny shapes world and a tiny model trained on it, made once per session) and
hooks. Helpers that test modules import are in tests/helpers.py."""

import fcntl
import os
from pathlib import Path

import pytest

from captioner.data.datasets import load_dataset
from captioner.shapes import write_shapes_dataset
from captioner.training import train

# The shared helpers' asserts report their values as a test's own do; registered before the import.
pytest.register_assert_rewrite("tests.helpers")

from tests.helpers import tiny_config  # noqa: E402


@pytest.fixture(scope="session")
def shapes_json(tmp_path_factory) -> Path:
    """dataset.json of a 60-image shapes world (48 train, 6 val, 6 test, plus a held-out part)."""
    root = tmp_path_factory.mktemp("shapes")
    return write_shapes_dataset(root, num_images=60, seed=3, image_size=32, holdout=["green:triangle"])


@pytest.fixture(scope="session")
def shapes(shapes_json):
    return load_dataset(shapes_json)


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, shapes_json, feature_cache) -> Path:
    """Run folder of a tiny model trained for 3 epochs (model.pt, last.pt, metrics.jsonl)."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    train(tiny_config(shapes_json, out, feature_cache))
    return out


def pytest_collection_modifyitems(config, items):
    # Tests that must run alone first, while the other worker has nothing yet to be kept from.
    items.sort(key=lambda item: item.get_closest_marker("alone") is None)


@pytest.fixture(autouse=True)
def _alone_if_marked(request, tmp_path_factory):
    """Under pytest-xdist (scripts/test.sh runs two workers), a test marked ``alone`` runs with
    no other test beside it: it measures time (latencies, how long a stop takes), which a
    neighbour's training would distort. The others share. A gate taken first keeps a test that
    waits to be alone from being overtaken, test after test, by the other worker's."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    locks = tmp_path_factory.getbasetemp().parent  # one folder for all the workers of a run
    alone = request.node.get_closest_marker("alone") is not None
    with open(locks / "suite.lock", "a") as suite, open(locks / "gate.lock", "a") as gate:
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(suite, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(suite, fcntl.LOCK_UN)


@pytest.fixture
def switches(tmp_path, monkeypatch) -> Path:
    """A folder for the switches of tests.service_models, named to the model processes started
    next (in CAPTIONER_TEST_SWITCHES, which they inherit)."""
    folder = tmp_path / "switches"
    folder.mkdir()
    monkeypatch.setenv("CAPTIONER_TEST_SWITCHES", str(folder))
    return folder


@pytest.fixture(scope="session")
def photo_model(trained_run, tmp_path_factory) -> Path:
    """The tiny model, recorded as trained on Flickr8k (a photo model to the service and its page):
    another file, of another version."""
    from captioner.checkpoint import read_checkpoint, save_checkpoint

    state = read_checkpoint(trained_run / "model.pt")
    state = {key: value for key, value in state.items() if key not in ("format", "version", "created")}
    flickr8k = {"name": "flickr8k", "format": "flickr", "world": None, "held_out": [], "images": {"train": 6000, "val": 1000}}
    path = tmp_path_factory.mktemp("photo-model") / "model.pt"
    save_checkpoint({**state, "data": {**state["data"], **flickr8k}}, path)
    return path
