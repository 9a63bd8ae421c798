"""The captions of the shapes world: writing reference captions, and parsing and checking any caption.

Both sides of the one grammar live here, because they must agree: every reference caption parses
and is true of its scene. Because the scene is known exactly, any caption - a reference or one a
model generated - can be checked for being grammatical and true (GTD evaluation, Xie et al. 2019).

Caption grammar (words in quotes; ``|`` separates alternatives, ``[]`` is optional)::

    caption  := single | clause | clause "and" clause
    single   := np | "there is" np | np "in the picture"
    clause   := np rel np | np "is" rel np | "there is" np rel np
    np       := "a" [size] colour shape         (introduces an object)
              | "the" colour shape              (re-mention, second clause only)
    size     := "small" | "little" | "large" | "big"
    rel      := "to the left of" | "left of" | "to the right of" | "right of"
              | "above" | "below" | "under"

A re-mention must name the colour and shape of a noun phrase of the first clause and
cannot follow "there is". Relations are read off grid cells only (A is left of B iff
A.col < B.col, above iff A.row < B.row), so truth never depends on pixel positions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from captioner.errors import CaptionerError
from captioner.shapes.world import COLOURS, MAX_OBJECTS, SHAPES, Scene, ShapeObject

MAX_CAPTIONS = 8  # a one-object scene has only 3 captions without size and 6 with it
_WITHOUT_SIZE_SHARE = 0.2  # share of references that leave sizes out
_INVERSE_SHARE = 0.2  # share of relations stated the other way round (B right of A)

_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_SIZE_OF_WORD = {word: size for size, words in _SIZE_WORDS.items() for word in words}
_RELATION_PHRASES = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above",),
    "below": ("below", "under"),
}
_RELATION_OF_PHRASE = {
    tuple(phrase.split()): relation
    for relation, phrases in _RELATION_PHRASES.items()
    for phrase in phrases
}
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def describe_scene(scene: Scene, rng: random.Random, n: int = 5) -> list[str]:
    """Writes distinct reference captions for a scene, paraphrasing the grammar.

    About a fifth leave sizes out; the rest state every object's size.

    Args:
        scene: the scene to describe (1-3 objects).
        rng: the only source of randomness.
        n: how many captions, 1 to 8.

    Returns:
        ``n`` distinct lower-case captions, words separated by single spaces.

    Raises:
        CaptionerError: if ``n`` is out of range or the scene has no or too many objects.
    """
    if not 1 <= n <= MAX_CAPTIONS:
        raise CaptionerError(f"captions per image must be 1 to {MAX_CAPTIONS}, got {n}")
    if not 1 <= len(scene.objects) <= MAX_OBJECTS:
        raise CaptionerError(f"can only describe scenes of 1 to {MAX_OBJECTS} objects")
    without_size = round(n * _WITHOUT_SIZE_SHARE)
    with_size_flags = [False] * without_size + [True] * (n - without_size)
    rng.shuffle(with_size_flags)
    captions: list[str] = []
    # MAX_CAPTIONS keeps both pools large enough, so redrawing duplicates terminates.
    for with_size in with_size_flags:
        caption = _random_caption(scene, rng, with_size)
        while caption in captions:
            caption = _random_caption(scene, rng, with_size)
        captions.append(caption)
    return captions


def _random_caption(scene: Scene, rng: random.Random, with_size: bool) -> str:
    # Objects are described in reading order (top to bottom, left to right), as people
    # describe a picture; only the minority "inverse" paraphrase of each relation (B right
    # of A for A left of B) departs from it. A consistent order lets a decoder learn which
    # object comes first instead of blending the attributes of several objects.
    objects = sorted(scene.objects, key=lambda o: (o.row, o.col))
    if len(objects) == 1:
        np1 = _indefinite(objects[0], rng, with_size)
        return rng.choice((np1, f"there is {np1}", f"{np1} in the picture"))
    if len(objects) == 2:
        return _relation_clause(objects[0], objects[1], rng, with_size)
    first, second, third = objects
    anchor = min((second, first), key=lambda o: abs(o.row - third.row) + abs(o.col - third.col))
    clause1 = _relation_clause(first, second, rng, with_size)
    clause2 = _relation_clause(anchor, third, rng, with_size, known_a=True)
    return f"{clause1} and {clause2}"


def _relation_clause(
    a: ShapeObject, b: ShapeObject, rng: random.Random, with_size: bool, known_a: bool = False
) -> str:
    """A clause relating ``a`` to ``b``; ``known_a``: ``a`` was mentioned, so it is "the ..."."""
    # The dominant axis gives the most salient relation; ties go to left/right.
    if abs(a.col - b.col) >= abs(a.row - b.row):
        relation = "left of" if a.col < b.col else "right of"
    else:
        relation = "above" if a.row < b.row else "below"
    np_a = f"the {a.colour} {a.shape}" if known_a else _indefinite(a, rng, with_size)
    np_b = _indefinite(b, rng, with_size)
    subject, obj = np_a, np_b
    if rng.random() < _INVERSE_SHARE:
        subject, obj, relation = np_b, np_a, _INVERSE[relation]
    phrase = rng.choice(_RELATION_PHRASES[relation])
    forms = [f"{subject} {phrase} {obj}", f"{subject} is {phrase} {obj}"]
    if subject.startswith("a "):  # "there is" never takes a re-mention
        forms.append(f"there is {subject} {phrase} {obj}")
    return rng.choice(forms)


def _indefinite(obj: ShapeObject, rng: random.Random, with_size: bool) -> str:
    if with_size:
        return f"a {rng.choice(_SIZE_WORDS[obj.size])} {obj.colour} {obj.shape}"
    return f"a {obj.colour} {obj.shape}"


@dataclass(frozen=True)
class CaptionCheck:
    """What :func:`check_caption` found out about one caption.

    Attributes:
        grammatical: the caption parses under the grammar.
        truthful: it is grammatical and every fact it states holds in the scene.
        facts: number of facts stated: one per object introduced ("a ...") plus one per relation.
        false_facts: a readable line per false fact, e.g. "no large green circle".
        attributes: per introduced noun phrase, aligned to the best-matching scene object,
            ("shape", ok), ("colour", ok) and, if stated, ("size", ok).
        mentions: distinct (colour, shape) pairs the caption names, in order; found by
            scanning the words, so also for ungrammatical captions.
    """

    grammatical: bool
    truthful: bool
    facts: int
    false_facts: tuple[str, ...]
    attributes: tuple[tuple[str, bool], ...]
    mentions: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class _NounPhrase:
    colour: str
    shape: str
    size: str | None  # canonical size, None when unstated
    definite: bool

    def describe(self) -> str:
        return " ".join(w for w in (self.size, self.colour, self.shape) if w)

    def matches(self, obj: ShapeObject) -> bool:
        return (
            obj.colour == self.colour
            and obj.shape == self.shape
            and self.size in (None, obj.size)
        )


@dataclass(frozen=True)
class _Clause:
    subject: _NounPhrase
    relation: str | None = None  # canonical relation; None for a lone noun phrase
    object: _NounPhrase | None = None


def check_caption(caption: str, scene: Scene) -> CaptionCheck:
    """Checks whether a caption is grammatical and true of a scene.

    A clause "NP1 REL NP2" holds iff two distinct objects match NP1 and NP2 (stated
    attributes must agree, unstated ones are free) and REL holds between their cells;
    a lone noun phrase holds iff an object matches it. Never raises on any string.

    Args:
        caption: any text; case and runs of whitespace are ignored.
        scene: the scene the caption should describe.

    Returns:
        The verdict; see :class:`CaptionCheck`.
    """
    tokens = caption.lower().split()
    mentions = _mentions(tokens)
    clauses = _parse(tokens)
    if clauses is None:
        return CaptionCheck(False, False, 0, (), (), mentions)
    results: list[tuple[bool, str]] = []
    attributes: list[tuple[str, bool]] = []
    for clause in clauses:
        for phrase in (clause.subject, clause.object):
            # Re-mentions name an object already counted; they matter only via relations.
            if phrase is not None and not phrase.definite:
                exists = any(phrase.matches(o) for o in scene.objects)
                results.append((exists, f"no {phrase.describe()}"))
                attributes.extend(_align(phrase, scene))
        if clause.relation is not None and clause.object is not None:
            # Relations are strict, so an object never stands in one to itself.
            holds = any(
                _holds(clause.relation, a, b)
                for a in scene.objects
                if clause.subject.matches(a)
                for b in scene.objects
                if clause.object.matches(b)
            )
            results.append(
                (holds, f"{clause.subject.describe()} is not {clause.relation} {clause.object.describe()}")
            )
    false_facts = tuple(message for ok, message in results if not ok)
    return CaptionCheck(True, not false_facts, len(results), false_facts, tuple(attributes), mentions)


def _mentions(tokens: list[str]) -> tuple[tuple[str, str], ...]:
    pairs = [(c, s) for c, s in zip(tokens, tokens[1:]) if c in COLOURS and s in SHAPES]
    return tuple(dict.fromkeys(pairs))


def _align(phrase: _NounPhrase, scene: Scene) -> list[tuple[str, bool]]:
    """Scores a noun phrase against the object it most likely means: same shape first."""

    def agreement(obj: ShapeObject) -> tuple[bool, int]:
        return obj.shape == phrase.shape, (obj.colour == phrase.colour) + (obj.size == phrase.size)

    best = max(scene.objects, key=agreement, default=None)  # max() keeps the first of equals
    scores = [
        ("shape", best is not None and best.shape == phrase.shape),
        ("colour", best is not None and best.colour == phrase.colour),
    ]
    if phrase.size is not None:
        scores.append(("size", best is not None and best.size == phrase.size))
    return scores


def _holds(relation: str, a: ShapeObject, b: ShapeObject) -> bool:
    if relation == "left of":
        return a.col < b.col
    if relation == "right of":
        return a.col > b.col
    if relation == "above":
        return a.row < b.row
    return a.row > b.row  # below


def _parse(tokens: list[str]) -> list[_Clause] | None:
    """Parses a caption into clauses with re-mentions resolved, or None if ungrammatical."""
    parsed = _parse_clause(tokens, 0)
    if parsed is None:
        return None
    first, pos = parsed
    if _phrases(first, definite=True):
        return None  # nothing to re-mention yet
    if pos == len(tokens):
        return [first]
    if tokens[pos] != "and" or first.relation is None:
        return None
    parsed = _parse_clause(tokens, pos + 1)
    if parsed is None or parsed[1] != len(tokens) or parsed[0].relation is None:
        return None
    second = _resolve(parsed[0], _phrases(first, definite=False))
    return None if second is None else [first, second]


def _phrases(clause: _Clause, definite: bool) -> list[_NounPhrase]:
    return [p for p in (clause.subject, clause.object) if p is not None and p.definite == definite]


def _resolve(clause: _Clause, antecedents: list[_NounPhrase]) -> _Clause | None:
    """Gives each re-mention its antecedent's description; None if one has no antecedent."""

    def resolve(phrase: _NounPhrase | None) -> _NounPhrase | None:
        if phrase is None or not phrase.definite:
            return phrase
        for antecedent in antecedents:
            if (antecedent.colour, antecedent.shape) == (phrase.colour, phrase.shape):
                return _NounPhrase(phrase.colour, phrase.shape, antecedent.size, definite=True)
        return None

    subject, obj = resolve(clause.subject), resolve(clause.object)
    if subject is None or (clause.object is not None and obj is None):
        return None
    return _Clause(subject, clause.relation, obj)


