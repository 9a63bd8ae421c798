"""Concepts: what the CNN's own ImageNet classifier says it sees, as words of the captions.

A photo encoder with ImageNet weights carries a 1,000-class classifier that captions never had to
teach: it knows an espresso, a daisy, a mountain bike. The encoder computes its probabilities in
the same forward pass as the grid of features (``Encoder.forward_features``), and each class maps
to one caption word, so that the decoder can read the concepts and say their words
(``models/decoder.py``; Wu et al. 2016 and Yao et al. 2017 feed such concepts to the language model,
Yao et al.'s LSTM-C copies them into the caption).

The map is built, not typed: from the lemmas and WordNet definitions that timm ships for every
class (``timm.data.ImageNetInfo``) and the model's vocabulary, by ``class_word``'s rules in order:

1. a short table of reviewed exceptions (``EXCEPTIONS``): the 118 dog breeds, whose names and
   definitions rarely say "dog", and the domestic cats;
2. one of the class's lemmas that is a word of the captions ("swing", "basketball", "canoe");
3. the head noun of its definition ("sorrel: a horse of a brownish orange ..." -> "horse"; "a breed
   of tiny short-haired dog" -> "dog"), or a compound ending in a caption word ("a fast motorboat" -> "boat");
4. the last word of a lemma of several words ("park bench" -> "bench", "sports car" -> "car").

A class none of them places is unmapped (``ConceptMap.unmapped`` lists them); its probability
reaches no word.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from captioner.errors import CaptionerError

NUM_CLASSES = 1000
# Reviewed by hand: ImageNet's class index ranges whose names and definitions do not say the word
# people use (a "Chihuahua", a "Bernese mountain dog", a "tabby").
EXCEPTIONS = {range(151, 269): "dog", range(281, 286): "cat"}
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
    chunk = re.split(r"[;:,()]", definition.lower(), maxsplit=1)[0]
    words = _WORD.findall(chunk)
    head: list[str] = []
    for i, word in enumerate(words):
        if word == "of" and (not head or head[-1] in _OF_HEADS):
            return definition_head(" ".join(words[i + 1 :]))
        if "-" in word:  # a compound adjective ("short-haired", "flat-bottomed") is never the head
            continue
        if word in _HEAD_ENDS or (word.endswith(("ed", "ing")) and set(head) - _MODIFIERS):
            break
        if word not in ("a", "an", "the", "or", "and") and not word.endswith("ly"):  # nor an article or adverb
            head.append(word)
    nouns = [w for w in head if w not in _MODIFIERS]
    return nouns[-1] if nouns else None


def _compound_tail(word: str, vocabulary: set[str]) -> str | None:
    """A compound of two words, the second a caption word of 4 or more letters: "speedboat" -> "boat"."""
    for start in range(3, len(word) - 3):
        if word[start:] in vocabulary:
            return word[start:]
    return None


def class_word(index: int, lemmas: Sequence[str], definition: str, vocabulary: set[str]) -> str | None:
    """The caption word of one class by the module's rules, or None."""
    for indices, word in EXCEPTIONS.items():
        if index in indices:
            return word if word in vocabulary else None
    for lemma in lemmas:
        if lemma.lower() in vocabulary:
            return lemma.lower()
    head = definition_head(definition)
    if head:
        if head in vocabulary:
            return head
        if tail := _compound_tail(head, vocabulary):
            return tail
    for lemma in lemmas:
        words = lemma.lower().replace("-", " ").split()
        if len(words) > 1 and words[-1] in vocabulary:
            return words[-1]
        if len(words) == 1 and (tail := _compound_tail(words[0], vocabulary)):
            return tail
    return None


@dataclass(frozen=True)
class ConceptMap:
    """Each classifier class's caption word (None: unmapped), for one vocabulary."""

    words: tuple[str | None, ...]

    @classmethod
    def build(cls, vocabulary: Sequence[str]) -> ConceptMap:
        known = set(vocabulary)
        return cls(tuple(class_word(i, lemmas, d, known) for i, (lemmas, d) in enumerate(imagenet_classes())))

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
