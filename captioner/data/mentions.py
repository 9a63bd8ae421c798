"""Held-out words: which captions mention an object, which training images leave the paired data,
and the F1 of mention by which novel-object captioning is scored.

The protocol of Deep Compositional Captioning (Hendricks et al. 2016), on Flickr8k: a held-out
word ("bicycle", with its synonyms "bike") is kept out of the paired image-caption training data
by leaving out every training image any of whose captions says it, in the singular or the plural;
text alone (word2vec, the vocabulary) may still read those captions. On test, an image shows the
object when at least ``SHOWS`` of its references say the word, and a caption mentions it when it
says the word; each word is scored by the F1 of mention over the images.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from captioner.data.vocab import tokenize
from captioner.errors import CaptionerError

SHOWS = 2  # references that must say the word for an image to show the object
TEXT_ONLY = "train_text"  # the split of training images whose captions only text may read
# DCC's eight objects with a matching ImageNet class, on Flickr8k (scripts/novel_objects.sh).
NOVEL_OBJECTS = ("bicycle,bike", "swing", "horse", "basketball", "car", "motorcycle,motorbike", "boat", "bench")


def parse_groups(words: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """``["bicycle,bike", "horse"]`` -> ``(("bicycle", "bike"), ("horse",))``: each group a word and
    its synonyms, the first naming it."""
    groups = []
    for item in words:
        group = tuple(w.strip().lower() for w in item.split(",") if w.strip())
        if not group or any(not w.isalpha() for w in group):
            raise CaptionerError(f"a held-out word is letters, its synonyms after commas (bicycle,bike), not {item!r}")
        groups.append(group)
    return tuple(groups)


def forms(group: Sequence[str]) -> frozenset[str]:
    """The words that mention a group: each word and its plural (-s, -es, -y -> -ies)."""
    out = set()
    for word in group:
        out |= {word, word + "s", word + "es"}
        if word.endswith("y"):
            out.add(word[:-1] + "ies")
    return frozenset(out)


def mentions(caption: str | Sequence[str], group: Sequence[str]) -> bool:
    """Whether a caption (text or tokens) says a word of ``group`` or its plural."""
    tokens = tokenize(caption) if isinstance(caption, str) else caption
    return not forms(group).isdisjoint(tokens)


def text_only(records: Iterable, groups: Sequence[Sequence[str]]) -> list:
    """``records`` with every training image any of whose captions mentions a held-out word moved
    to the ``TEXT_ONLY`` split: out of the paired data, its captions still read by text alone."""
    out = []
    for r in records:
        said = r.split == "train" and any(mentions(c, g) for c in r.captions for g in groups)
        out.append(replace(r, split=TEXT_ONLY) if said else r)
    return out


def mention_f1(
    captions: Mapping[str, str], references: Mapping[str, Sequence[str]], groups: Sequence[Sequence[str]]
) -> dict[str, dict]:
    """Per group (by its first word): ``{"f1", "precision", "recall", "images"}`` of mentioning it,
    over the images of ``captions``; ``images`` is how many show it (``SHOWS`` references say it)."""
    report = {}
    for group in groups:
        tp = fp = fn = shown = 0
        for image, caption in captions.items():
            shows = sum(mentions(ref, group) for ref in references[image]) >= SHOWS
            said = mentions(caption, group)
            shown += shows
            tp, fp, fn = tp + (shows and said), fp + (said and not shows), fn + (shows and not said)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        report[group[0]] = {"f1": f1, "precision": precision, "recall": recall, "images": shown}
    return report
