"""Tests for the HTTP service: every endpoint and error code, with real (and really bad) files."""

from __future__ import annotations

import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.options import DecodeOptions
from captioner.errors import CaptionerError
from captioner.models.captioner import Captioner
from service import create_app, serve, stop_app
from service.batcher import CaptionJob, MicroBatcher, decode_group
from captioner.checkpoint import file_digest
from tests import service_models
from tests.helpers import (
    blank_png,
    encode,
    error_of,
    metric,
    noise,
    png,
    post_image,
    ready,
    wait_until,
)

CAPTION_KEYS = {"request_id", "model", "image", "captions", "timing_ms"}
DEFAULT = 'model="default"'  # the metrics' label of the one model of MODEL_PATH


# --- images -------------------------------------------------------------------------------


def exif_rotated_jpeg() -> bytes:
    """Stored 40 wide x 20 high, with EXIF orientation 6: viewed 20 wide x 40 high."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(noise((40, 20)), "JPEG", quality=90, exif=exif)


# --- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture(scope="session")
def model_path(trained_run):
    return trained_run / "model.pt"


@pytest.fixture
def make_app(model_path):
    """Factory of apps on the tiny model; their model processes are stopped after the test."""
    apps = []

    def make(**overrides):
        app = create_app({"MODEL_PATH": str(model_path), "TESTING": True, **overrides})
        apps.append(app)
        return app

    yield make
    for app in apps:
        stop_app(app)


@pytest.fixture(scope="module")
def app(trained_run):
    app = create_app({"MODEL_PATH": str(trained_run / "model.pt"), "TESTING": True})
    ready(app)
    yield app
    stop_app(app)


@pytest.fixture
def client(app):
    return app.test_client()


def post_file(client, data: bytes, filename="image.png", field="image", **fields):
    form = {field: (io.BytesIO(data), filename), **fields}
    return client.post("/v1/captions", data=form, content_type="multipart/form-data")


# --- captions -----------------------------------------------------------------------------


def test_multipart_upload_gives_captions_in_the_documented_shape(client, model_path):
    response = post_file(client, png())
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert set(body) == CAPTION_KEYS
    assert body["request_id"] == response.headers["X-Request-ID"]
    assert body["model"] == {"name": "captioner-resnet18-lstm", "version": file_digest(model_path)}
    assert body["image"] == {"width": 40, "height": 30, "format": "PNG"}
    [caption] = body["captions"]
    # With the trust fields (#45): the tiny model has no calibration nor caption memory, and says so.
    assert set(caption) == {"text", "log_prob", "perplexity", "finished", "confidence", "unfamiliar", "trust_note"}
    assert caption["text"].strip() and caption["log_prob"] <= 0 and caption["perplexity"] >= 1
    # The model's own greedy caption of the image, and its scores.
    [[expected]] = Captioner.load(model_path).caption([png()])
    assert caption["text"] == expected["text"]
    assert caption["log_prob"] == pytest.approx(expected["log_prob"], rel=1e-4)
    assert caption["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-4)
    assert set(body["timing_ms"]) == {"read", "queue", "encode", "generate", "total"}
    assert body["timing_ms"]["total"] >= body["timing_ms"]["encode"] >= 0


def test_raw_body_with_options_in_the_query(client):
    response = post_image(client, png(1), "mode=beam&beam_size=4&num_captions=3&max_length=8", "image/png")
    assert response.status_code == 200, response.get_json()
    captions = response.get_json()["captions"]
    assert len(captions) == 3
    perplexities = [c["perplexity"] for c in captions]
    assert perplexities == sorted(perplexities)  # beam search: best first
    assert all(len(c["text"].split()) <= 8 for c in captions)


def test_form_field_options_and_seeded_sampling_is_reproducible(client):
    def sample(seed):
        return post_file(client, png(2), mode="sample", num_captions="3", temperature="1.5", seed=str(seed))

    first, again, other = sample(11), sample(11), sample(12)
    assert first.status_code == 200, first.get_json()
    assert len(first.get_json()["captions"]) == 3
    assert first.get_json()["captions"] == again.get_json()["captions"]
    assert first.get_json()["captions"] != other.get_json()["captions"]


def test_request_id_is_taken_from_the_client_or_made(client):
    response = client.post(
        "/v1/captions",
        data={"image": (io.BytesIO(png()), "a.png")},
        headers={"X-Request-ID": "client-id.42"},
    )
    assert response.headers["X-Request-ID"] == "client-id.42" == response.get_json()["request_id"]
    made = client.get("/healthz").headers["X-Request-ID"]
    unsafe = client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"}).headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", made) and re.fullmatch(r"[0-9a-f]{32}", unsafe)
    assert made != unsafe


@pytest.mark.parametrize(
    ("name", "make", "size", "fmt"),
    [
        ("CMYK JPEG", lambda: encode(Image.new("CMYK", (16, 12), (0, 255, 255, 0)), "JPEG"), (16, 12), "JPEG"),
        ("16-bit PNG", lambda: encode(Image.fromarray(np.full((9, 7), 40000, np.uint16)), "PNG"), (7, 9), "PNG"),
        (
            "animated GIF",
            lambda: encode(noise(seed=1), "GIF", save_all=True, append_images=[noise(seed=2)], duration=50),
            (40, 30),
            "GIF",
        ),
        ("EXIF-rotated JPEG", exif_rotated_jpeg, (20, 40), "JPEG"),
    ],
)
def test_odd_but_valid_images_are_captioned(client, name, make, size, fmt):
    data = make()
    if name == "CMYK JPEG":
        assert Image.open(io.BytesIO(data)).mode == "CMYK"
    if name == "16-bit PNG":
        assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    if name == "animated GIF":
        assert Image.open(io.BytesIO(data)).n_frames == 2
    response = post_file(client, data, filename="upload")
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["image"] == {"width": size[0], "height": size[1], "format": fmt}


# --- 400: bad options, no image -----------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "code", "fragment"),
    [
        ("mode=fancy", "invalid_option", "unknown mode"),
        ("mode=sample&temperature=0", "invalid_option", "temperature"),
        ("mode=sample&temperature=-1", "invalid_option", "temperature"),
        ("mode=sample&top_p=0", "invalid_option", "top_p"),
        ("mode=sample&top_p=1.5", "invalid_option", "top_p"),
        ("mode=beam&beam_size=0", "invalid_option", "beam_size"),
        ("mode=beam&beam_size=17", "invalid_option", "beam_size"),
        ("mode=greedy&num_captions=2", "invalid_option", "num_captions does not apply to greedy decoding"),
        ("beam_size=8", "invalid_option", "beam_size does not apply to greedy decoding"),
        ("beam_size=3", "invalid_option", "beam_size does not apply to greedy decoding"),  # named: refused too
        ("mode=beam&temperature=1.0", "invalid_option", "temperature does not apply to beam decoding"),
        ("mode=beam&seed=3", "invalid_option", "seed does not apply to beam decoding"),
        ("mode=sample&beam_size=2", "invalid_option", "beam_size does not apply to sample decoding"),
        ("mode=beam&beam_size=2&num_captions=3", "invalid_option", "at most 2 captions"),
        ("temperature=hot", "invalid_option", "temperature must be a number"),
        ("num_captions=two", "invalid_option", "num_captions must be an integer"),
        ("max_length=0", "invalid_option", "max_length"),
        ("seed=-3", "invalid_option", "seed"),
        ("mode=greedy&mode=beam", "invalid_option", "more than once"),
        ("colour=red", "unknown_option", "unknown option 'colour'"),
    ],
)
def test_bad_options_are_400(client, query, code, fragment):
    assert fragment in error_of(post_image(client, png(), query), 400, code)


def test_bad_option_in_a_form_field_is_400(client):
    assert "top_k" in error_of(post_file(client, png(), mode="sample", top_k="-1"), 400, "invalid_option")
    assert "unknown option" in error_of(post_file(client, png(), beams="3"), 400, "unknown_option")


def test_empty_body_is_400(client):
    error_of(client.post("/v1/captions"), 400, "missing_image")
    assert "empty" in error_of(post_image(client, b"", content_type="image/jpeg"), 400, "missing_image")
    assert "empty" in error_of(post_file(client, b"", filename="empty.png"), 400, "missing_image")


def test_wrong_field_name_is_400(client):
    message = error_of(post_file(client, png(), field="file"), 400, "missing_image")
    assert '"file"' in message and '"image"' in message
    text_field = client.post("/v1/captions", data={"image": "not a file"}, content_type="multipart/form-data")
    assert "holds text" in error_of(text_field, 400, "missing_image")


# --- 413, 415: what the image intake refuses -----------------------------------------------


@pytest.fixture(scope="module")
def limited_app(model_path):
    """An app with tight limits on bodies (20,000 bytes) and forms (5 parts), ready: one model
    process for the tests of those limits."""
    app = create_app({"MODEL_PATH": str(model_path), "TESTING": True, "MAX_CONTENT_LENGTH": 20_000, "MAX_FORM_PARTS": 5})
    ready(app)
    yield app
    stop_app(app)


@pytest.mark.slow  # limited_app's model process
def test_upload_over_the_byte_limit_is_413_json(limited_app):
    client = limited_app.test_client()
    big = png(size=(100, 100))  # random pixels do not compress: about 30 KB
    assert len(big) > 20_000
    assert "20,000 bytes" in error_of(post_image(client, big), 413, "too_large")
    error_of(post_file(client, big), 413, "too_large")


def test_30000_by_30000_png_is_413_without_decoding(client):
    data = blank_png(30_000, 30_000)
    assert len(data) < 200_000  # small file, 900 million pixels
    started = time.perf_counter()
    message = error_of(post_file(client, data, filename="bomb.png"), 413, "too_many_pixels")
    assert "too large" in message
    assert time.perf_counter() - started < 5  # refused from the header


def test_truncated_jpeg_is_415(client):
    data = encode(noise((64, 64)), "JPEG", quality=90)
    error_of(post_file(client, data[: len(data) // 2], filename="cut.jpg"), 415, "corrupt_image")


def test_text_file_named_jpg_is_415(client):
    data = b"these are not the pixels you are looking for\n" * 4
    error_of(post_file(client, data, filename="holiday.jpg"), 415, "unsupported_format")
    error_of(post_image(client, data, content_type="image/jpeg"), 415, "unsupported_format")


def test_body_not_declared_an_image_is_415(client):
    response = client.post("/v1/captions", data=b'{"image": "x"}', content_type="application/json")
    assert "application/json" in error_of(response, 415, "unsupported_media_type")


# --- 404, 405, 500: JSON too --------------------------------------------------------------


def test_unknown_path_and_wrong_method_are_json(client):
    error_of(client.get("/v2/nothing"), 404, "not_found")
    error_of(client.get("/static/../../etc/passwd"), 404, "not_found")
    response = client.get("/v1/captions")
    error_of(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]




@pytest.mark.slow  # a model process of its own
def test_model_failure_is_500_json_without_details(make_app, monkeypatch, switches):
    import service.app

    monkeypatch.setattr(service.app, "load_model", service_models.load_faulty)
    app = make_app()
    ready(app)
    (switches / "broken").touch()
    response = post_file(app.test_client(), png())
    message = error_of(response, 500, "internal_error")
    assert "secret" not in message and "CUDA" not in message
    (switches / "broken").unlink()
    assert post_file(app.test_client(), png()).status_code == 200  # the model process survived


@pytest.mark.slow  # a model process of its own
def test_a_model_process_that_dies_is_started_again(make_app, monkeypatch, switches, capfd):
    import service.app

    monkeypatch.setattr(service.app, "load_model", service_models.load_faulty)
    app = make_app()
    model_process = ready(app)
    client = app.test_client()
    assert post_file(client, png()).status_code == 200
    first = model_process.pid
    (switches / "pause").touch()
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(post_file, app.test_client(), png(1))
        wait_until(lambda: (switches / "paused").exists())
        os.kill(first, signal.SIGKILL)  # mid-batch
        assert "retry" in error_of(waiting.result(), 503, "not_ready")
    (switches / "pause").unlink()
    wait_until(lambda: model_process.ready and model_process.pid != first, timeout=60)
    assert post_file(client, png()).status_code == 200
    # The first one's exit status, as its supervisor logged it.
    logged = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    stopped = [entry for entry in logged if entry["message"] == "the model process stopped unexpectedly; starting it again"]
    assert [entry["exitcode"] for entry in stopped] == [-signal.SIGKILL]


@pytest.mark.slow  # waits for four starts, 3.5 s apart at least
def test_a_model_process_that_dies_at_every_start_is_started_again_ever_more_slowly(make_app, monkeypatch, switches, capfd):
    import service.app
    from service.model_process import RESTART_DELAY_S

    monkeypatch.setattr(service.app, "load_model", service_models.load_killed)
    app = make_app()
    model_process = app.extensions["captioner"].model_process
    starts = switches / "starts"
    wait_until(lambda: starts.exists() and len(starts.read_text().split()) >= 4, timeout=60)
    message = error_of(app.test_client().get("/readyz"), 503, "not_ready")
    assert "stopped before it was ready (exit status -9;" in message and "starting it again in" in message
    times = [float(t) for t in starts.read_text().split()]
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    first = RESTART_DELAY_S[0]
    assert all(gap >= first * 2**i for i, gap in enumerate(gaps)), gaps  # each waited at least its delay
    logged = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    restarts = [entry for entry in logged if "stopped before it was ready" in entry["message"]]
    # Each restart logged once, with the exit status and the delay, which doubles.
    assert [entry["delay_s"] for entry in restarts][:3] == [first, 2 * first, 4 * first]
    assert {entry["exitcode"] for entry in restarts} == {-signal.SIGKILL}
    assert [entry["starts"] for entry in restarts] == list(range(1, len(restarts) + 1))
    assert model_process.load_error is None and not model_process.ready


# --- 503: not ready; 429: queue full ------------------------------------------------------


@pytest.mark.slow  # a model process of its own
def test_not_ready_until_the_model_is_loaded(make_app, monkeypatch, switches):
    import service.app

    monkeypatch.setattr(service.app, "load_model", service_models.load_when_allowed)
    app = make_app()
    client = app.test_client()
    try:
        assert client.get("/healthz").status_code == 200
        error_of(client.get("/readyz"), 503, "not_ready")
        error_of(post_file(client, png()), 503, "not_ready")
        error_of(client.get("/v1/model"), 503, "not_ready")
        assert metric(app, "captioner_model_ready", DEFAULT) == 0
    finally:
        (switches / "load").touch()
    ready(app)
    assert client.get("/readyz").get_json() == {"status": "ready"}
    assert metric(app, "captioner_model_ready", DEFAULT) == 1
    assert post_file(client, png()).status_code == 200


@pytest.mark.slow  # a model process of its own
def test_model_that_fails_to_load_stays_503_without_its_path(make_app, tmp_path):
    app = make_app(MODEL_PATH=str(tmp_path / "missing" / "model.pt"))
    model_process = app.extensions["captioner"].model_process
    wait_until(lambda: model_process.load_error is not None, timeout=60)
    assert "failed to load" in error_of(app.test_client().get("/readyz"), 503, "not_ready")
    first = model_process.pid
    wait_until(lambda: model_process.exitcode is not None)
    time.sleep(0.5)
    assert model_process.exitcode == 0 and model_process.pid == first  # not started again


@pytest.mark.slow  # a model process of its own
def test_model_cpus_not_on_this_machine_fail_the_load_without_retrying(make_app):
    app = make_app(MODEL_CPUS=[4096])
    model_process = app.extensions["captioner"].model_process
    wait_until(lambda: model_process.load_error is not None, timeout=60)
    assert "MODEL_CPUS" in str(model_process.load_error) and "4096" in str(model_process.load_error)
    assert "failed to load" in error_of(app.test_client().get("/readyz"), 503, "not_ready")
    first = model_process.pid
    wait_until(lambda: model_process.exitcode is not None)
    time.sleep(0.5)
    assert model_process.exitcode == 0 and model_process.pid == first


@pytest.mark.slow  # a model process of its own
def test_full_queue_is_429(make_app, monkeypatch, switches):
    import service.app

    monkeypatch.setattr(service.app, "load_model", service_models.load_faulty)
    # The queue: requests handed to the model, in a batch or waiting for one.
    app = make_app(MAX_QUEUE=2, MAX_BATCH_SIZE=1, MAX_WAIT_MS=0)
    model_process = ready(app)
    (switches / "pause").touch()
    with ThreadPoolExecutor(2) as pool:
        try:
            running = pool.submit(post_file, app.test_client(), png(1))
            wait_until(lambda: (switches / "paused").exists())  # the model is busy with the first
            waiting = pool.submit(post_file, app.test_client(), png(2))
            wait_until(lambda: model_process.queue_depth() == 2)  # the second fills the queue
            assert metric(app, "captioner_queue_depth", DEFAULT) == 2
            assert "busy" in error_of(post_file(app.test_client(), png(3)), 429, "queue_full")
        finally:
            (switches / "pause").unlink()
        assert running.result().status_code == 200 and waiting.result().status_code == 200
    assert metric(app, "captioner_http_requests_total", 'endpoint="/v1/captions",method="POST",status="429"') == 1


# --- micro-batching -----------------------------------------------------------------------


def test_decode_groups_split_only_on_options_that_act_on_the_whole_call():
    greedy = DecodeOptions(max_length=10)
    assert decode_group(greedy) != decode_group(DecodeOptions(max_length=11))
    sample = DecodeOptions(mode="sample", num_captions=2, seed=1)
    assert decode_group(sample) == decode_group(DecodeOptions(mode="sample", num_captions=2, seed=2))
    assert decode_group(sample) != decode_group(DecodeOptions(mode="sample", num_captions=2, temperature=0.5))
    assert decode_group(sample) != decode_group(DecodeOptions(mode="sample", num_captions=2, top_p=0.9))
    beam = DecodeOptions(mode="beam", beam_size=4, num_captions=2)
    assert decode_group(beam) != decode_group(DecodeOptions(mode="beam", beam_size=5, num_captions=2))


def test_a_batch_waits_from_when_its_oldest_job_was_sent_and_takes_the_oldest_first():
    batcher = MicroBatcher(max_batch_size=3, max_wait_ms=1000)
    assert batcher.time_left() is None  # nothing to wait for: read until a job comes
    now = time.monotonic()

    def job(job_id, sent=now):
        return CaptionJob(job_id, torch.zeros((3, 4, 4), dtype=torch.uint8), DecodeOptions(), sent)

    batcher.add(job(1, now - 0.4))  # sent 0.4 s ago, read only now
    assert 0.5 < batcher.time_left() <= 0.6
    batcher.add(job(2)), batcher.add(job(3))
    assert batcher.full()
    batcher.cancel(2)
    assert not batcher.full()
    batcher.add(job(4)), batcher.add(job(5))
    assert [j.job_id for j in batcher.take()] == [1, 3, 4]
    assert 0.5 < batcher.time_left() <= 1.0  # job 5's wait now
    assert [j.job_id for j in batcher.take(everything=True)] == [5] and batcher.time_left() is None
    batcher.add(job(6, now - 2))
    assert batcher.time_left() == 0  # waited long enough: its batch is due


@pytest.mark.slow  # a model process of its own
def test_concurrent_requests_share_model_calls_and_keep_their_own_options(make_app):
    solo, app = make_app(MAX_BATCH_SIZE=1), make_app(MAX_BATCH_SIZE=16, MAX_WAIT_MS=300)
    ready(solo), ready(app)
    queries = [
        "mode=greedy",
        "mode=sample&seed=3&num_captions=2",
        "mode=sample&seed=4&temperature=0.3",
        "mode=sample&seed=5&top_k=3&top_p=0.8",
        "mode=beam&beam_size=3&num_captions=3",
        "mode=greedy&max_length=5",
    ] * 2
    # Each request alone first: batch composition must not change anyone's captions.
    alone = [post_image(solo.test_client(), png(i), q).get_json()["captions"] for i, q in enumerate(queries)]
    assert metric(solo, "captioner_batch_size_count", DEFAULT) == len(queries)

    start = threading.Barrier(len(queries))

    def fire(i):
        client = app.test_client()
        start.wait()
        return post_image(client, png(i), queries[i])

    with ThreadPoolExecutor(len(queries)) as pool:
        together = list(pool.map(fire, range(len(queries))))
    assert all(r.status_code == 200 for r in together), [r.get_json() for r in together]
    for response, captions in zip(together, alone, strict=True):
        batched = response.get_json()["captions"]
        assert [c["text"] for c in batched] == [c["text"] for c in captions]
        # Batched matrix products may differ from single ones in the last float digits.
        assert [c["log_prob"] for c in batched] == pytest.approx([c["log_prob"] for c in captions], rel=1e-4)
    assert metric(app, "captioner_batch_size_sum", DEFAULT) == len(queries)  # images
    assert metric(app, "captioner_batch_size_count", DEFAULT) < len(queries)  # some model calls served several
    assert metric(app, "captioner_batch_size_bucket", f'le="1.0",{DEFAULT}') < metric(app, "captioner_batch_size_count", DEFAULT)


# --- model card, health, metrics, page, logs ----------------------------------------------


def test_model_card(client, model_path):
    response = client.get("/v1/model")
    card = response.get_json()
    model = Captioner.load(model_path)
    assert card["name"] == "captioner-resnet18-lstm"
    assert card["version"] == file_digest(model_path) and re.fullmatch(r"[0-9a-f]{12}", card["version"])
    assert card["created"] == model.created
    assert card["vocab_size"] == len(model.vocab) > 4
    assert card["encoder"]["name"] == "resnet18" and card["encoder"]["image_size"] == 32
    assert card["encoder"]["feature_dim"] == model.encoder.feature_dim
    assert card["embedding"]["source"] == "trained" and card["embedding"]["dim"] == model.decoder.embed.weight.size(1)
    assert "val_perplexity" in card["training_metrics"]
    assert str(model_path.parent) not in response.get_data(as_text=True)
    # What it was trained on: the tiny shapes world of conftest (60 images, green triangles held out).
    trained_on = card["trained_on"]
    assert trained_on["name"] == "shapes" and trained_on["world"] == "shapes"
    assert trained_on == model.data and trained_on["images"]["test"] == 6
    assert trained_on["images"]["train"] == 48 and trained_on["held_out"] == ["green:triangle"]
    assert trained_on["train_captions"] >= 48
    assert card["attention_grid"] == [1, 1]
    assert card["cnn"] == "eager" and card["device"] == "cpu"
    assert card["decoding"]["defaults"] == DecodeOptions().to_dict()
    assert card["decoding"]["limits"] == {"num_captions": 10, "beam_size": 16, "max_length": 100}
    assert card["limits"]["max_bytes"] == 16 * 1024 * 1024 and "PNG" in card["limits"]["formats"]


def test_explain_gives_each_words_probability_and_attention(client):
    plain = post_image(client, png(3), "mode=beam&beam_size=3&num_captions=2").get_json()
    response = post_image(client, png(3), "mode=beam&beam_size=3&num_captions=2&explain=1")
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert "attention_grid" not in plain and body["attention_grid"] == [1, 1]
    assert all("words" not in c for c in plain["captions"])
    for caption, same in zip(body["captions"], plain["captions"], strict=True):
        assert caption["text"] == same["text"]
        words = caption["words"]
        said = [w["word"] for w in words if w["word"] != "<end>"]
        assert " ".join(said) == caption["text"]
        assert (words[-1]["word"] == "<end>") == caption["finished"]
        assert sum(math.log(w["prob"]) for w in words) == pytest.approx(caption["log_prob"], abs=1e-3)
        for w in words:
            assert 0 < w["prob"] <= 1
            assert w["attention"] == [[pytest.approx(1.0, abs=1e-5)]]  # one cell: all the attention


def test_explain_reads_yes_and_no_and_refuses_anything_else(client):
    for value in ("0", "false", "no", "off"):
        body = post_image(client, png(3), f"explain={value}").get_json()
        assert "attention_grid" not in body and "words" not in body["captions"][0], value
    for value in ("1", "true", "yes", "on"):
        assert "words" in post_image(client, png(3), f"explain={value}").get_json()["captions"][0], value
    refused = post_image(client, png(3), "explain=maybe")
    assert refused.status_code == 400 and "explain must be" in refused.get_json()["error"]["message"]


def test_a_caption_cut_at_the_length_limit_is_unfinished(client):
    for query in ("max_length=1", "mode=sample&seed=1&max_length=1", "mode=beam&max_length=1"):
        response = post_image(client, png(4), query)
        assert response.status_code == 200, response.get_json()
        for caption in response.get_json()["captions"]:
            assert caption["finished"] is False and len(caption["text"].split()) == 1
    finished = post_image(client, png(4), "max_length=30").get_json()["captions"][0]
    assert finished["finished"] is (len(finished["text"].split()) < 30)


def test_floats_are_rounded_to_six_significant_digits(client):
    text = post_image(client, png(5), "mode=sample&num_captions=3&seed=2&explain=1").get_data(as_text=True)
    text += client.get("/v1/model").get_data(as_text=True)
    numbers = re.findall(r"-?\d+\.\d+(?:e-?\d+)?", text)
    assert numbers
    for number in numbers:
        mantissa = number.split("e")[0].lstrip("-").replace(".", "").lstrip("0")
        assert len(mantissa) <= 6, number


def test_health_and_readiness(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    assert client.get("/readyz").get_json() == {"status": "ready"}


@pytest.mark.slow  # a model process of its own
def test_metrics_count_requests_per_endpoint_and_status_per_app(make_app, app):
    # The module's app is the other app here: not a second model process to start.
    app, other = make_app(), app
    other_posts = metric(other, "captioner_http_requests_total", 'endpoint="/v1/captions",method="POST",status="200"')
    ready(app)
    client = app.test_client()
    post_file(client, png())
    post_file(client, png())
    client.get("/nowhere")
    post_image(client, png(), "mode=bad")
    text = client.get("/metrics").get_data(as_text=True)
    assert client.get("/metrics").mimetype == "text/plain"
    assert 'captioner_http_requests_total{endpoint="/v1/captions",method="POST",status="200"} 2.0' in text
    assert 'captioner_http_requests_total{endpoint="/v1/captions",method="POST",status="400"} 1.0' in text
    assert 'captioner_http_requests_total{endpoint="unmatched",method="GET",status="404"} 1.0' in text
    assert 'captioner_http_request_duration_seconds_count{endpoint="/v1/captions"} 3.0' in text
    assert 'captioner_queue_depth{model="default"} 0.0' in text
    assert "_created" not in text  # no creation-time twin of every counter
    client.get("/v1/captions")  # a real route, the wrong method
    post_image(client, png(), "mode=beam&explain=1")
    text = client.get("/metrics").get_data(as_text=True)
    assert 'captioner_http_requests_total{endpoint="/v1/captions",method="GET",status="405"} 1.0' in text
    assert 'captioner_http_errors_total{code="invalid_option",status="400"} 1.0' in text
    assert 'captioner_http_errors_total{code="not_found",status="404"} 1.0' in text
    assert 'captioner_http_errors_total{code="method_not_allowed",status="405"} 1.0' in text
    assert 'captioner_caption_requests_total{explain="false",mode="greedy",model="default"} 2.0' in text
    assert 'captioner_caption_requests_total{explain="true",mode="beam",model="default"} 1.0' in text
    # A second app counts only its own requests.
    assert metric(other, "captioner_http_requests_total", 'endpoint="/v1/captions",method="POST",status="200"') == other_posts


def test_page_is_served_with_its_script(client):
    with client.get("/") as page:
        assert page.status_code == 200 and page.mimetype == "text/html"
        html = page.get_data(as_text=True)
    for needed in ('id="image-input"', 'id="mode"', 'id="captions"', "/static/app.js"):
        assert needed in html
    with client.get("/static/app.js") as script:
        assert script.status_code == 200 and "/v1/captions" in script.get_data(as_text=True)


def test_every_request_is_logged_as_one_json_line(client, capsys):
    capsys.readouterr()
    post_file(client, png())
    client.post("/v1/captions", data={"image": (io.BytesIO(png()), "a.png")}, headers={"X-Request-ID": "log-me-1"})
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    [entry] = [e for e in lines if e.get("request_id") == "log-me-1"]
    assert entry["message"] == "request" and entry["status"] == 200 and entry["path"] == "/v1/captions"
    assert entry["level"] == "info" and entry["duration_ms"] > 0


# --- configuration and the development server ---------------------------------------------


def test_config_layers_defaults_environment_overrides(make_app, monkeypatch):
    monkeypatch.setenv("CAPTIONER_MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("CAPTIONER_MAX_WAIT_MS", "7")
    app = make_app(MAX_WAIT_MS=9)
    assert app.config["MAX_BATCH_SIZE"] == 3 and app.extensions["captioner"].model_process.max_batch_size == 3
    assert app.config["MAX_WAIT_MS"] == 9 and app.config["MAX_QUEUE"] == 256
    with pytest.raises(CaptionerError, match="MAX_BATCH_SIZE"):
        make_app(MAX_BATCH_SIZE=0)
    monkeypatch.setenv("CAPTIONER_TORCH_THREADS", "2")
    assert make_app().extensions["captioner"].model_process.placement.torch_threads == 2  # the model process's
    for threads in (0, 1.5, "two"):
        with pytest.raises(CaptionerError, match="TORCH_THREADS must be a positive whole number"):
            make_app(TORCH_THREADS=threads)
    monkeypatch.setenv("CAPTIONER_MODEL_CPUS", "[0]")
    monkeypatch.setenv("CAPTIONER_HEAVY_CNN_CPUS", "[1]")
    placement = make_app().extensions["captioner"].model_process.placement
    assert (placement.cpus, placement.heavy_cnn_cpus, placement.heavy_cnn_ms) == ([0], [1], 10)
    for key in ("MODEL_CPUS", "HEAVY_CNN_CPUS"):
        for cpus in ("0", [], [-1], [True], [1.5]):
            with pytest.raises(CaptionerError, match=f"{key} must be a list of CPU numbers"):
                make_app(**{key: cpus})
    for ms in (-1, "ten"):
        with pytest.raises(CaptionerError, match="HEAVY_CNN_MS must be 0 or more"):
            make_app(HEAVY_CNN_MS=ms)


@pytest.mark.slow  # a model process of its own, that fails to load
def test_serve_reports_a_missing_model_at_once(tmp_path):
    with pytest.raises(CaptionerError, match="model file not found"):
        serve(tmp_path / "nothing.pt", port=1)


@pytest.mark.slow  # a Python subprocess and its model process
def test_a_worker_serving_a_model_imports_no_training_and_no_shapes_world_code(model_path):
    # Serving loads and runs a model: it must not pay for (or depend on) training, DDP set-up or
    # the shapes world's generator. A fresh interpreter, as a gunicorn worker is.
    program = f"""
