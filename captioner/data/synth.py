"""The synthetic "shapes world": scenes, images, reference captions and a caption checker.

In the spirit of ShapeWorld (Kuhnle & Copestake, 2017): every image shows 1-3 coloured
shapes in distinct cells of a GRID x GRID grid, and is described by a small, regular
grammar. Because the scene is known exactly, any caption - a reference or one a model
generated - can be checked for being grammatical and true (GTD evaluation, Xie et al.
2019), and (colour, shape) pairs can be held out of training to test generalisation.

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

import itertools
import json
import math
import os
import pathlib
import random
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from captioner.errors import CaptionerError

SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLOURS = ("red", "green", "blue", "yellow", "purple", "cyan", "white")
SIZES = ("small", "large")
GRID = 3

# Fill colours, chosen to stay apart from each other and from the dark background even
# after jitter (blue is lightened so it does not sink into the background).
_RGB = {
    "red": (225, 45, 45),
    "green": (50, 200, 60),
    "blue": (60, 110, 255),
    "yellow": (240, 220, 40),
    "purple": (175, 70, 225),
    "cyan": (40, 220, 225),
    "white": (240, 240, 240),
}
# Extent of a shape as a fraction of a cell.
_EXTENT = {"small": 0.45, "large": 0.8}
_COLOUR_JITTER = 12  # +- per channel and object, so models cannot memorise exact RGB values
_BACKGROUND_LEVEL = 30.0
_BACKGROUND_NOISE = 10.0  # std of the per-pixel, per-channel Gaussian noise
_SUPERSAMPLE = 4  # draw at 4x and box-downsample: cheap, exact antialiasing
_MIN_IMAGE_SIZE = 32  # below this a small shape is only a few pixels across
_MAX_OBJECTS = 3
_MAX_CAPTIONS = 8  # a one-object scene has only 3 captions without size and 6 with it
_WITHOUT_SIZE_SHARE = 0.2  # share of references that leave sizes out
_INVERSE_SHARE = 0.2  # share of relations stated the other way round (B right of A)
_DATASET_VERSION = 1

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


@dataclass(frozen=True)
class ShapeObject:
    """One shape in a scene; ``x``, ``y`` is its centre in [0, 1] image coordinates."""

    shape: str
    colour: str
    size: str
    row: int
    col: int
    x: float
    y: float


@dataclass(frozen=True)
class Scene:
    """The objects of one image, at most one per grid cell and per (colour, shape)."""

    objects: tuple[ShapeObject, ...]

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-able ``{"objects": [{"shape", "colour", ...}, ...]}``."""
        return {
            "objects": [
                {
                    "shape": o.shape,
                    "colour": o.colour,
                    "size": o.size,
                    "row": o.row,
                    "col": o.col,
                    "x": o.x,
                    "y": o.y,
                }
                for o in self.objects
            ]
        }

    @classmethod
    def from_dict(cls, d: Any) -> Scene:
        """Builds a scene from :meth:`to_dict` output, checking every field.

        Args:
            d: the decoded JSON.

        Returns:
            The scene.

        Raises:
            CaptionerError: if ``d`` is not a valid scene.
        """
        if not isinstance(d, dict) or not isinstance(d.get("objects"), list):
            raise CaptionerError('malformed scene: expected {"objects": [...]}')
        items = d["objects"]
        if not 1 <= len(items) <= GRID * GRID:
            raise CaptionerError(f"malformed scene: needs 1 to {GRID * GRID} objects, got {len(items)}")
        objects = tuple(_object_from_dict(i, item) for i, item in enumerate(items))
        if len({(o.row, o.col) for o in objects}) < len(objects):
            raise CaptionerError("malformed scene: two objects share a grid cell")
        if len({(o.colour, o.shape) for o in objects}) < len(objects):
            raise CaptionerError("malformed scene: two objects share a colour and shape")
        return cls(objects)


