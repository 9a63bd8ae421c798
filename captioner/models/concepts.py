"""Concepts: what the CNN's own ImageNet classifier says it sees, as words of the captions.

A photo encoder with ImageNet weights carries a 1,000-class classifier that captions never had to
teach: it knows an espresso, a daisy, a mountain bike. The encoder computes its probabilities in
the same forward pass as the grid of features (``Encoder.forward_features``), and each class maps
to one caption word, so that the decoder can read the concepts and say their words
(``models/decoder.py``; Wu et al. 2016 and Yao et al. 2017 feed such concepts to the language model,
Yao et al.'s LSTM-C copies them into the caption).

The map is built, not typed: from the lemmas and WordNet definitions that timm ships for every
class (``timm.data.ImageNetInfo``) and the model's vocabulary (``class_word``): a short table of
reviewed exceptions (``EXCEPTIONS``: the 118 dog breeds, whose names and definitions rarely say
"dog", and the domestic cats), else of the words that could name the class (``candidates``: a
lemma that is a caption word, "swing"; the head noun of its definition, "sorrel: a horse of a
brownish orange ..." -> "horse", "a breed of tiny short-haired dog" -> "dog", "a fast motorboat"
-> "boat"; the last word of a lemma of several words, "park bench" -> "bench"): the class's own
name when the captions say it often, else the candidate they say most (a "canoe" is "small and
light boat", and people say "boat").

A class with no candidate is unmapped (``ConceptMap.unmapped`` lists them); its probability
reaches no word.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass

from captioner.errors import CaptionerError

NUM_CLASSES = 1000
# Reviewed by hand: ImageNet's class index ranges whose names and definitions do not say the word
# people use (a "Chihuahua", a "Bernese mountain dog", a "tabby").
EXCEPTIONS = {range(151, 269): "dog", range(281, 286): "cat"}
# A class's own name is its word when the captions say it this often: a well-attested specific word
# ("basketball", 271 times in Flickr8k's training captions) names its class; a rarer one ("canoe",
# 52) gives way to the word people use for it ("boat", 202). Chosen on training-caption counts alone.
NAMED = 100
# Words that a lemma or definition ends in but never name a thing ("bicycle-built-for-two", "landrover").
_NOT_NAMES = {"two", "three", "one", "over", "side", "top", "back", "front", "under", "out", "off", "up", "down", "end"}
# Words after which a definition's head noun has been said ("a horse of ...", "a bicycle with ...").
_HEAD_ENDS = {
    "of", "that", "which", "with", "for", "in", "on", "to", "from", "having", "usually", "by", "as", "at",
    "where", "who", "whose", "resembling", "especially", "typically", "often", "similar", "related", "than",
    "made", "worn", "driven", "seen", "spread", "run", "built", "held", "kept", "not", "either", "like",
}  # fmt: skip
# A head like "breed of dog" or "any of numerous plants": the noun after "of" is the head.
_OF_HEADS = {
    "breed", "kind", "type", "variety", "any", "genus", "species", "member", "one", "form", "piece", "group", "set",
    "family", "families", "kinds", "types", "order", "class", "several", "various", "numerous", "two",
}  # fmt: skip
# Words a definition puts before its noun that are never the noun ("a large spotted feline").
_MODIFIERS = {
    "large", "small", "big", "little", "tall", "short", "long", "wild", "young", "old", "common", "several", "various",
    "numerous", "many", "some", "two", "three", "black", "white", "brown", "green", "yellow", "red", "orange", "blue",
    "grey", "gray", "pink", "purple", "dark", "light", "heavy", "fast", "slow", "narrow", "wide", "round", "flat",
    "golden", "reddish", "maroon", "male", "adult", "american", "native", "visible", "circular", "thin", "horizontal",
}  # fmt: skip
_WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")


@functools.cache
def imagenet_classes() -> tuple[tuple[tuple[str, ...], str], ...]:
    """Each ImageNet-1k class, in the classifier's order: (its lemmas, its WordNet definition), as timm ships them."""
    try:
        from timm.data import ImageNetInfo
    except ImportError:
        raise CaptionerError("the ImageNet class names come with timm: pip install timm") from None
    info = ImageNetInfo()
    classes = []
    for index in range(info.num_classes()):
        lemmas, _, definition = info.index_to_description(index, detailed=True).partition(": ")
        classes.append((tuple(lemma.strip() for lemma in lemmas.split(",")), definition.strip()))
    return tuple(classes)


def definition_head(definition: str) -> str | None:
    """The head noun of a WordNet definition: "a horse of a brownish orange" -> "horse"; "any of
    several large eared seals" -> "seals"; "a breed of tiny short-haired dog" -> "dog"."""
    words = head_words(definition)
    return words[-1] if words else None


