"""Offline batch captioning at scale: globs, CSV, resuming after SIGKILL, sharding under torchrun."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from captioner.models.captioner import Captioner

from tests.helpers import assert_one_line_error, assert_same_captions, free_port, run


@pytest.fixture(scope="module")
def images(tmp_path_factory, shapes):
    """300 test images (copies of the tiny world's test split) in nested folders, and one broken."""
    root = tmp_path_factory.mktemp("many")
    sources = [r.path for r in shapes.split("test")]
    for i in range(300):
        folder = root / f"part{i // 100}"
        folder.mkdir(exist_ok=True)
        shutil.copy(sources[i % len(sources)], folder / f"{i:04d}.png")
    (root / "part1" / "0150.png").write_bytes(b"\x89PNG\r\n\x1a\n torn")  # undecodable, mid-run
    return root


def command(model, *args):
    return [sys.executable, "-m", "captioner", "caption", str(model), *map(str, args)]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, trained_run, images):
    """The JSONL one uninterrupted process writes for the 300 images with beam search."""
    out = tmp_path_factory.mktemp("reference") / "captions.jsonl"
    args = command(trained_run / "model.pt", images, "--mode", "beam", "--batch-size", "4", "--output", out)
    subprocess.run(args, check=True, env=env(), capture_output=True, timeout=300)
    return out.read_text()


@pytest.mark.slow  # the reference: a subprocess captioning 300 images
def test_reference_run_has_every_image_once_in_order_with_the_error_in_place(reference, images):
    records = [json.loads(line) for line in reference.splitlines()]
    assert [r["image"] for r in records] == [str(p) for p in sorted(images.rglob("*.png"))]
    assert records[150]["error"]["code"] == "corrupt_image"
    assert all(r["captions"][0]["text"] for i, r in enumerate(records) if i != 150)


@pytest.mark.slow  # subprocesses killed and rerun over 300 images
def test_sigkill_mid_run_then_the_same_command_finishes_with_each_image_exactly_once(tmp_path, trained_run, images, reference):
    out = tmp_path / "captions.jsonl"
    args = command(trained_run / "model.pt", images, "--mode", "beam", "--batch-size", "4", "--output", out)
    killed_at = []
    for _ in range(2):  # killed twice, at different points
        start = len(out.read_text().splitlines()) if out.exists() else 0
        proc = subprocess.Popen(args, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.stat().st_size and len(out.read_bytes().splitlines()) >= start + 60:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at.append(len(out.read_bytes().splitlines()))
    assert 0 < killed_at[0] < killed_at[1] < 300
    finished = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    # None lost, none twice, no torn line, same order. The scores to float precision only: a run
    # resumed at an image that is not a multiple of the batch size cuts later batches elsewhere.
    written = out.read_text()
    assert written.endswith("\n") and len(written.splitlines()) == len(reference.splitlines())
    assert_same_captions([json.loads(line) for line in written.splitlines()], [json.loads(line) for line in reference.splitlines()])
    again = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=300)  # finished: nothing to do
    assert again.returncode == 0 and out.read_text() == written


@pytest.mark.slow  # the reference: a subprocess captioning 300 images
def test_torn_last_line_is_cut_off_and_written_again(capsys, tmp_path, trained_run, images, reference):
    out = tmp_path / "captions.jsonl"
    lines = reference.splitlines(keepends=True)
    out.write_text("".join(lines[:200]) + lines[200][:17])  # as a kill mid-write leaves it
    code, _, err = run(capsys, "caption", trained_run / "model.pt", images, "--mode", "beam", "--batch-size", "4", "--output", out)
    assert code == 0, err
    assert out.read_text() == reference


@pytest.mark.slow  # the reference: a subprocess captioning 300 images
def test_output_of_another_job_is_refused_not_overwritten(capsys, tmp_path, trained_run, images, reference):
    out = tmp_path / "captions.jsonl"
    out.write_text("".join(reference.splitlines(keepends=True)[1:5])[:-9])  # other images, last line unfinished
    before = out.read_text()
    assert_one_line_error(*run(capsys, "caption", trained_run / "model.pt", images, "--output", out)[::2], "other images")
    assert out.read_text() == before


@pytest.mark.slow  # the reference: a subprocess captioning 300 images
def test_csv_output_and_globs(capsys, tmp_path, trained_run, images, reference):
    out = tmp_path / "captions.csv"
    code, _, err = run(
        capsys, "caption", trained_run / "model.pt", f"{images}/**/*.png", "--mode", "beam", "--num-captions", "2",
        "--batch-size", "4", "--format", "csv", "--output", out,
    )
    assert code == 0, err
    rows = list(csv.DictReader(out.read_text().splitlines()))
    expected = [json.loads(line) for line in reference.splitlines()]
    assert [r["image"] for r in rows] == [e["image"] for e in expected]
    assert list(rows[0]) == [
        "image", "caption_1", "log_prob_1", "perplexity_1", "caption_2", "log_prob_2", "perplexity_2", "error_code", "error_message",
    ]
    assert rows[0]["caption_1"] == expected[0]["captions"][0]["text"]  # beam's best is the same
    assert float(rows[0]["perplexity_1"]) <= float(rows[0]["perplexity_2"])  # ranked length-normalised
    assert rows[150]["error_code"] == "corrupt_image" and rows[150]["caption_1"] == ""
    assert_one_line_error(*run(capsys, "caption", trained_run / "model.pt", f"{images}/*.jpeg")[::2], "no images match")