def _object_from_dict(index: int, item: Any) -> ShapeObject:
    where = f"malformed scene: object {index}"
    if not isinstance(item, dict):
        raise CaptionerError(f"{where} is not an object")
    for key, valid in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES)):
        if item.get(key) not in valid:
            raise CaptionerError(f"{where} has {key} {item.get(key)!r} (valid: {', '.join(valid)})")
    for key in ("row", "col"):
        value = item.get(key)
        if type(value) is not int or not 0 <= value < GRID:
            raise CaptionerError(f"{where} has {key} {value!r} (valid: 0 to {GRID - 1})")
    for key, cell in (("x", item["col"]), ("y", item["row"])):
        value = item.get(key)
        if type(value) not in (int, float) or not cell / GRID <= value <= (cell + 1) / GRID:
            raise CaptionerError(f"{where} has {key} {value!r} outside its grid cell")
    return ShapeObject(
        item["shape"], item["colour"], item["size"], item["row"], item["col"], float(item["x"]), float(item["y"])
    )


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


def parse_holdout(specs: Sequence[str]) -> frozenset[tuple[str, str]]:
    """Parses held-out (colour, shape) pairs written as ``"colour:shape"``.

    Args:
        specs: e.g. ``["green:triangle", "red:star"]``.

    Returns:
        The set of (colour, shape) pairs.

    Raises:
        CaptionerError: on a spec that is not a known colour and shape joined by ":".
    """
    pairs = set()
    for spec in specs:
        colour, sep, shape = str(spec).strip().lower().partition(":")
        if not sep or colour not in COLOURS or shape not in SHAPES:
            raise CaptionerError(
                f"bad held-out pair {spec!r}: expected colour:shape with colour one of "
                f"{', '.join(COLOURS)} and shape one of {', '.join(SHAPES)}"
            )
        pairs.add((colour, shape))
    return frozenset(pairs)


def sample_scene(
    rng: random.Random,
    *,
    holdout: frozenset[tuple[str, str]] = frozenset(),
    require_holdout: bool = False,
    max_objects: int = _MAX_OBJECTS,
) -> Scene:
    """Draws a random scene of 1 to ``max_objects`` objects in distinct cells with distinct (colour, shape).

    Args:
        rng: the only source of randomness.
        holdout: (colour, shape) pairs kept out of ordinary scenes.
        require_holdout: if True, the scene contains at least one held-out pair;
            if False, it contains none.
        max_objects: at most GRID * GRID; captions describe scenes of up to 3 objects, but the
            CNN's pretraining learns more from each image of a fuller scene.

    Returns:
        The scene, objects in row-major cell order.

    Raises:
        CaptionerError: if ``holdout`` names unknown pairs or leaves too few pairs to sample.
    """
    all_pairs = list(itertools.product(COLOURS, SHAPES))
    unknown = set(holdout) - set(all_pairs)
    if unknown:
        raise CaptionerError(f"unknown held-out pairs: {sorted(unknown)}")
    if not 1 <= max_objects <= GRID * GRID:
        raise CaptionerError(f"a scene holds 1 to {GRID * GRID} objects, got at most {max_objects}")
    count = rng.randint(1, max_objects)
    if require_holdout:
        if not holdout:
            raise CaptionerError("cannot require a held-out pair: no pairs are held out")
        # sorted(): set iteration order must not leak into the random stream.
        first = rng.choice(sorted(holdout))
        pairs = [first, *rng.sample([p for p in all_pairs if p != first], count - 1)]
    else:
        allowed = [p for p in all_pairs if p not in holdout]
        if len(allowed) < max_objects:
            raise CaptionerError(f"too many held-out pairs: at least {max_objects} pairs must remain")
        pairs = rng.sample(allowed, count)
    cells = sorted(rng.sample(range(GRID * GRID), count))
    objects = []
    for (colour, shape), cell in zip(pairs, cells):
        size = rng.choice(SIZES)
        row, col = divmod(cell, GRID)
        # The centre moves only as far as keeps the whole shape inside its cell.
        slack = (1 - _EXTENT[size]) / 2
        x = (col + 0.5 + rng.uniform(-slack, slack)) / GRID
        y = (row + 0.5 + rng.uniform(-slack, slack)) / GRID
        # Rounded so that a scene survives a JSON round trip unchanged.
        objects.append(ShapeObject(shape, colour, size, row, col, round(x, 4), round(y, 4)))
    return Scene(tuple(objects))