import sys, time
from service import create_app
app = create_app({{"MODEL_PATH": {str(model_path)!r}}})
client = app.test_client()
while client.get("/readyz").status_code != 200:
    time.sleep(0.05)
response = client.post("/v1/captions", data={png()!r}, content_type="image/png")
assert response.status_code == 200, response.get_json()
app.extensions["captioner"].model_process.stop()
print(" ".join(sorted(sys.modules)))
"""
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = result.stdout.split()
    assert "captioner.models.captioner" in loaded and "service.api" in loaded
    assert [m for m in loaded if m.startswith(("captioner.training", "captioner.shapes", "captioner.evaluation"))] == []
    assert [m for m in loaded if m.split(".")[0] in ("nltk", "gensim")] == []  # a second of start-up, for tokenising


# --- intake: sniffed bodies, one image, bounded chunked bodies, short messages -------------------


@pytest.mark.parametrize("content_type", [None, "application/octet-stream", "application/x-www-form-urlencoded"])
def test_body_of_any_or_no_content_type_is_sniffed_for_an_image(client, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/v1/captions", data=exif_rotated_jpeg(), headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["image"] == {"width": 20, "height": 40, "format": "JPEG"}
    text = client.post("/v1/captions", data=b"plain words, no pixels", headers=headers)
    error_of(text, 415, "unsupported_media_type")


def test_second_image_field_is_400(client):
    form = {"image": [(io.BytesIO(png(1)), "a.png"), (io.BytesIO(png(2)), "b.png")]}
    response = client.post("/v1/captions", data=form, content_type="multipart/form-data")
    assert "send one image" in error_of(response, 400, "too_many_images")


def chunked(data: bytes):
    """A body stream with no length, as a server hands on a chunked upload."""
    return {"input_stream": io.BytesIO(data), "headers": {"Transfer-Encoding": "chunked"}}


@pytest.mark.slow  # limited_app's model process
def test_chunked_body_over_the_limit_is_413_not_cut_and_judged(limited_app):
    client = limited_app.test_client()
    image = png(size=(24, 16))
    over = image + b"\0" * 30_000  # a valid PNG first: cut at the limit it would caption
    response = client.post("/v1/captions", content_type="image/png", **chunked(over))
    assert "20,000 bytes" in error_of(response, 413, "too_large")
    response = client.post("/v1/captions", content_type="image/png", **chunked(image))
    assert response.status_code == 200, response.get_data(as_text=True)


@pytest.mark.slow  # limited_app's model process
def test_too_many_form_parts_is_413_that_says_so(limited_app):
    fields = {f"f{i}": "x" for i in range(10)}
    response = limited_app.test_client().post("/v1/captions", data={"image": (io.BytesIO(png()), "a.png"), **fields})
    message = error_of(response, 413, "too_large")
    assert "5 parts" in message and "bytes are accepted" not in message


def test_long_option_names_and_values_are_cut_in_messages(client):
    long = "z" * 400_000
    for query in (f"temperature={long}", f"{long}=1", f"mode={long}"):
        message = error_of(post_image(client, png(), query), 400, "invalid_option" if "=1" not in query else "unknown_option")
        assert len(message) < 400


@pytest.mark.slow  # a model process of its own
def test_busy_is_429_with_retry_after_before_the_image_is_decoded(make_app, monkeypatch):
    import service.api

    app = make_app(MAX_IN_FLIGHT=1)
    ready(app)
    entered, release, decodes = threading.Event(), threading.Event(), []
    decode_now = service.api.decode_image

    def paused_decode(data, **kwargs):
        decodes.append(len(data))
        entered.set()
        assert release.wait(30)
        return decode_now(data, **kwargs)

    monkeypatch.setattr(service.api, "decode_image", paused_decode)
    with ThreadPoolExecutor(1) as pool:
        try:
            running = pool.submit(post_file, app.test_client(), png(1))
            assert entered.wait(30)  # the one admitted request holds the slot
            refused = post_file(app.test_client(), png(2))
            assert "busy" in error_of(refused, 429, "busy")
            assert int(refused.headers["Retry-After"]) >= 1
            assert len(decodes) == 1  # the refused image was never decoded
            assert app.test_client().get("/healthz").status_code == 200
        finally:
            release.set()
        assert running.result().status_code == 200
    assert post_file(app.test_client(), png(3)).status_code == 200  # the slot is free again


def test_body_that_does_not_arrive_in_time_is_408(client):
    class Stalled(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, buffer):
            raise TimeoutError("the request did not arrive in time")  # as service.worker raises it

    stalled = {"wsgi.input": Stalled(), "CONTENT_LENGTH": "5000"}
    response = client.post("/v1/captions", content_type="image/png", environ_overrides=stalled)
    error_of(response, 408, "request_timeout")
