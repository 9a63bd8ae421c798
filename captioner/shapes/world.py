"""The shapes world: its attributes, the objects of a scene, and how scenes are drawn at random.

In the spirit of ShapeWorld (Kuhnle & Copestake, 2017): every scene holds a few coloured shapes in
distinct cells of a GRID x GRID grid, at most one per (colour, shape); (colour, shape) pairs can be
held out of training to test compositional generalisation.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Any, Sequence

from captioner.errors import CaptionerError

SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLOURS = ("red", "green", "blue", "yellow", "purple", "cyan", "white")
SIZES = ("small", "large")
GRID = 3
# Extent of a shape as a fraction of a cell.
EXTENT = {"small": 0.45, "large": 0.8}
MAX_OBJECTS = 3  # in a captioned scene; pretraining draws fuller ones


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
    max_objects: int = MAX_OBJECTS,
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
        slack = (1 - EXTENT[size]) / 2
        x = (col + 0.5 + rng.uniform(-slack, slack)) / GRID
        y = (row + 0.5 + rng.uniform(-slack, slack)) / GRID
        # Rounded so that a scene survives a JSON round trip unchanged.
        objects.append(ShapeObject(shape, colour, size, row, col, round(x, 4), round(y, 4)))
    return Scene(tuple(objects))
