import pytest
import torch

from captioner.checkpoint import VERSION, read_checkpoint
from captioner.errors import CaptionerError
from captioner.models.captioner import Captioner


def test_checkpoint_is_plain_data_and_round_trips_to_identical_captions(trained_run, shapes, tmp_path):
    path = trained_run / "model.pt"
    state = torch.load(path, weights_only=True)  # plain data: no pickled classes
    assert state["format"] == "captioner" and state["version"] == VERSION
    assert state["vocab"][:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert state["embedding"]["source"] == "trained" and "coverage_words" in state["embedding"]
    assert state["encoder"]["config"]["name"] == "resnet18" and state["encoder"]["weights"] == "none"
    assert "val_cider" in state["metrics"]

    images = [r.path for r in shapes.split("test")]
    model = Captioner.load(path)
    for options in (dict(mode="greedy"), dict(mode="beam", beam_size=3, num_captions=2)):
        first = model.caption(images, **options)
        # Saved again and reloaded from the file alone: same captions, same scores.
        torch.save(state, tmp_path / "copy.pt")
        again = Captioner.load(tmp_path / "copy.pt").caption(images, **options)
        assert first == again


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
        torch.save(state, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CaptionerError, match=message):
        read_checkpoint(path)
    with pytest.raises(CaptionerError, match="model file not found"):
        read_checkpoint(tmp_path / "absent.pt")
