import pytest

from captioner.data.vocab import SPECIALS, Vocabulary, tokenize
from captioner.errors import CaptionerError


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A Dog, running -- on the beach!") == ["a", "dog", "running", "on", "the", "beach"]
    assert tokenize("It's a \"red\" ball.") == ["it", "'s", "a", "red", "ball"]


def test_build_orders_by_frequency_and_applies_min_count():
    vocab = Vocabulary.build(["a red ball", "a blue ball", "a red cube"], min_count=2)
    assert vocab.words[: len(SPECIALS)] == list(SPECIALS)
    assert vocab.words[len(SPECIALS) :] == ["a", "ball", "red"]  # blue and cube seen once


def test_encode_decode_round_trip_with_unknown_words():
    vocab = Vocabulary.build(["a red ball"])
    ids = vocab.encode("A red kite")
    assert ids[0] == vocab.start and ids[-1] == vocab.end
    assert ids[3] == vocab.unk
    assert vocab.decode(ids) == "a red <unk>"
    assert vocab.decode([vocab.index["red"], vocab.end, vocab.index["ball"]]) == "red"


def test_invalid_vocabularies_are_refused():
    with pytest.raises(CaptionerError, match="start with"):
        Vocabulary(["a", "b"])
    with pytest.raises(CaptionerError, match="no word occurs"):
        Vocabulary.build(["a b"], min_count=5)