def test_csv_to_standard_output(capsys, trained_run, shapes):
    image = shapes.split("test")[0].path
    code, out, err = run(capsys, "caption", trained_run / "model.pt", image, "--format", "csv")
    assert code == 0, err
    rows = list(csv.reader(out.splitlines()))
    assert rows[0] == ["image", "caption", "log_prob", "perplexity", "error_code", "error_message"]
    assert rows[1][0] == str(image)
    [[greedy]] = Captioner.load(trained_run / "model.pt").caption([image])
    assert rows[1][1] == greedy["text"] and float(rows[1][3]) == pytest.approx(greedy["perplexity"], rel=1e-4)


@pytest.mark.slow  # torchrun
@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_torchrun_two_processes_write_what_one_process_writes(tmp_path, trained_run, images, reference, fmt):
    out = tmp_path / f"captions.{fmt}"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    caption = ["-m", "captioner", "caption", str(trained_run / "model.pt"), str(images), "--mode", "beam",
               "--batch-size", "4", "--format", fmt, "--output", str(out)]
    result = subprocess.run(torchrun + caption, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # the parts are gone
    if fmt == "jsonl":
        # The same records; scores agree to float precision (a rank's last batch is smaller, and
        # matrix kernels round differently for another batch size).
        got, expected = ([json.loads(line) for line in text.splitlines()] for text in (out.read_text(), reference))
        assert_same_captions(got, expected)
    else:
        assert [r["image"] for r in csv.DictReader(out.read_text().splitlines())] == [json.loads(line)["image"] for line in reference.splitlines()]


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_files_and_bad_links_are_error_records_and_the_run_goes_on(capsys, tmp_path, trained_run, shapes, workers):
    folder = tmp_path / "in"
    folder.mkdir()
    good = shapes.split("test")[0].path
    shutil.copy(good, folder / "a.png")
    (folder / "b.png").symlink_to("/proc/self/mem")  # opens, then every read fails (EIO)
    (folder / "c.png").symlink_to(folder / "absent.png")  # dangling
    (folder / "d.png").symlink_to(folder / "d.png")  # a loop
    (folder / "e.png").write_bytes(good.read_bytes()[:200])  # truncated
    shutil.copy(good, folder / "f.png")
    listing = tmp_path / "list.txt"
    listing.write_text("in/b.png\nin/d.png\nin/a.png\n")
    out = tmp_path / "captions.jsonl"
    code, _, err = run(capsys, "caption", trained_run / "model.pt", folder, listing, "--num-workers", workers, "--output", out)
    assert code == 0, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["image"]).name for r in records] == ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png", "b.png", "d.png", "a.png"]
    codes = [r.get("error", {}).get("code") for r in records]
    assert codes == [None, "unreadable_file", "file_not_found", "file_not_found", "corrupt_image", None, "unreadable_file", "file_not_found", None]
    for record in records:
        assert "error" in record or record["captions"][0]["text"]
        assert str(tmp_path) not in record.get("error", {}).get("message", "")


def test_a_join_that_a_kill_interrupted_leaves_no_temporary_after_a_restart(capsys, tmp_path, trained_run, shapes):
    out = tmp_path / "captions.jsonl"
    left = tmp_path / ".captions.jsonl.0123456789ab.tmp"  # what atomic_write leaves when killed
    others = [tmp_path / ".notes.txt.0123456789ab.tmp", tmp_path / "mine.tmp"]
    for path in (left, *others):
        path.write_text("partial")
    code, _, err = run(capsys, "caption", trained_run / "model.pt", shapes.split("test")[0].path, "--output", out)
    assert code == 0, err
    assert not left.exists() and all(path.exists() for path in others)


def test_the_cnn_runs_one_batch_ahead_in_its_own_thread_and_records_keep_their_order():
    import threading

    from captioner.batch import encoded_ahead

    events = []

    class Images:  # a batch that notes when it is handed to the CNN (moved to its device)
        def __init__(self, value):
            self.value = value

        def to(self, device):
            events.append(("handed over", self.value))
            return self

    class Model:
        device = torch.device("cpu")

        def encode_pixels(self, images):
            events.append(("encoded", images.value, threading.current_thread().name))
            return images.value * 10

    batches = [("a", Images(1)), ("broken", None), ("b", Images(2)), ("c", Images(3))]
    got = []
    for key, features in encoded_ahead(Model(), batches, threads=1):
        got.append((key, features))
        events.append(("yielded", key))
    assert got == [("a", 10), ("broken", None), ("b", 20), ("c", 30)]
    encoded = [e for e in events if e[0] == "encoded"]
    assert [e[1] for e in encoded] == [1, 2, 3]
    assert all(name.startswith("captioner-cnn") for *_, name in encoded)
    # Batch b went to the CNN before "broken" went to the caller, c before b did.
    assert events.index(("handed over", 2)) < events.index(("yielded", "broken"))
    assert events.index(("handed over", 3)) < events.index(("yielded", "b"))


