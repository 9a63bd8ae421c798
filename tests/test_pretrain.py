import random

import torch

from captioner.data.synth import GRID, Scene
from captioner.models.encoder import Encoder, EncoderConfig
from captioner.pretrain import ATTRIBUTES, CELL_CLASSES, _fresh_scenes, cell_labels, pretrain_encoder


def test_cell_labels_read_the_scene_grid():
    scene = Scene.from_dict(
        {"objects": [{"shape": "star", "colour": "blue", "size": "small", "row": 1, "col": 2, "x": 0.8, "y": 0.5}]}
    )
    labels = cell_labels(scene)
    assert labels.shape == (GRID * GRID, len(ATTRIBUTES))
    empty = torch.tensor([count for _, count in ATTRIBUTES])
    assert torch.equal(labels[0], empty)  # the last class of each attribute means "empty"
    assert labels[1 * GRID + 2].tolist() == [4, 2, 0]  # star, blue, small


def test_fresh_scenes_keep_held_out_pairs_out():
    encoder = Encoder(EncoderConfig(name="resnet18", image_size=32))
    world = {"image_size": 32, "holdout": ["green:triangle"]}
    images, labels = _fresh_scenes(encoder, world, 200, random.Random(0))
    assert images.shape == (200, 3, 32, 32) and labels.shape == (200, GRID * GRID, 3)
    green_triangle = (labels[..., 0] == 2) & (labels[..., 1] == 1)
    assert not green_triangle.any()


def test_pretraining_trains_then_freezes_the_encoder(shapes):
    torch.manual_seed(0)
    encoder = Encoder(EncoderConfig(name="resnet18", image_size=32, pool_grid=GRID, cell_classes=CELL_CLASSES))
    before = encoder.backbone.conv1.weight.clone()
    world = {"image_size": 32, "holdout": ["green:triangle"]}
    result = pretrain_encoder(
        encoder, world, shapes.split("val"), epochs=1, images_per_epoch=32, device=torch.device("cpu"), seed=0
    )
    assert not torch.equal(encoder.backbone.conv1.weight, before)
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training
    for key in ("val_cell_accuracy", "val_shape_accuracy", "val_colour_accuracy", "val_size_accuracy"):
        assert 0.0 <= result[key] <= 1.0
