import pytest
import torch

from captioner.checkpoint import VERSION, content_digest, file_digest, read_checkpoint, save_checkpoint
from captioner.errors import CaptionerError
from captioner.evaluation import encode_captions
from captioner.features import compute_features
from captioner.models.captioner import Captioner
from captioner.options import TrainConfig
from captioner.training import Run, build_model, train_one_epoch

from tests.helpers import tiny_config


def test_an_in_memory_model_saved_and_reloaded_captions_identically(shapes, tmp_path):
    # A model built and trained in memory, not read from a file: saving must capture everything
    # that decides its captions (configs, weights, vocabulary, the frozen embedding).
    config = tiny_config(tmp_path / "unused.json", tmp_path / "run", tmp_path / "cache", embed_dim=16)
    model = build_model(config, shapes, tmp_path, torch.device("cpu"))
    records = shapes.split("train")
    features = torch.cat(list(compute_features(model.encoder, [r.path for r in records], device=torch.device("cpu"))))
    optimizer = torch.optim.Adam([p for p in model.decoder.parameters() if p.requires_grad], lr=1e-2)
    captions = encode_captions(records, model.vocab, 30)
    run = Run.alone(TrainConfig(data="unused", out="unused", batch_size=16, clip_norm=5.0, progress=False), optimizer, features, captions)
    train_one_epoch(model.decoder, features, captions, run, pad=model.vocab.pad, generator=torch.Generator().manual_seed(0))
    model.eval()
    path = tmp_path / "model.pt"
    save_checkpoint(model.to_checkpoint(metrics={"epoch": 1}), path)

    state = torch.load(path, weights_only=True)  # plain data: no pickled classes
    assert state["format"] == "captioner" and state["version"] == VERSION
    assert state["vocab"] == list(model.vocab.words) and state["metrics"] == {"epoch": 1}
    assert state["embedding"] == model.embedding and state["embedding"]["source"] == "trained"
    assert state["encoder"]["config"]["name"] == "resnet18" and state["encoder"]["weights"] == "none"
    reloaded = Captioner.load(path)
    assert reloaded.embedding == model.embedding and reloaded.metrics == {"epoch": 1}
    assert reloaded.created == state["created"] and reloaded.version == file_digest(path)
    images = [r.path for r in shapes.split("test")]
    model.encoder.use_channels_last()  # as Captioner.load runs a CNN on the CPU: the same arithmetic
    for options in (dict(mode="greedy"), dict(mode="beam", beam_size=3, num_captions=2)):
        assert reloaded.caption(images, **options) == model.caption(images, **options)


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "cannot be read"),
        (b"\x89PNG\r\n\x1a\n garbage", "cannot be read"),
        ("foreign", "not a captioner model"),
        ("future", "format version 99"),
        ("old", "format version 1; .*retrain"),
        ("incomplete", "incomplete captioner model: no decoder"),
    ],
)
def test_bad_model_files_are_clear_errors(tmp_path, trained_run, content, message):
    path = tmp_path / "model.pt"
    if content == "foreign":
        torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    elif content in ("future", "old", "incomplete"):
        state = torch.load(trained_run / "model.pt", weights_only=True)
        state["version"] = {"future": 99, "old": 1}.get(content, state["version"])
        if content == "incomplete":
            del state["decoder"]
            del state["checksum"]
            state["checksum"] = content_digest(state)  # whole, consistent, but no decoder
        torch.save(state, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CaptionerError, match=message):
        Captioner.load(path)
    with pytest.raises(CaptionerError, match="model file not found"):
        read_checkpoint(tmp_path / "absent.pt")


def test_a_state_read_from_an_older_file_is_saved_as_the_current_version(tmp_path):
    # captioner calibrate reads a model, adds to it and writes it back: the file it writes has
    # the current version and its checksum, whatever version it was read from.
    save_checkpoint({"version": 5, "created": "2026-01-01T00:00:00+00:00", "weights": torch.ones(2)}, tmp_path / "m.pt")
    state = read_checkpoint(tmp_path / "m.pt")
    assert state["version"] == VERSION and state["created"] == "2026-01-01T00:00:00+00:00"