def _parse_clause(tokens: list[str], pos: int) -> tuple[_Clause, int] | None:
    existential = tokens[pos : pos + 2] == ["there", "is"]
    if existential:
        pos += 2
    parsed = _parse_noun_phrase(tokens, pos)
    if parsed is None:
        return None
    subject, pos = parsed
    if existential and subject.definite:
        return None
    copula = not existential and tokens[pos : pos + 1] == ["is"]
    if copula:
        pos += 1
    for phrase, relation in _RELATION_OF_PHRASE.items():
        if tuple(tokens[pos : pos + len(phrase)]) == phrase:
            parsed = _parse_noun_phrase(tokens, pos + len(phrase))
            if parsed is None:
                return None
            obj, pos = parsed
            return _Clause(subject, relation, obj), pos
    if copula:
        return None
    if not existential and tokens[pos : pos + 3] == ["in", "the", "picture"]:
        pos += 3
    return _Clause(subject), pos


def _parse_noun_phrase(tokens: list[str], pos: int) -> tuple[_NounPhrase, int] | None:
    determiner = tokens[pos : pos + 1]
    if determiner not in (["a"], ["the"]):
        return None
    pos += 1
    size = None
    if determiner == ["a"] and pos < len(tokens) and tokens[pos] in _SIZE_OF_WORD:
        size = _SIZE_OF_WORD[tokens[pos]]
        pos += 1
    words = tokens[pos : pos + 2]
    if len(words) == 2 and words[0] in COLOURS and words[1] in SHAPES:
        return _NounPhrase(words[0], words[1], size, determiner == ["the"]), pos + 2
    return None
