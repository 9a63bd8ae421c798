"""Damaged and odd files: checkpoints, the feature cache, data sets. Each is a one-line error, or
(for the cache, which is derived data) a recomputation with a warning; never a silent result or NaN."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from captioner import features, training
from captioner.checkpoint import read_checkpoint, save_checkpoint
from captioner.data.datasets import load_dataset
from captioner.errors import CaptionerError
from captioner.features import cached_features
from captioner.models.captioner import Captioner
from captioner.models.encoder import Encoder, EncoderConfig
from captioner.training import train

from tests.helpers import TINY, assert_one_line_error, run, tiny_config


def garble(path, size=4096, seed=0):
    """Overwrites ``size`` bytes in the middle of ``path`` with random bytes, as a bad disk would."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + size] = random.Random(seed).randbytes(size)
    path.write_bytes(bytes(data))


def copy_run(trained_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    return out


# --- checkpoints ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_garbled_model_is_a_one_line_error_naming_it(capsys, tmp_path, trained_run, shapes, seed):
    model = tmp_path / "model.pt"
    shutil.copy(trained_run / "model.pt", model)
    garble(model, seed=seed)
    code, out, err = run(capsys, "caption", model, shapes.split("test")[0].path)
    assert_one_line_error(code, err, "model.pt", "damaged")
    assert out == ""


def test_a_garbled_last_pt_stops_resume_before_training(tmp_path, trained_run, shapes_json, feature_cache):
    out = copy_run(trained_run, tmp_path)
    log = (out / "metrics.jsonl").read_text()
    garble(out / "last.pt")
    with pytest.raises(CaptionerError, match="last.pt.*damaged"):
        train(tiny_config(shapes_json, out, feature_cache, epochs=4, resume=True))
    assert (out / "metrics.jsonl").read_text() == log


def test_a_truncated_checkpoint_is_a_damaged_file(tmp_path, trained_run):
    path = tmp_path / "encoder-pretrained.pt"
    data = (trained_run / "model.pt").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CaptionerError, match="encoder-pretrained.pt.*damaged"):
        read_checkpoint(path)


