"""The embedded synthetic "shapes world": scenes, rendering, captions, the data-set writer, CNN pretraining.

One module per concept, each importing only those above it::

    world        the attributes, ShapeObject and Scene, sampling scenes, held-out pairs
    render       a scene drawn as an RGB image                              (world)
    grammar      reference captions, and the parser and truth checker       (world)
    writer       a data set in Karpathy's format: images, captions, scenes  (world, render, grammar)
    pretraining  the CNN's auxiliary task: which shape, colour, size in each cell  (world, render)

The package re-exports the torch-free modules only: drawing scenes and writing a data set
(``captioner synth``) need numpy and Pillow, not torch, whose import alone takes seconds. CNN
pretraining is imported from its module, ``captioner.shapes.pretraining``.
"""

from captioner.shapes.grammar import MAX_CAPTIONS, CaptionCheck, check_caption, describe_scene
from captioner.shapes.render import MIN_IMAGE_SIZE, render_scene
from captioner.shapes.world import COLOURS, GRID, SHAPES, SIZES, Scene, ShapeObject, parse_holdout, sample_scene
from captioner.shapes.writer import write_shapes_dataset

__all__ = [
    "COLOURS",
    "GRID",
    "MAX_CAPTIONS",
    "MIN_IMAGE_SIZE",
    "SHAPES",
    "SIZES",
    "CaptionCheck",
    "Scene",
    "ShapeObject",
    "check_caption",
    "describe_scene",
    "parse_holdout",
    "render_scene",
    "sample_scene",
    "write_shapes_dataset",
]
