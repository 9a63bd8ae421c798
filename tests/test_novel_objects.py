"""Novel objects: held-out words leave the image-caption data, and their F1 of mention is scored."""

import pytest
import torch

import captioner.training as training
from captioner.data.mentions import TEXT_ONLY, forms, mention_f1, mentions, parse_groups, text_only
from captioner.data.vocab import tokenize
from captioner.errors import CaptionerError
from captioner.features import cached_features
from captioner.models.captioner import Captioner
from tests.helpers import tiny_config


def test_a_caption_mentions_a_word_or_its_plural_or_a_synonym():
    bicycle = ("bicycle", "bike")
    assert mentions("Two men ride bikes down a hill", bicycle) and mentions("a boy on a bicycle .", bicycle)
    assert not mentions("a biker in a red jacket", bicycle)  # another word, not a form of it
    assert {"bench", "benches", "benchs"} <= forms(("bench",)) and "ponies" in forms(("pony",))
    assert parse_groups(["bicycle,bike", "Horse"]) == (("bicycle", "bike"), ("horse",))
    with pytest.raises(CaptionerError, match="synonyms after commas"):
        parse_groups(["bi cycle"])


def test_f1_of_mention_counts_an_image_as_showing_what_two_references_say():
    references = {
        "a": ["a horse runs", "a brown horse", "a field"],  # shows a horse
        "b": ["a horse statue", "a man", "a street"],  # one reference only: does not
        "c": ["two horses", "horses in a field", "a farm"],
    }
    report = mention_f1({"a": "a horse in a field", "b": "a horse", "c": "a dog"}, references, [("horse",)])["horse"]
    assert report["images"] == 2
    assert (report["precision"], report["recall"]) == (0.5, 0.5) and report["f1"] == 0.5


def test_held_out_images_move_to_the_text_only_split(shapes):
    records = text_only(shapes.records, [("triangle",)])
    moved = [r for r in records if r.split == TEXT_ONLY]
    assert moved and all(any(mentions(c, ("triangle",)) for c in r.captions) for r in moved)
    kept = [r for r in records if r.split == "train"]
    assert kept and not any(mentions(c, ("triangle",)) for r in kept for c in r.captions)
    assert len(moved) + len(kept) == len(shapes.split("train"))


def test_no_held_out_image_reaches_a_training_step_or_the_caption_memory(shapes_json, shapes, tmp_path, monkeypatch):
    """On the batches themselves: every caption a cross-entropy step reads, every image feature a
    step or the self-critical epoch reads, and every caption the memory keeps."""
    held = [r for r in text_only(shapes.records, [("triangle",)]) if r.split == TEXT_ONLY]
    steps, critical = [], []
    loss = training.caption_loss

    def recording_loss(decoder, features, ids, pad):
        steps.append((features.detach().clone(), ids.clone()))
        return loss(decoder, features, ids, pad)

    def recording_epoch(decoder, features, *args, **kwargs):
        critical.append(features.clone())
        return {"train_reward": 0.0, "grad_norm": 0.0, "grad_norm_max": 0.0, "clip_rate": 0.0}

    monkeypatch.setattr(training, "caption_loss", recording_loss)
    monkeypatch.setattr(training, "self_critical_epoch", recording_epoch)
    config = tiny_config(
        shapes_json, tmp_path / "run", tmp_path / "cache", epochs=1, self_critical_epochs=1, rerank=3,
        holdout_words=["triangle"], encoder_weights="none", encoder="resnet18", pool_grid=1,
    )  # fmt: skip
    training.train(config)
    model = Captioner.load(tmp_path / "run" / "model.pt")
    held_features = cached_features(model.encoder, [r.path for r in held], cache_dir=tmp_path / "cache", device=torch.device("cpu"))
    assert steps and critical
    for features, ids in steps:
        said = {model.vocab.words[i] for i in ids.flatten().tolist()}
        assert not said & forms(("triangle",))
        assert not (torch.cdist(features.float(), held_features.float()) < 1e-4).any()
    assert not (torch.cdist(critical[0].float(), held_features.float()) < 1e-4).any()
    assert len(critical[0]) == len(shapes.split("train")) - len(held)
    assert not any(mentions(c, ("triangle",)) for image in model.memory.captions for c in image)
    assert "triangle" in model.vocab.index  # text alone still read the held-out captions
    assert model.data["held_out_words"] == [["triangle"]] and model.data["images"][TEXT_ONLY] == len(held)