def head_words(definition: str) -> list[str]:
    """The words of a definition's first noun phrase that may be its head, the head last: "a car
    suitable for ..." -> car, suitable (an adjective this rule cannot tell from a noun)."""
    chunk = re.split(r"[;:,()]", definition.lower(), maxsplit=1)[0]
    words = _WORD.findall(chunk)
    head: list[str] = []
    for i, word in enumerate(words):
        if word == "of" and (not head or head[-1] in _OF_HEADS):
            return head_words(" ".join(words[i + 1 :]))
        if "-" in word:  # a compound adjective ("short-haired", "flat-bottomed") is never the head
            continue
        if word in _HEAD_ENDS or (word.endswith(("ed", "ing")) and set(head) - _MODIFIERS):
            break
        if word not in ("a", "an", "the", "or", "and") and not word.endswith("ly"):  # nor an article or adverb
            head.append(word)
    return [w for w in head if w not in _MODIFIERS]


def _compound_tail(word: str, vocabulary: Container[str]) -> str | None:
    """A compound of two words, the second a caption word of 4 or more letters: "speedboat" -> "boat"."""
    for start in range(3, len(word) - 3):
        if word[start:] in vocabulary:
            return word[start:]
    return None


def candidates(lemmas: Sequence[str], definition: str, vocabulary: Container[str]) -> list[str]:
    """The caption words that could name a class: its lemmas that are caption words, its
    definition's head noun (or the caption word a compound head ends in), the last word of its
    lemmas of several words (or the caption word a one-word lemma ends in)."""
    found = [lemma.lower() for lemma in lemmas if lemma.lower() in vocabulary]
    if heads := head_words(definition):  # the last that is a caption word, else a compound's tail
        known = [w for w in heads if w in vocabulary]
        found.append(known[-1] if known else _compound_tail(heads[-1], vocabulary))
    for lemma in lemmas:
        words = lemma.lower().replace("-", " ").split()
        found.append(words[-1] if len(words) > 1 and words[-1] in vocabulary else _compound_tail(words[-1], vocabulary))
    return [w for w in found if w]


def class_word(index: int, lemmas: Sequence[str], definition: str, counts: Mapping[str, int]) -> str | None:
    """The caption word of one class, or None: the reviewed exception; else a lemma of the class
    that the captions say at least ``NAMED`` times ("basketball", "swing", "helmet"); else of its
    ``candidates`` the one the captions say most ("canoe" and "speedboat" are boats, a "cab" a car).

    Args:
        counts: how often the captions say each word of the vocabulary.
    """
    for indices, word in EXCEPTIONS.items():
        if index in indices:
            return word if word in counts else None
    found = [w for w in candidates(lemmas, definition, counts) if w not in _NOT_NAMES]
    named = [lemma.lower() for lemma in lemmas if counts.get(lemma.lower(), 0) >= NAMED]
    if named:
        return named[0]
    return max(found, key=counts.__getitem__) if found else None


@dataclass(frozen=True)
class ConceptMap:
    """Each classifier class's caption word (None: unmapped), for one vocabulary."""

    words: tuple[str | None, ...]

    @classmethod
    def build(cls, counts: Mapping[str, int]) -> ConceptMap:
        """The map for a vocabulary: each of its words with how often the captions say it."""
        return cls(tuple(class_word(i, lemmas, d, counts) for i, (lemmas, d) in enumerate(imagenet_classes())))

    @property
    def unmapped(self) -> list[str]:
        """The classes no rule placed, by their first lemma."""
        classes = imagenet_classes()
        return [classes[i][0][0] for i, word in enumerate(self.words) if word is None]

    def ids(self, index: dict[str, int]) -> tuple[int, ...]:
        """Each class's vocabulary id (-1: unmapped), what the decoder reads."""
        return tuple(index[w] if w is not None else -1 for w in self.words)

    def summary(self) -> dict:
        """What a checkpoint records: how many classes were mapped, to how many words, and which were not."""
        mapped = [w for w in self.words if w is not None]
        return {"classes": len(self.words), "mapped": len(mapped), "words": len(set(mapped)), "unmapped": self.unmapped}


TOP = 5  # the concepts shown with a caption, and those a caption word counts as coming from
SEEN = 0.05  # ... when the class has at least this probability


def top_concepts(probabilities: Sequence[float], words: Sequence[str | None], k: int = TOP) -> list[dict]:
    """The ``k`` likeliest classes of one image: ``{"class", "prob", "word"}``, likeliest first."""
    classes = imagenet_classes()
    order = sorted(range(len(probabilities)), key=lambda i: -probabilities[i])[:k]
    return [{"class": classes[i][0][0], "prob": float(probabilities[i]), "word": words[i]} for i in order]


def seen_words(concepts: Sequence[dict]) -> set[str]:
    """The words of an image's top concepts (``top_concepts``) that the classifier gives at least ``SEEN``."""
    return {c["word"] for c in concepts if c["word"] and c["prob"] >= SEEN}
