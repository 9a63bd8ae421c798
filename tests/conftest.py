"""Shared fixtures (a tiny shapes world and a tiny model trained on it, made once per session) and checks."""

import fcntl
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


# Tests in files that other work edits heavily (the service's and the command line's), marked
# `slow` here rather than there, for the quick loop (`-m "not slow"`) to stay under a minute on 2
# cores. The service's each start a process of their own: a model process (spawned: a Python that
# imports torch and torchvision, 2 to 5 s on 2 cores) or a Python subprocess. By test function
# name; a test renamed there simply runs in the quick loop again.
SLOW_ELSEWHERE = {
    "test_service.py": {
        "test_the_model_process_outlives_no_http_process",
        "test_a_worker_serving_a_model_imports_no_training_and_no_shapes_world_code",
        "test_a_model_process_that_dies_is_started_again",
        "test_concurrent_requests_share_model_calls_and_keep_their_own_options",
        "test_stop_ends_a_model_process_stuck_in_a_batch_behind_a_full_pipe",
        "test_metrics_count_requests_per_endpoint_and_status_per_app",
        "test_the_model_process_starts_on_every_cpu_it_may_use_and_the_caller_keeps_its_own",
        "test_the_model_process_runs_on_the_cpus_it_is_given",
        "test_upload_over_the_byte_limit_is_413_json",
        "test_model_failure_is_500_json_without_details",
        "test_too_many_form_parts_is_413_that_says_so",
        "test_a_heavy_cnn_takes_the_http_sides_cpus_too",
        "test_model_that_fails_to_load_stays_503_without_its_path",
        "test_model_cpus_not_on_this_machine_fail_the_load_without_retrying",
        "test_busy_is_429_with_retry_after_before_the_image_is_decoded",
        "test_the_model_process_batches_what_came_during_a_batch_and_fails_what_waits_on_stop",
        "test_requests_are_handed_to_a_busy_model_at_once_up_to_the_queue",
        "test_chunked_body_over_the_limit_is_413_not_cut_and_judged",
        "test_not_ready_until_the_model_is_loaded",
        "test_full_queue_is_429",
        "test_serve_reports_a_missing_model_at_once",
        "test_a_model_process_still_loading_outlives_no_http_process",
    },

    "test_cli.py": {
        "test_plot_draws_the_training_curves",  # matplotlib's first import: seconds
    },
    "test_service_keys.py": {
        "test_the_right_key_gets_the_same_caption_as_without_keys",  # the only user of a second app
    },
    "test_service_deploy.py": {
        "test_a_heavy_cnn_may_take_the_http_side_cpus_with_one_worker_and_threads_left_to_the_service",
    },
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = getattr(item, "originalname", item.name)
        if name in SLOW_ELSEWHERE.get(item.path.name, ()):
            item.add_marker(pytest.mark.slow)
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
