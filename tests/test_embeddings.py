from collections import Counter

import numpy as np
import pytest
import torch
from gensim.models import KeyedVectors

from captioner.data.vocab import Vocabulary, tokenize
from captioner.embeddings import _fallback_vector, build_embedding, load_vectors, train_word2vec, word_embedding
from captioner.errors import CaptionerError

CAPTIONS = ["a red circle left of a blue square", "a big green star", "there is a small red circle"] * 5


@pytest.fixture
def vocab():
    return Vocabulary.build(CAPTIONS)


def _vectors(words, dim=8, seed=0):
    kv = KeyedVectors(vector_size=dim)
    kv.add_vectors(words, np.random.default_rng(seed).normal(size=(len(words), dim)).astype(np.float32))
    return kv


@pytest.mark.parametrize("binary,name", [(True, "vectors.bin"), (False, "vectors.txt")])
def test_pretrained_file_in_word2vec_format_gives_its_vectors(tmp_path, vocab, binary, name):
    # Stands in for GoogleNews-vectors-negative300.bin: same format, written by gensim.
    kv = _vectors(["red", "Circle", "square", "star", "unrelated"])
    kv.save_word2vec_format(str(tmp_path / name), binary=binary)
    sentences = [tokenize(c) for c in CAPTIONS]
    emb = word_embedding(vocab, sentences, vectors_path=tmp_path / name, dim=None, seed=0)
    assert emb.matrix.shape == (len(vocab), 8)
    # Centred, then one global factor to unit variance: differences between words are kept exactly.
    factor = emb.info["rescaled_by"]
    rows = emb.matrix[1:]
    assert rows.std(unbiased=False).item() == pytest.approx(1.0, rel=1e-3) and rows.mean(0).abs().max() < 1e-5
    red, square = emb.matrix[vocab.index["red"]], emb.matrix[vocab.index["square"]]
    assert torch.allclose(red - square, torch.tensor(kv["red"] - kv["square"]) * factor, atol=1e-5)
    # Lower-case tokens find capitalised entries, as in GoogleNews.
    circle = emb.matrix[vocab.index["circle"]]
    assert torch.allclose(red - circle, torch.tensor(kv["red"] - kv["Circle"]) * factor, atol=1e-5)
    assert emb.matrix[vocab.pad].abs().sum() == 0
    words = len(vocab) - 4
    assert emb.info["coverage_words"] == pytest.approx(4 / words)
    counts = Counter(t for s in sentences for t in s)
    found = sum(counts[w] for w in ("red", "circle", "square", "star"))
    assert emb.info["coverage_tokens"] == pytest.approx(found / sum(counts.values()))
    assert emb.info["source"] == "file" and emb.info["file"] == name


def test_missing_words_get_deterministic_vectors(vocab):
    # Same word, same vector, in any run and whatever else is in the vocabulary.
    assert np.array_equal(_fallback_vector("blue", 8, 0.5), _fallback_vector("blue", 8, 0.5))
    assert not np.array_equal(_fallback_vector("blue", 8, 0.5), _fallback_vector("green", 8, 0.5))
    kv = _vectors(["red"])
    a = build_embedding(vocab, kv, Counter(), {"source": "test"})
    assert torch.equal(a.matrix, build_embedding(vocab, kv, Counter(), {"source": "test"}).matrix)
    blue, green = a.matrix[vocab.index["blue"]], a.matrix[vocab.index["green"]]
    assert not torch.equal(blue, green) and blue.abs().sum() > 0
    assert a.info["missing_words"] == len(vocab) - 4 - 1


def test_word2vec_trained_on_captions_is_repeatable(vocab):
    sentences = [tokenize(c) for c in CAPTIONS]
    a = train_word2vec(sentences, dim=16, seed=3)
    b = train_word2vec(sentences, dim=16, seed=3)
    assert np.array_equal(a["red"], b["red"])
    emb = word_embedding(vocab, sentences, vectors_path=None, dim=16, seed=3)
    assert emb.info["source"] == "trained" and emb.info["coverage_words"] == 1.0


def test_wrong_dimension_and_bad_files_are_clear_errors(tmp_path, vocab):
    path = tmp_path / "vectors.bin"
    _vectors(["red"]).save_word2vec_format(str(path), binary=True)
    with pytest.raises(CaptionerError, match="8-dimensional vectors but --embed-dim is 300"):
        word_embedding(vocab, [["red"]], vectors_path=path, dim=300, seed=0)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00\xffnot vectors at all\n" * 10)
    with pytest.raises(CaptionerError, match="cannot read word vectors"):
        load_vectors(garbage)
    with pytest.raises(CaptionerError, match="not found"):
        load_vectors(tmp_path / "absent.bin")