def render_scene(scene: Scene, image_size: int, rng: random.Random) -> Image.Image:
    """Draws a scene: filled shapes on a dark background with per-pixel noise.

    Args:
        scene: what to draw.
        image_size: width and height in pixels (at least 32).
        rng: seeds the noise and the per-object colour jitter.

    Returns:
        An RGB image of ``image_size`` x ``image_size`` pixels.

    Raises:
        CaptionerError: if ``image_size`` is too small.
    """
    if image_size < _MIN_IMAGE_SIZE:
        raise CaptionerError(f"image size must be at least {_MIN_IMAGE_SIZE} pixels, got {image_size}")
    noise_rng = np.random.default_rng(rng.getrandbits(64))
    pixels = _BACKGROUND_LEVEL + _BACKGROUND_NOISE * noise_rng.standard_normal(
        (image_size, image_size, 3), dtype=np.float32
    )
    for obj in scene.objects:
        jitter = noise_rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=3)
        fill = np.clip(np.array(_RGB[obj.colour], dtype=np.float32) + jitter, 0, 255)
        # Supersample only the pixels around the shape: a fraction of the image's cost.
        radius = _EXTENT[obj.size] * image_size / GRID / 2
        cx, cy = obj.x * image_size, obj.y * image_size
        x0, y0 = max(math.floor(cx - radius), 0), max(math.floor(cy - radius), 0)
        x1, y1 = min(math.ceil(cx + radius), image_size), min(math.ceil(cy + radius), image_size)
        mask = Image.new("L", ((x1 - x0) * _SUPERSAMPLE, (y1 - y0) * _SUPERSAMPLE))
        outline = _outline(obj.shape, (cx - x0) * _SUPERSAMPLE, (cy - y0) * _SUPERSAMPLE, radius * _SUPERSAMPLE)
        ImageDraw.Draw(mask).polygon(outline, fill=255)
        # A box filter averages each 4x4 block: the pixel's coverage, i.e. antialiasing.
        coverage = mask.resize((x1 - x0, y1 - y0), Image.Resampling.BOX)
        alpha = np.asarray(coverage, dtype=np.float32)[..., None] / 255
        region = pixels[y0:y1, x0:x1]
        region[...] = region * (1 - alpha) + fill * alpha
    return Image.fromarray(np.round(np.clip(pixels, 0, 255)).astype(np.uint8), "RGB")


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon of a shape fitting a 2r box around (cx, cy); circles are fine polygons."""
    if shape == "circle":
        angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles]
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        # Narrower than tall, so it does not read as a tilted square.
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "star":
        # A fat inner radius keeps the points visible at 10 pixels across.
        radii = itertools.cycle((r, 0.45 * r))
        angles = np.linspace(-np.pi / 2, 1.5 * np.pi, 10, endpoint=False)
        return [(cx + rad * np.cos(a), cy + rad * np.sin(a)) for a, rad in zip(angles, radii)]
    raise CaptionerError(f"unknown shape {shape!r} (valid: {', '.join(SHAPES)})")


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
    if not 1 <= n <= _MAX_CAPTIONS:
        raise CaptionerError(f"captions per image must be 1 to {_MAX_CAPTIONS}, got {n}")
    if not 1 <= len(scene.objects) <= _MAX_OBJECTS:
        raise CaptionerError(f"can only describe scenes of 1 to {_MAX_OBJECTS} objects")
    without_size = round(n * _WITHOUT_SIZE_SHARE)
    with_size_flags = [False] * without_size + [True] * (n - without_size)
    rng.shuffle(with_size_flags)
    captions: list[str] = []
    # _MAX_CAPTIONS keeps both pools large enough, so redrawing duplicates terminates.
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


def write_shapes_dataset(
    out_dir: str | os.PathLike[str],
    *,
    num_images: int = 4000,
    seed: int = 0,
    image_size: int = 96,
    holdout: Sequence[str] = (),
    captions_per_image: int = 5,
    progress: bool = False,
) -> pathlib.Path:
    """Writes a shapes-world data set in Karpathy's split format.

    Images go to ``out_dir/images/NNNNNN.png``; ``out_dir/dataset.json`` is written last
    and atomically, so its presence means the data set is complete. ``num_images`` are
    split 80/10/10 into train/val/test, none showing a held-out pair; with a holdout an
    extra "holdout" split of max(10%, 20) images each shows at least one held-out pair.
    The same arguments always give byte-identical files.

    Args:
        out_dir: directory to write into (created if missing).
        num_images: train + val + test images, at least 10.
        seed: seeds everything.
        image_size: image width and height in pixels.
        holdout: held-out pairs as "colour:shape" specs.
        captions_per_image: reference captions per image, 1 to 8.
        progress: show a progress bar.

    Returns:
        The path of dataset.json.

    Raises:
        CaptionerError: on bad arguments, or if ``out_dir`` already holds a data set made
            with other parameters.
    """
    if type(num_images) is not int or num_images < 10:
        raise CaptionerError(f"need at least 10 images, got {num_images}")
    if image_size < _MIN_IMAGE_SIZE:
        raise CaptionerError(f"image size must be at least {_MIN_IMAGE_SIZE} pixels, got {image_size}")
    if not 1 <= captions_per_image <= _MAX_CAPTIONS:
        raise CaptionerError(f"captions per image must be 1 to {_MAX_CAPTIONS}, got {captions_per_image}")
    held_out = parse_holdout(holdout)
    out = pathlib.Path(out_dir)
    dataset_path = out / "dataset.json"
    params = {
        "version": _DATASET_VERSION,
        "seed": seed,
        "num_images": num_images,
        "image_size": image_size,
        "holdout": [f"{c}:{s}" for c, s in sorted(held_out)],
        "captions_per_image": captions_per_image,
        "shapes": list(SHAPES),
        "colours": list(COLOURS),
        "sizes": list(SIZES),
        "grid": GRID,
    }
    if dataset_path.exists():
        _check_existing(dataset_path, params)
        return dataset_path

    n_val = n_test = num_images // 10
    splits = ["train"] * (num_images - n_val - n_test) + ["val"] * n_val + ["test"] * n_test
    if held_out:
        splits += ["holdout"] * max(num_images // 10, 20)
    (out / "images").mkdir(parents=True, exist_ok=True)
    master = random.Random(seed)
    images = []
    for imgid, split in enumerate(tqdm(splits, desc="shapes world", unit="img", disable=not progress)):
        # One generator per image: an image depends only on the seed and its index.
        rng = random.Random(master.getrandbits(64))
        scene = sample_scene(rng, holdout=held_out, require_holdout=split == "holdout")
        filename = f"{imgid:06d}.png"
        render_scene(scene, image_size, rng).save(out / "images" / filename, format="PNG")
        first_sentid = imgid * captions_per_image
        sentences = [
            {"raw": raw, "tokens": raw.split(), "imgid": imgid, "sentid": first_sentid + k}
            for k, raw in enumerate(describe_scene(scene, rng, captions_per_image))
        ]
        images.append(
            {
                "filepath": "images",
                "filename": filename,
                "imgid": imgid,
                "split": split,
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
                "scene": scene.to_dict(),
            }
        )
    tmp_path = out / "dataset.json.tmp"
    tmp_path.write_text(json.dumps({"dataset": "shapes", "shapes_world": params, "images": images}))
    os.replace(tmp_path, dataset_path)
    return dataset_path


def _check_existing(dataset_path: pathlib.Path, params: dict[str, Any]) -> None:
    try:
        existing = json.loads(dataset_path.read_text()).get("shapes_world")
    except (OSError, ValueError, AttributeError) as exc:
        raise CaptionerError(f"cannot read existing {dataset_path} ({exc}); pick another directory") from exc
    if existing != params:
        raise CaptionerError(
            f"{dataset_path.parent} already holds a shapes data set made with other parameters; "
            "pick another directory"
        )
