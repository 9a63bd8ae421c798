"""Starting from a trained model (--init): the vocabulary grows, the old model is undisturbed, the
new images join its memory, and a model of another encoder is refused."""

import pytest
import torch

from captioner.consensus import CaptionMemory
from captioner.data.datasets import load_dataset
from captioner.data.vocab import Vocabulary, tokenize
from captioner.decoding import generate
from captioner.embeddings import grow_embedding
from captioner.errors import CaptionerError
from captioner.features import cached_features
from captioner.models.captioner import Captioner
from captioner.options import DecodeOptions
from captioner.training import grown_model, train
from tests.helpers import tiny_config

NEW = ["a purple hexagon beside a teal kite", "the teal kite above a purple hexagon", "one purple hexagon"]


def test_a_vocabulary_grows_at_its_end_and_old_words_keep_their_ids():
    old = Vocabulary.build(["a red circle", "a blue square"])
    grown = old.grown(["a red hexagon", "a hexagon and a kite", "a kite"], min_count=2)
    assert grown.words[: len(old)] == old.words and grown.words[len(old) :] == ["hexagon", "kite"]


def test_new_words_get_vectors_trained_beside_the_old_ones_which_stay_as_they_were():
    old_vocab = Vocabulary.build(["a red circle left of a blue square"] * 3)
    old = torch.randn(len(old_vocab), 8)
    vocab = old_vocab.grown(["a red hexagon left of a blue square"] * 5)
    embedding = grow_embedding(old, vocab, [tokenize("a red hexagon left of a blue square")] * 5, seed=0)
    assert embedding.matrix.shape == (len(vocab), 8) and embedding.info["new_words"] == 1
    torch.testing.assert_close(embedding.matrix[: len(old)], old)  # held fixed while word2vec trained
    assert embedding.matrix[vocab.index["hexagon"]].abs().sum() > 0


def _csv(tmp_path, records, captions):
    path = tmp_path / "new.csv"
    path.write_text("image,caption,split\n" + "".join(f"{r.path},{c},{r.split}\n" for r in records for c in captions))
    return path


def test_the_grown_model_captions_old_images_as_the_old_one_did_before_any_step(trained_run, shapes, tmp_path, feature_cache):
    old = Captioner.load(trained_run / "model.pt")
    data = _csv(tmp_path, shapes.split("train")[:6] + shapes.split("val")[:2], NEW)
    config = tiny_config(data, tmp_path / "run", feature_cache, init=str(trained_run / "model.pt"))
    grown = grown_model(config, load_dataset(data)).eval()
    new = {w for c in NEW for w in tokenize(c)} - set(old.vocab.words)
    assert {"hexagon", "teal", "kite"} <= new
    assert set(grown.vocab.words[len(old.vocab) :]) == new and grown.vocab.words[: len(old.vocab)] == old.vocab.words
    features = cached_features(old.encoder, [r.path for r in shapes.split("val")], cache_dir=feature_cache, device=torch.device("cpu"))
    options = DecodeOptions(max_length=20)
    before = [h[0] for h in generate(old.decoder, features, options, old.ids)]
    after = [h[0] for h in generate(grown.decoder, features, options, grown.ids)]
    assert [h.tokens for h in after] == [h.tokens for h in before]
    # The new words take a little probability from the old ones (each starts e^2 times less likely
    # than the old word it copies): a few hundredths of a nat a word, on this barely trained model.
    shift = [(b.log_prob - a.log_prob) / len(b.tokens) for a, b in zip(after, before)]
    assert all(0 <= s < 0.05 for s in shift), shift


def test_a_model_of_another_encoder_is_refused_in_one_line(trained_run, shapes, tmp_path):
    data = _csv(tmp_path, shapes.split("train")[:4] + shapes.split("val")[:1], NEW)  # a CSV: photos, a photo encoder
    config = tiny_config(data, tmp_path / "run", tmp_path / "cache", init=str(trained_run / "model.pt"), encoder=None, image_size=None, pool_grid=None)
    with pytest.raises(CaptionerError, match="has the encoder resnet18.*start from a model of the same encoder"):
        train(config)


@pytest.mark.slow
def test_fine_tuning_from_a_trained_model_learns_new_words(trained_run, shapes, tmp_path, feature_cache):
    old = Captioner.load(trained_run / "model.pt")
    records = shapes.split("train") + shapes.split("val")[:3]
    data = _csv(tmp_path, records, NEW)
    config = tiny_config(
        data, tmp_path / "run", feature_cache, init=str(trained_run / "model.pt"),
        epochs=15, lr=1e-2, rerank=0,
    )  # fmt: skip
    train(config)
    tuned = Captioner.load(tmp_path / "run" / "model.pt")
    assert {"hexagon", "teal", "kite"} <= set(tuned.vocab.words) - set(old.vocab.words)
    assert tuned.data["started_from"]["version"] == old.version
    torch.testing.assert_close(tuned.decoder.embed.weight[: len(old.vocab)], old.decoder.embed.weight)
    said = tuned.caption([records[0].path], max_length=10)[0][0]["text"]
    assert "hexagon" in said or "kite" in said, said


def test_new_training_images_join_the_caption_memory():
    memory = CaptionMemory(torch.randn(3, 4), [[["a", "dog"]]] * 3, neighbours=2)
    grown = memory.extended(torch.randn(2, 4 * 9), 9, [[["a", "kite"]], [["two", "kites"]]])
    assert len(grown.captions) == 5 and grown.captions[3:] == [[["a", "kite"]], [["two", "kites"]]]
    torch.testing.assert_close(grown.features[:3], memory.features)
    with pytest.raises(CaptionerError, match="not those of the caption memory's encoder"):
        memory.extended(torch.randn(2, 5 * 9), 9, [[["a"]], [["b"]]])
