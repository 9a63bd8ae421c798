"""Several named models, each in model processes of its own, and swapping one for a new file
without failing a request (service/models.py; #46).

In process through Flask's test client first; then real gunicorn and ``captioner serve`` with
real signals and concurrent clients on loopback.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from captioner.checkpoint import file_digest
from captioner.errors import CaptionerError
from service import create_app, stop_app
from service.models import ModelSource, read_sources
from tests import service_models
from tests.helpers import (
    ROOT,
    checksum_broken,
    error_of,
    free_port,
    gunicorn,
    logged,
    metric,
    png,
    post_image,
    ready,
    request,
    wait_ready,
    wait_until,
)

KEY = "alice-0123456789abcdef"
OTHER_KEY = "bob-fedcba9876543210"


# --- where the models come from -----------------------------------------------------------


def test_models_are_read_from_pairs_a_folder_or_a_list_the_first_the_default(tmp_path):
    assert read_sources("shapes=/a/shapes.pt, photos = /b/p.pt", None) == [
        ModelSource("shapes", "/a/shapes.pt", "shapes"),
        ModelSource("photos", "/b/p.pt", "photos"),
    ]
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("photos.pt", "animals-v2.pt", "notes.txt"):
        (folder / name).write_bytes(b"")
    assert [(s.name, Path(s.path).name) for s in read_sources(str(folder), None)] == [
        ("animals-v2", "animals-v2.pt"),
        ("photos", "photos.pt"),
    ]
    listing = tmp_path / "models.txt"
    listing.write_text("# name=path, a relative path from this file's folder\nshapes = models/photos.pt  # for now\n\nother=/x/y.pt\n")
    assert read_sources(str(listing), None) == [
        ModelSource("shapes", str(folder / "photos.pt"), "shapes"),
        ModelSource("other", "/x/y.pt", "other"),
    ]
    # CAPTIONER_MODEL_PATH as before: named "default", or by MODEL_NAME where that is a plain name.
    assert read_sources(None, "/m.pt") == [ModelSource("default", "/m.pt", None)]
    assert read_sources(None, "/m.pt", "shapes-v1") == [ModelSource("shapes-v1", "/m.pt", "shapes-v1")]
    assert read_sources(None, "/m.pt", "My model") == [ModelSource("default", "/m.pt", "My model")]


@pytest.mark.parametrize(
    "models, model_path, problem",
    [
        ("a=/a.pt", "/m.pt", "not both"),
        ("a=/a.pt,a=/b.pt", None, "given twice"),
        ("a=/a.pt,b", None, "'b' is not name=path"),
        ("../up=/a.pt", None, "is not a model name"),
        ("/nowhere/models", None, "neither a folder"),
        ("/srv/model.pt", None, "use CAPTIONER_MODEL_PATH"),
        ("empty-folder", None, "no models in"),
    ],
)
def test_a_list_of_models_that_is_not_right_is_refused_in_one_line(tmp_path, models, model_path, problem):
    if models == "empty-folder":
        models = str(tmp_path)
    with pytest.raises(CaptionerError, match=problem) as refused:
        read_sources(models, model_path)
    assert "\n" not in str(refused.value)


# --- several models side by side ----------------------------------------------------------


@pytest.fixture(scope="module")
def two_models(trained_run, photo_model, tmp_path_factory):
    """An app serving the tiny shapes model (the default) and the same recorded as a photo model."""
    examples = tmp_path_factory.mktemp("examples")
    (examples / "street.png").write_bytes(png(7))
    (examples / "notes.txt").write_text("not an image")
    models = f"shapes={trained_run / 'model.pt'},photos={photo_model}"
    app = create_app({"MODELS": models, "EXAMPLES_DIR": str(examples)})
    for slot in app.extensions["captioner"].models:
        assert slot.current.wait_ready(60), slot.current.load_error
    yield app
    stop_app(app)


def test_v1_models_lists_each_model_with_its_data_version_and_fitting_examples(two_models, trained_run, photo_model):
    body = two_models.test_client().get("/v1/models").get_json()
    assert body["default"] == "shapes"
    shapes, photos = body["models"]
    assert [shapes["name"], photos["name"]] == ["shapes", "photos"]
    assert shapes["default"] is True and photos["default"] is False
    assert shapes["ready"] is photos["ready"] is True and shapes["not_ready"] is None
    assert shapes["version"] == file_digest(trained_run / "model.pt") and photos["version"] == file_digest(photo_model)
    assert shapes["trained_on"]["world"] == "shapes" and photos["trained_on"]["name"] == "flickr8k"
    assert shapes["default_decoding"] is None  # the tiny model records none
    # The shapes scenes for the shapes model; the operator's images (no text file) for the photo one.
    assert [e["url"] for e in shapes["examples"]] == [f"/static/examples/shapes-{i}.png" for i in range(1, 5)]
    assert photos["examples"] == [{"url": "/examples/photos/street.png"}]
    client = two_models.test_client()
    with client.get("/examples/photos/street.png") as image:
        assert image.status_code == 200 and image.data == png(7)
    for path in ("/examples/photos/notes.txt", "/examples/nobody/street.png", "/examples/photos/../street.png"):
        error_of(client.get(path), 404, "not_found")


def test_a_request_picks_its_model_by_name_and_the_default_answers_without_one(two_models, photo_model):
    client = two_models.test_client()
    default = post_image(client, png(1)).get_json()
    assert default["model"]["name"] == "shapes"
    chosen = post_image(client, png(1), "model=photos&mode=beam&num_captions=2").get_json()
    assert chosen["model"] == {"name": "photos", "version": file_digest(photo_model)}
    assert len(chosen["captions"]) == 2
    form = client.post("/v1/captions", data={"image": (io.BytesIO(png(1)), "a.png"), "model": "photos"})
    assert form.status_code == 200 and form.get_json()["model"]["name"] == "photos"
    message = error_of(post_image(client, png(1), "model=sketches"), 400, "unknown_model")
    assert "'sketches'" in message and "shapes, photos" in message
    error_of(post_image(client, png(1), "model=photos&model=shapes"), 400, "invalid_option")
    assert client.get("/v1/model?model=photos").get_json()["trained_on"]["name"] == "flickr8k"
    assert client.get("/v1/model").get_json()["trained_on"]["name"] == "shapes"  # /v1/model: the default's
    error_of(client.get("/v1/model?model=sketches"), 400, "unknown_model")


def test_metrics_carry_the_models_name(two_models):
    client = two_models.test_client()
    before = metric(two_models, "captioner_caption_requests_total", 'explain="false",mode="greedy",model="photos"')
    assert post_image(client, png(2), "model=photos").status_code == 200
    after = metric(two_models, "captioner_caption_requests_total", 'explain="false",mode="greedy",model="photos"')
    assert after == before + 1
    assert metric(two_models, "captioner_batch_size_count", 'model="photos"') >= 1
    assert metric(two_models, "captioner_model_ready", 'model="shapes"') == metric(two_models, "captioner_model_ready", 'model="photos"') == 1


@pytest.mark.slow  # kills a model process and waits for it to start again
def test_a_killed_model_process_fails_only_its_own_models_requests(two_models):
    photos = two_models.extensions["captioner"].models.get("photos")
    killed = photos.current.pid
    stop, answers = threading.Event(), []

    def ask_shapes():
        client = two_models.test_client()
        while not stop.is_set() and len(answers) < 500:
            answers.append(post_image(client, png(3)).status_code)

    with ThreadPoolExecutor(2) as pool:
        askers = [pool.submit(ask_shapes) for _ in range(2)]
        wait_until(lambda: len(answers) >= 5, timeout=30)
        os.kill(killed, signal.SIGKILL)
        wait_until(lambda: not photos.ready, timeout=10)
        refused = post_image(two_models.test_client(), png(3), "model=photos")
        assert refused.status_code == 503 and refused.get_json()["error"]["code"] == "not_ready"
        count = len(answers)
        wait_until(lambda: photos.ready and photos.current.pid != killed, timeout=60)
        wait_until(lambda: len(answers) >= count + 5, timeout=30)
        stop.set()
        for asker in askers:
            asker.result()
    assert set(answers) == {200}  # the shapes model answered throughout
    assert post_image(two_models.test_client(), png(3), "model=photos").status_code == 200


@pytest.mark.slow  # a model process that waits for a switch
def test_a_model_still_loading_keeps_no_other_from_answering(trained_run, tmp_path, monkeypatch, switches):
    import service.app

    monkeypatch.setattr(service.app, "load_model", service_models.load_slow_ones_when_allowed)
    slow = tmp_path / "slow.pt"
    shutil.copy(trained_run / "model.pt", slow)
    app = create_app({"MODELS": f"shapes={trained_run / 'model.pt'},slow={slow}"})
    try:
        client = app.test_client()
        ready(app)  # the default, shapes
        assert post_image(client, png()).status_code == 200
        assert client.get("/readyz").status_code == 200
        assert "not loaded yet" in error_of(post_image(client, png(), "model=slow"), 503, "not_ready")
        listed = client.get("/v1/models").get_json()["models"][1]
        assert listed["ready"] is False and listed["version"] is None and "not loaded yet" in listed["not_ready"]
        (switches / "load").touch()
        wait_until(lambda: app.extensions["captioner"].models.get("slow").ready, timeout=60)
        assert post_image(client, png(), "model=slow").get_json()["model"]["name"] == "slow"
    finally:
        stop_app(app)


@pytest.mark.slow  # a model process of its own
def test_a_models_default_decoding_is_listed_where_it_carries_one(trained_run, monkeypatch):
    import service.app

    monkeypatch.setattr(service.app, "load_model", service_models.load_with_default_decoding)
    app = create_app({"MODEL_PATH": str(trained_run / "model.pt")})
    try:
        ready(app)
        [listed] = app.test_client().get("/v1/models").get_json()["models"]
        chosen = listed["default_decoding"]
        assert (chosen["mode"], chosen["beam_size"], chosen["num_captions"]) == ("beam", 5, 2)
        assert listed["name"] == "default" and listed["default"] is True
    finally:
        stop_app(app)


# --- swapping a model in process ----------------------------------------------------------


@pytest.mark.slow  # loads models in processes of their own, one after another
def test_a_swap_lets_the_request_in_flight_finish_on_the_old_model(trained_run, photo_model, tmp_path, monkeypatch, switches, capfd):
    import service.app

    monkeypatch.setattr(service.app, "load_model", service_models.load_faulty)
    served = tmp_path / "shapes.pt"
    shutil.copy(trained_run / "model.pt", served)
    old_version, new_version = file_digest(served), file_digest(photo_model)
    app = create_app({"MODELS": f"shapes={served}"})
    runtime = app.extensions["captioner"]
    slot = runtime.models.get("shapes")
    try:
        old = ready(app)
        unchanged = old.pid
        runtime.models.reload()  # nothing changed: nothing loaded
        assert slot.current is old and old.pid == unchanged
        (switches / "pause").touch()
        with ThreadPoolExecutor(2) as pool:
            in_flight = pool.submit(post_image, app.test_client(), png(4))
            wait_until(lambda: (switches / "paused").exists(), timeout=30)  # the old model is in a batch
            shutil.copy(photo_model, tmp_path / "new.pt")
            os.replace(tmp_path / "new.pt", served)
            swapping = pool.submit(runtime.models.reload)
            wait_until(lambda: slot.current is not old, timeout=60)  # new requests go to the new model
            assert old.is_alive()  # still holding the request in flight
            listed = app.test_client().get("/v1/models").get_json()["models"][0]
            assert listed["version"] == new_version and listed["trained_on"]["name"] == "flickr8k"
            (switches / "pause").unlink()
            answer = in_flight.result(timeout=60)
            swapping.result(timeout=60)
        assert answer.status_code == 200 and answer.get_json()["model"]["version"] == old_version
        wait_until(lambda: not old.is_alive(), timeout=30)  # stopped once its last request was answered
        assert post_image(app.test_client(), png(4)).get_json()["model"]["version"] == new_version
        assert metric(app, "captioner_model_swaps_total", 'model="shapes",outcome="swapped"') == 1
    finally:
        stop_app(app)
    [line] = [entry for entry in logged(capfd.readouterr().err) if "the new file serves now" in entry["message"]]
    assert (line["model"], line["version"], line["was"]) == ("shapes", new_version, old_version)


@pytest.mark.slow  # loads a model, then tries two bad files in processes of their own
def test_a_new_file_that_fails_its_checksum_or_cannot_load_is_refused_and_the_old_one_serves(trained_run, tmp_path, capfd):
    served = tmp_path / "shapes.pt"
    shutil.copy(trained_run / "model.pt", served)
    version = file_digest(served)
    app = create_app({"MODELS": f"shapes={served}"})
    runtime = app.extensions["captioner"]
    try:
        ready(app)
        capfd.readouterr()
        for bad in ("checksum", "not a model"):
            if bad == "checksum":
                checksum_broken(trained_run / "model.pt", tmp_path / "new.pt")
            else:
                (tmp_path / "new.pt").write_bytes(b"PK\x03\x04 half of a file")
            os.replace(tmp_path / "new.pt", served)
            runtime.models.reload()
            response = post_image(app.test_client(), png(5))
            assert response.status_code == 200 and response.get_json()["model"]["version"] == version
        assert metric(app, "captioner_model_swaps_total", 'model="shapes",outcome="refused"') == 2
    finally:
        stop_app(app)
    errors = [entry for entry in logged(capfd.readouterr().err) if entry["level"] == "error"]
    assert len(errors) == 2, errors  # one line each
    assert "does not match the checksum" in errors[0]["message"] and "cannot be read as a checkpoint" in errors[1]["message"]
    assert all("the new file is refused" in e["message"] and "keeps serving" in e["message"] for e in errors)
    assert all("exception" not in entry for entry in errors)  # no traceback: a file to fix, not a bug


@pytest.mark.slow  # model processes started and stopped as the folder changes
def test_a_folder_read_again_adds_the_models_put_in_it_and_retires_those_taken_out(trained_run, photo_model, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(trained_run / "model.pt", folder / "a-shapes.pt")
    app = create_app({"MODELS": str(folder)})
    models = app.extensions["captioner"].models
    try:
        ready(app)
        shutil.copy(photo_model, folder / "b-photos.pt")
        models.reload()
        assert models.names() == ["a-shapes", "b-photos"]
        wait_until(lambda: models.get("b-photos").ready, timeout=60)
        client = app.test_client()
        assert post_image(client, png(6), "model=b-photos").get_json()["model"]["name"] == "b-photos"
        added = models.get("b-photos").current
        (folder / "b-photos.pt").unlink()
        models.reload()
        error_of(post_image(client, png(6), "model=b-photos"), 400, "unknown_model")
        wait_until(lambda: not added.is_alive(), timeout=30)  # no request held it: stopped at once
        assert metric(app, "captioner_model_ready", 'model="b-photos"') == 0  # its gauge gone
        (folder / "a-shapes.pt").unlink()
        models.reload()  # an empty folder: refused, the models in use keep serving
        assert models.names() == ["a-shapes"] and post_image(client, png(6)).status_code == 200
    finally:
        stop_app(app)


# --- real servers and real signals ----------------------------------------------------------


def _key_file(folder: Path, *keys: str) -> Path:
    path = folder / "keys"
    path.write_text("".join(f"{key}\n" for key in keys))
    path.chmod(0o600)
    return path


class Clients:
    """Clients captioning on kept-alive connections until stopped (at most ``most`` answers each),
    recording each answer's status and the version of the model that gave it."""

    def __init__(self, port: int, headers: dict, count: int = 4, most: int = 2000):
        self.port, self.headers, self.most = port, {"Content-Type": "image/png", **headers}, most
        self.answers: list[list[tuple]] = [[] for _ in range(count)]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._ask, args=(i,)) for i in range(count)]
        for thread in self._threads:
            thread.start()

    def _ask(self, i: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        answers = self.answers[i]
        try:
            while not self._stop.is_set() and len(answers) < self.most:
                try:
                    connection.request("POST", "/v1/captions", png(i), self.headers)
                    response = connection.getresponse()
                    body = json.loads(response.read())
                    answers.append((response.status, body.get("model", {}).get("version") or body.get("error")))
                except OSError as error:
                    answers.append((type(error).__name__, None))
                    connection.close()
        finally:
            connection.close()

    def count(self) -> int:
        return sum(len(answers) for answers in self.answers)

    def more(self, how_many: int = 5, timeout: float = 60) -> None:
        """Wait until every client has had ``how_many`` more answers."""
        marks = [len(answers) for answers in self.answers]
        wait_until(lambda: all(len(a) >= m + how_many for a, m in zip(self.answers, marks)), timeout=timeout)

    def stop(self) -> list[list[tuple]]:
        self._stop.set()
        for thread in self._threads:
            thread.join(90)
        return self.answers


def _versions(port: int, headers: dict) -> dict:
    status, body = request(port, "GET", "/v1/models", None, headers)
    assert status == 200, body
    return {entry["name"]: entry["version"] for entry in json.loads(body)["models"]}


@pytest.mark.slow  # a gunicorn master and worker, four model loads, clients throughout
@pytest.mark.alone  # every request must be answered in time while models load beside them
@pytest.mark.parametrize("keys", [False, True], ids=["keys off", "keys on"])
def test_sighup_to_gunicorn_swaps_a_model_under_load_answering_every_request(trained_run, photo_model, tmp_path, keys):
    """Two models from a list file; the default is pointed at a new file and gunicorn's master
    gets SIGHUP while four clients caption without pause: every answer is a 200, the old model's
    until the new one is loaded, then the new one's. Then a damaged file is refused, and the
    model in use keeps answering. With keys on, SIGHUP reads the key file again too."""
    shutil.copy(trained_run / "model.pt", tmp_path / "shapes-v1.pt")
    shutil.copy(photo_model, tmp_path / "shapes-v2.pt")
    listing = tmp_path / "models.txt"
    listing.write_text(f"shapes = shapes-v1.pt\nother = {trained_run / 'model.pt'}\n")
    old, new = file_digest(tmp_path / "shapes-v1.pt"), file_digest(tmp_path / "shapes-v2.pt")
    env = {"CAPTIONER_MODELS": str(listing), "CAPTIONER_THREADS": "8"}
    headers = {}
    if keys:
        env["CAPTIONER_API_KEYS_FILE"] = str(_key_file(tmp_path, KEY))
        headers = {"Authorization": f"Bearer {KEY}"}
    port, log = free_port(), tmp_path / "gunicorn.log"
    server = gunicorn(port, log, **env)
    clients = None
    try:
        wait_ready(port, server)
        wait_until(lambda: all(_versions(port, headers).values()), timeout=60)  # both loaded
        clients = Clients(port, headers)
        clients.more()
        listing.write_text(f"shapes = shapes-v2.pt\nother = {trained_run / 'model.pt'}\n")  # the name, pointed at a new file
        if keys:
            _key_file(tmp_path, KEY, OTHER_KEY)
        server.send_signal(signal.SIGHUP)
        wait_until(lambda: _versions(port, headers)["shapes"] == new, timeout=120)
        clients.more()
        if keys:
            assert request(port, "GET", "/v1/models", None, {"Authorization": f"Bearer {OTHER_KEY}"})[0] == 200
        # A damaged file where the name points: refused; the model in use answers on.
        checksum_broken(trained_run / "model.pt", tmp_path / "broken.pt")
        os.replace(tmp_path / "broken.pt", tmp_path / "shapes-v2.pt")
        server.send_signal(signal.SIGHUP)
        wait_until(lambda: "the new file is refused" in log.read_text(), timeout=120)
        clients.more()
        answers = clients.stop()
        assert _versions(port, headers)["shapes"] == new
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    finally:
        if clients is not None:
            clients.stop()
        if server.poll() is None:
            server.kill()
            server.wait()
    every = [answer for client in answers for answer in client]
    assert {status for status, _ in every} == {200}, [answer for answer in every if answer[0] != 200][:5]
    for client in answers:  # each client: the old model's answers, then the new one's, never back
        versions = [version for _, version in client]
        assert versions == sorted(versions, key=[old, new].index) and versions[0] == old and versions[-1] == new
    output = log.read_text()
    assert "Traceback" not in output, output[-3000:]
    errors = [entry for entry in logged(output) if entry["level"] == "error"]
    assert len(errors) == 1 and "does not match the checksum" in errors[0]["message"], errors  # one line
    print(f"{len(every)} answers, all 200; {sum(v == old for _, v in every)} by the old model, {sum(v == new for _, v in every)} by the new")


@pytest.mark.slow  # captioner serve as a process, two model loads
@pytest.mark.alone
def test_sighup_to_captioner_serve_swaps_a_model_answering_every_request(trained_run, photo_model, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(trained_run / "model.pt", folder / "shapes.pt")
    old, new = file_digest(folder / "shapes.pt"), file_digest(photo_model)
    port, log = free_port(), tmp_path / "serve.log"
    env = {key: value for key, value in os.environ.items() if not key.startswith("CAPTIONER_")}
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "captioner", "serve", str(folder), "--port", str(port)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    clients = None
    try:
        wait_ready(port, server)
        clients = Clients(port, {}, count=2)
        clients.more()
        shutil.copy(photo_model, tmp_path / "new.pt")
        os.replace(tmp_path / "new.pt", folder / "shapes.pt")  # the file replaced in the folder
        server.send_signal(signal.SIGHUP)
        wait_until(lambda: _versions(port, {})["shapes"] == new, timeout=120)
        clients.more()
        answers = clients.stop()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    finally:
        if clients is not None:
            clients.stop()
        if server.poll() is None:
            server.kill()
            server.wait()
    every = [answer for client in answers for answer in client]
    assert {status for status, _ in every} == {200}, [answer for answer in every if answer[0] != 200][:5]
    assert {version for _, version in every} == {old, new}
    assert "Traceback" not in log.read_text()


@pytest.mark.slow  # gunicorn's master, as a process
def test_a_list_of_models_that_is_not_right_stops_gunicorn_in_one_line(tmp_path):
    log = tmp_path / "gunicorn.log"
    server = gunicorn(free_port(), log, CAPTIONER_MODELS="shapes=/a.pt,shapes=/b.pt")
    try:
        assert server.wait(timeout=60) != 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    lines = log.read_text().splitlines()
    assert [line for line in lines if "the name 'shapes' is given twice" in line] and len(lines) <= 3, lines
    assert "Traceback" not in log.read_text()