def test_two_cnn_threads_encode_two_batches_at_once_and_records_keep_their_order():
    import threading

    from captioner.batch import encoded_ahead

    both_encoding = threading.Barrier(2, timeout=10)  # broken, and raising, unless two calls meet

    class Model:
        device = torch.device("cpu")

        def encode_pixels(self, images):
            both_encoding.wait()
            return images * 10

    batches = [(key, torch.tensor(value)) for key, value in zip("abcd", (1, 2, 3, 4))]
    assert [(key, int(features)) for key, features in encoded_ahead(Model(), batches, threads=2)] == [
        ("a", 10), ("b", 20), ("c", 30), ("d", 40)
    ]


def test_the_cnn_is_handed_ahead_batches_beyond_the_one_the_caller_has():
    from captioner.batch import encoded_ahead

    handed = []

    class Model:
        device = torch.device("cpu")

        def encode_pixels(self, images):
            return images

    def batches():
        for value in range(6):
            handed.append(value)
            yield value, torch.tensor(value)

    seen = [(key, len(handed)) for key, _ in encoded_ahead(Model(), batches(), threads=1, ahead=3)]
    assert seen == [(0, 4), (1, 5), (2, 6), (3, 6), (4, 6), (5, 6)]


def test_the_decoder_captions_several_cnn_batches_at_once(trained_run, images):
    from captioner.batch import caption_paths
    from captioner.options import DecodeOptions

    model = Captioner.load(trained_run / "model.pt", "cpu")
    decoded, generate = [], model.generate
    model.generate = lambda features, *args: decoded.append(len(features)) or generate(features, *args)
    paths = sorted(images.rglob("*.png"))[140:160]  # the broken image is the 11th
    got = list(caption_paths(model, paths, DecodeOptions(), batch_size=4, decode_images=8))
    assert decoded == [8, 7, 4]  # CNN batches of 4, two to a decoder call; the broken image has none
    assert [r["image"] for r in got] == [str(p) for p in paths]
    assert "error" in got[10] and all("captions" in r for i, r in enumerate(got) if i != 10)


def test_a_second_cnn_thread_only_beside_a_one_thread_cpu_pool():
    from captioner.batch import cnn_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert cnn_threads(torch.device("cpu")) == 2
        assert cnn_threads(torch.device("cuda", 0)) == 1
        torch.set_num_threads(2)
        assert cnn_threads(torch.device("cpu")) == 1  # two pools would oversubscribe the CPUs
    finally:
        torch.set_num_threads(before)


def test_files_are_encoded_as_the_same_images_given_whole(trained_run, shapes):
    # Offline, files cross as uint8 pixels and Captioner.encode_pixels normalises each batch; a PIL
    # image goes through the whole transform on its own (Captioner.caption). The same features.
    from captioner.batch import load_image
    from captioner.data.images import decode_image

    model = Captioner.load(trained_run / "model.pt", "cpu")
    paths = [r.path for r in shapes.split("test")][:6]
    pixels = torch.stack([load_image(model.transform, p)[0] for p in paths])
    whole = model.images_to_batch([decode_image(p).image for p in paths])
    assert torch.equal(model.encode_pixels(pixels), model.encode(whole))


@pytest.mark.parametrize("workers, threads", [(0, 1), (0, 2), (1, 2)])
def test_pipelined_captions_equal_each_batch_captioned_on_its_own(trained_run, images, workers, threads, monkeypatch):
    import captioner.batch
    from captioner.batch import caption_paths, caption_tensors, load_image
    from captioner.options import DecodeOptions

    monkeypatch.setattr(captioner.batch, "cnn_threads", lambda device: threads)  # CNN threads
    model = Captioner.load(trained_run / "model.pt", "cpu")
    paths = sorted(images.rglob("*.png"))[140:160]  # the broken image is the 11th
    options = DecodeOptions(mode="beam", beam_size=3)
    got = list(caption_paths(model, paths, options, batch_size=4, num_workers=workers))
    expected = []
    for start in range(0, len(paths), 4):
        loaded = [(p, *load_image(model.transform, p)) for p in paths[start : start + 4]]
        good = [x for _, x, _ in loaded if x is not None]
        captions = iter(caption_tensors(model, torch.stack(good), options))
        expected += [{"image": str(p), **({"error": e} if e else {"captions": next(captions)})} for p, _, e in loaded]
    assert got[10]["error"]["code"] == "corrupt_image"
    assert_same_captions(got, expected)
