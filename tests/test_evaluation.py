"""The shapes world's truth report on captions made by hand, whose every number can be worked out."""

from pathlib import Path

import pytest
import torch

from captioner.data.datasets import ImageRecord
from captioner.data.vocab import Vocabulary
from captioner.decoding import Hypothesis
from captioner.evaluation import generate_captions, shapes_report
from captioner.options import DecodeOptions
from captioner.shapes import Scene

from tests.helpers import SCENE, scene_object

# SCENE: large red circle top-left, small blue square top-right, large green star bottom-middle.
# HELD: a small green triangle in the middle and a large red circle top-left; green:triangle is held out.
HELD = Scene((scene_object("triangle", "green", "small", 1, 1), scene_object("circle", "red", "large", 0, 0)))
CAPTIONS = {
    "true relation": (SCENE, "a red circle left of a blue square"),  # shape, colour, shape, colour right
    "wrong colour": (SCENE, "a large blue circle"),  # shape right, colour wrong, size right
    "ungrammatical": (SCENE, "a red circle left of a"),  # no facts, no attributes
    "names held out": (HELD, "a green triangle"),
    "misses held out": (HELD, "a red circle"),
    "same words": (SCENE, "a red circle"),  # the same caption as the one before
}
RECORDS = [
    ImageRecord(image_id=name, path=Path(f"{name}.png"), captions=("a red circle",), split="test", scene=scene.to_dict())
    for name, (scene, _) in CAPTIONS.items()
]


def test_shapes_report_counts_what_is_true_of_each_scene():
    captions = {name: caption for name, (_, caption) in CAPTIONS.items()}
    report = shapes_report(captions, RECORDS, frozenset({("green", "triangle")}))
    assert report == {
        "grammaticality": pytest.approx(5 / 6),
        "truthfulness": pytest.approx(4 / 6),
        "attribute_accuracy": {"colour": pytest.approx(5 / 6), "shape": 1.0, "size": 1.0},
        "distinct_captions": pytest.approx(5 / 6),
        # a red circle left of blue square large green triangle
        "vocabulary_used": 10,
        # Two images show the held-out pair; one caption names it.
        "held_out_named": 0.5,
    }
    # Without held-out pairs there is nothing to name.
    assert "held_out_named" not in shapes_report(captions, RECORDS)


class ScriptedCaptioner:
    """Stands in for a model: feature i (a number) is captioned with the i-th hand-made caption."""

    def __init__(self, captions: list[str]):
        self.captions = captions
        self.vocab = Vocabulary.build(captions)

    def eval(self):
        return self

    def generate(self, features, options):
        return [[Hypothesis(self.vocab.encode(self.captions[int(i)])[1:], 0.0)] for i in features]


def test_generated_captions_stay_with_their_images_across_batches():
    captions = [caption for _, caption in CAPTIONS.values()]
    # Batches of 4 over 6 images: each caption must stay with its own image across batches.
    generated = generate_captions(
        ScriptedCaptioner(captions), torch.arange(len(captions)), RECORDS, DecodeOptions(), batch_size=4
    )
    assert generated == {name: caption for name, (_, caption) in CAPTIONS.items()}
