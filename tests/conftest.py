"""Shared fixtures (a tiny shapes world and a tiny model trained on it, made once per session) and checks."""

import os
from pathlib import Path

import pytest

from captioner.data.datasets import load_dataset
from captioner.shapes import write_shapes_dataset
from captioner.options import TrainConfig
from captioner.training import train

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


def assert_same_captions(got, expected):
    """Same images, errors and caption texts; scores to float precision (batches may be cut apart
    elsewhere, and matrix kernels round differently for another batch size)."""

    def texts(record):
        return record["image"], record.get("error"), [c["text"] for c in record.get("captions", [])]

    assert [texts(g) for g in got] == [texts(e) for e in expected]
    for g, e in zip(got, expected):
        scores = [c["log_prob"] for c in e.get("captions", [])]
        assert [c["log_prob"] for c in g.get("captions", [])] == pytest.approx(scores, rel=1e-5)


def threads_cpus(pid: int) -> set[tuple[int, ...]]:
    """The CPUs each thread of process ``pid`` may run on."""
    return {tuple(sorted(os.sched_getaffinity(int(thread)))) for thread in os.listdir(f"/proc/{pid}/task")}


def send_own_cpus(conn) -> None:
    """A child process's first act: send the CPUs it started on."""
    conn.send(sorted(os.sched_getaffinity(0)))