def test_a_truncated_encoder_pretrained_stops_training_in_one_line(capsys, tmp_path, trained_run, shapes_json, feature_cache):
    out = tmp_path / "run"
    out.mkdir()
    data = (trained_run / "model.pt").read_bytes()
    (out / "encoder-pretrained.pt").write_bytes(data[: len(data) // 2])
    code, _, err = run(capsys, "train", "--data", shapes_json, "--out", out, "--encoder-weights", "auxiliary",
                       "--feature-cache", feature_cache, "--epochs", "1", "--no-progress")  # fmt: skip
    assert_one_line_error(code, err, "encoder-pretrained.pt", "damaged")


def test_a_checkpoint_whose_content_changed_fails_its_checksum(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"weights": torch.ones(3)}, path)
    state = torch.load(path, weights_only=True)
    state["weights"][1] = 2.0  # a valid file with other numbers in it
    torch.save(state, path)
    with pytest.raises(CaptionerError, match="last.pt is damaged"):
        read_checkpoint(path)


def test_a_version_5_checkpoint_without_checksum_still_reads_but_not_with_nan(tmp_path, trained_run):
    state = torch.load(trained_run / "model.pt", weights_only=True)
    state.pop("checksum", None)
    state["version"] = 5
    torch.save(state, tmp_path / "model.pt")
    assert Captioner.load(tmp_path / "model.pt").metrics == state["metrics"]
    state["decoder"]["state_dict"]["out.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(CaptionerError, match="model.pt is damaged"):
        Captioner.load(tmp_path / "model.pt")


def unstamped(state):
    return {k: v for k, v in state.items() if k not in ("format", "version", "created", "checksum")}


def test_a_kill_between_last_pt_and_model_pt_is_repaired_on_resume(tmp_path, trained_run, shapes_json, feature_cache):
    # As a kill leaves it after last.pt of a new best epoch 3 is written and before model.pt is:
    # last.pt records epoch 3 as the best, model.pt still holds epoch 1.
    out = copy_run(trained_run, tmp_path)
    last = read_checkpoint(out / "last.pt")
    last["training"]["best"] = last["training"]["history"][-1]
    save_checkpoint(unstamped(last), out / "last.pt")
    assert read_checkpoint(out / "model.pt")["training"]["epoch"] == 1
    (out / ".model.pt.0123456789ab.tmp").write_bytes(b"torn")  # what the kill left
    best = train(tiny_config(shapes_json, out, feature_cache, epochs=3, resume=True))
    assert best["epoch"] == 3
    repaired = read_checkpoint(out / "model.pt")
    assert repaired["training"]["epoch"] == 3 and repaired["metrics"] == last["metrics"]
    for key, value in last["decoder"]["state_dict"].items():
        assert torch.equal(repaired["decoder"]["state_dict"][key], value), key
    assert "optimizer" not in repaired["training"]
    assert not list(out.glob(".*.tmp"))


def test_a_best_epoch_whose_weights_are_gone_is_an_error_on_resume(tmp_path, trained_run, shapes_json, feature_cache):
    out = copy_run(trained_run, tmp_path)
    (out / "model.pt").unlink()  # last.pt (epoch 3) records epoch 1 as the best
    with pytest.raises(CaptionerError, match="model.pt does not hold epoch 1"):
        train(tiny_config(shapes_json, out, feature_cache, epochs=4, resume=True))


def test_a_non_finite_loss_stops_training_without_writing_nan(tmp_path, shapes_json, feature_cache, monkeypatch):
    out = tmp_path / "run"
    real_loss, real_epoch = training.caption_loss, training.train_one_epoch
    epochs = []

    def counted(*args, **kwargs):
        epochs.append(1)
        return real_epoch(*args, **kwargs)

    def exploding(*args, **kwargs):
        loss, words = real_loss(*args, **kwargs)
        return (loss * float("nan") if len(epochs) >= 2 else loss), words  # from the second epoch on

    monkeypatch.setattr(training, "train_one_epoch", counted)
    monkeypatch.setattr(training, "caption_loss", exploding)
    with pytest.raises(CaptionerError, match="epoch 2.*not finite"):
        train(tiny_config(shapes_json, out, feature_cache, epochs=3))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]
    assert "NaN" not in (out / "metrics.jsonl").read_text()
    assert read_checkpoint(out / "last.pt")["training"]["epoch"] == 1


# --- the feature cache ---------------------------------------------------------------------


@pytest.fixture
def encoder():
    torch.manual_seed(0)
    return Encoder(EncoderConfig(name="resnet18", image_size=32, pool_grid=1)).freeze()


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(features, "SHARD_SIZE", 4)


def cache_features(encoder, paths, cache):
    return cached_features(encoder, paths, cache_dir=cache, device=torch.device("cpu"))


def shards_of(cache):
    (root,) = [p for p in cache.iterdir() if p.is_dir()]
    return root, sorted(root.glob("shard-*.pt"))


@pytest.mark.parametrize("damage", ["swapped", "truncated", "deleted", "garbled"])
def test_a_damaged_shard_is_recomputed_with_a_warning(capsys, tmp_path, shapes, encoder, small_shards, damage):
    paths = [r.path for r in shapes.split("train")[:8]]
    reference = cache_features(encoder, paths, tmp_path / "cache")
    root, (first, second) = shards_of(tmp_path / "cache")
    if damage == "swapped":  # another valid shard in its place: the right shape, the wrong images
        shutil.copy(first, second)
    elif damage == "truncated":
        second.write_bytes(second.read_bytes()[:100])
    elif damage == "deleted":
        second.unlink()
    else:
        garble(second, size=64)
    capsys.readouterr()
    again = cache_features(encoder, paths, tmp_path / "cache")
    assert torch.equal(again, reference)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning" in err and "recomput" in err, err
    capsys.readouterr()
    cache_features(encoder, paths, tmp_path / "cache")  # repaired: no second warning
    assert capsys.readouterr().err == ""
    assert len(list(root.glob("shard-*.pt"))) == 2  # the damaged one replaced, not kept beside


@pytest.mark.parametrize("content", ["", "{garbled", "[]", '{"version": 2, "shards": {}, "images": {"x": 1}}'])
def test_a_garbled_or_empty_index_is_rebuilt_with_a_warning(capsys, tmp_path, shapes, encoder, small_shards, content):
    paths = [r.path for r in shapes.split("train")[:8]]
    reference = cache_features(encoder, paths, tmp_path / "cache")
    root, _ = shards_of(tmp_path / "cache")
    (root / "index.json").write_text(content)
    capsys.readouterr()
    assert torch.equal(cache_features(encoder, paths, tmp_path / "cache"), reference)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "index.json" in err and "recomput" in err, err
    listed = json.loads((root / "index.json").read_text())["shards"]
    for path in root.glob("shard-*.pt"):  # the damaged index's shards, as if from a day ago
        if path.name not in listed:
            os.utime(path, (path.stat().st_atime, path.stat().st_mtime - 86400))
    cache_features(encoder, paths, tmp_path / "cache")
    assert sorted(p.name for p in root.glob("shard-*.pt")) == sorted(listed)


def test_the_cache_index_records_each_shards_digest_and_images(tmp_path, shapes, encoder, small_shards):
    paths = [r.path for r in shapes.split("train")[:6]]
    cache_features(encoder, paths, tmp_path / "cache")
    root, shards = shards_of(tmp_path / "cache")
    index = json.loads((root / "index.json").read_text())
    assert sorted(index["shards"]) == [s.name for s in shards]
    assert sorted(len(s["images"]) for s in index["shards"].values()) == [2, 4]
    assert all(len(s["sha256"]) == 64 for s in index["shards"].values())


# --- data sets -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shapes_world,message",
    [
        ([1, 2], "shapes_world"),
        ({"image_size": "big"}, "image_size"),
        ({"image_size": 32, "holdout": "green:triangle"}, "holdout"),
        ({"image_size": 32, "holdout": [3]}, "holdout"),
    ],
)
def test_a_malformed_shapes_world_is_a_one_line_error(capsys, tmp_path, shapes_json, shapes_world, message):
    data = json.loads(shapes_json.read_text())
    data["shapes_world"] = shapes_world
    path = shapes_json.parent / f"bad-{random.Random(str(shapes_world)).randrange(1 << 30)}.json"
    path.write_text(json.dumps(data))
    try:
        with pytest.raises(CaptionerError, match=message):
            load_dataset(path)
        code, _, err = run(capsys, "train", "--data", path, "--out", tmp_path / "run", "--epochs", "1", "--no-progress")
        assert_one_line_error(code, err, message)
    finally:
        path.unlink()



KILL_AT_MODEL_PT = """
import os, signal, sys
from captioner import io
from captioner.cli import main

real = io.os.replace
def replace(src, dst):
    if str(dst).endswith("model.pt"):  # last.pt of the epoch is written, model.pt is not yet
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
io.os.replace = replace
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # a training subprocess killed by a real SIGKILL, then resumed
def test_a_real_sigkill_between_last_pt_and_model_pt_is_repaired_on_resume(tmp_path, shapes_json, feature_cache):
    out = tmp_path / "run"
    args = ["train", "--data", shapes_json, "--out", out, "--feature-cache", feature_cache, "--epochs", "2",
            "--no-progress", *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "progress"]]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILL_AT_MODEL_PT, *map(str, args)], env=env, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "model.pt").exists() and read_checkpoint(out / "last.pt")["training"]["epoch"] == 1
    assert list(out.glob(".model.pt.*.tmp"))  # written whole, never renamed
    resumed = subprocess.run([sys.executable, "-m", "captioner", *map(str, args), "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    last = read_checkpoint(out / "last.pt")["training"]
    assert last["epoch"] == 2 and read_checkpoint(out / "model.pt")["training"]["epoch"] == last["best"]["epoch"]
    assert not list(out.glob(".*.tmp"))
