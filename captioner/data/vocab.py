"""Tokenisation and the word vocabulary.

Tokens come from nltk's Treebank tokenizer, which is rule-based and needs no downloaded data
(``word_tokenize`` needs the punkt model, which cannot be fetched offline). Captions are lower-cased
and punctuation is dropped, as in Karpathy's preprocessing of COCO and Flickr.
"""

from __future__ import annotations

import functools
import string
from collections import Counter
from collections.abc import Iterable, Sequence

from captioner.errors import CaptionerError

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)

_punctuation = set(string.punctuation) | {"``", "''", "--", "..."}


@functools.cache
def _tokenizer():
    # Imported on first use: nltk takes about a second to import, and captioning (the service, a
    # batch job, a Ray actor) only turns ids into words, never tokenises.
    from nltk.tokenize import TreebankWordTokenizer

    return TreebankWordTokenizer()


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens of ``text``, punctuation removed."""
    return [t for t in _tokenizer().tokenize(text.lower()) if t not in _punctuation]


class Vocabulary:
    """Maps words to ids and back. Ids 0..3 are ``<pad> <start> <end> <unk>``.

    Args:
        words: the vocabulary's words, specials first, in id order.
    """

    def __init__(self, words: Sequence[str]):
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            raise CaptionerError(f"a vocabulary must start with {' '.join(SPECIALS)}")
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise CaptionerError("a vocabulary must not repeat a word")
        self.pad, self.start, self.end, self.unk = (self.index[s] for s in SPECIALS)

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1) -> Vocabulary:
        """Vocabulary of the words seen at least ``min_count`` times, most frequent first.

        Ties are broken alphabetically so the same captions always give the same ids.
        """
        counts = Counter(t for c in captions for t in tokenize(c))
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        if not kept:
            raise CaptionerError(f"no word occurs at least {min_count} times in the training captions")
        return cls(list(SPECIALS) + kept)

    def __len__(self) -> int:
        return len(self.words)

    def grown(self, captions: Iterable[str], min_count: int = 1) -> Vocabulary:
        """This vocabulary and, after its words, those of ``captions`` seen at least ``min_count``
        times that it lacks (most frequent first): every old word keeps its id."""
        new = Vocabulary.build(captions, min_count).words[len(SPECIALS) :]
        return Vocabulary(self.words + [w for w in new if w not in self.index])

    def encode(self, text: str) -> list[int]:
        """``<start> w1 ... wn <end>`` as ids; unknown words map to ``<unk>``."""
        ids = [self.index.get(t, self.unk) for t in tokenize(text)]
        return [self.start, *ids, self.end]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of generated ids: stops at ``<end>``, skips ``<start>`` and ``<pad>``."""
        words = []
        for i in ids:
            if i == self.end:
                break
            if i in (self.start, self.pad):
                continue
            words.append(self.words[i])
        return " ".join(words)
