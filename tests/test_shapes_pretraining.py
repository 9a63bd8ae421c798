import random
import shutil

import pytest
import torch
from PIL import Image

from captioner.errors import CaptionerError
from captioner.models.captioner import Captioner
from captioner.models.encoder import Encoder, EncoderConfig
from captioner.shapes import COLOURS, GRID, SHAPES, SIZES, Scene, parse_holdout, pretraining
from captioner.shapes.pretraining import (
    ATTRIBUTES,
    CELL_CLASSES,
    PRETRAINING_OBJECTS,
    CellClassifier,
    _fresh_scenes,
    cell_labels,
    pretrain_encoder,
)
from captioner.evaluation import evaluate_split
from captioner.training import train

from tests.helpers import SCENE, tiny_config


def test_cell_labels_read_the_scene_grid():
    scene = Scene.from_dict(
        {"objects": [{"shape": "star", "colour": "blue", "size": "small", "row": 1, "col": 2, "x": 0.8, "y": 0.5}]}
    )
    labels = cell_labels(scene)
    assert labels.shape == (GRID * GRID, len(ATTRIBUTES))
    empty = torch.tensor([count for _, count in ATTRIBUTES])
    assert torch.equal(labels[0], empty)  # the last class of each attribute means "empty"
    assert labels[1 * GRID + 2].tolist() == [4, 2, 0]  # star, blue, small


def test_cell_labels_of_a_three_object_scene():
    # red large circle top-left, blue small square top-right, green large star bottom-middle
    labels = cell_labels(SCENE)
    assert labels.dtype == torch.long and labels.shape == (GRID * GRID, 3)
    empty = [len(SHAPES), len(COLOURS), len(SIZES)]
    assert labels.tolist() == [
        [0, 0, 1],  # circle, red, large
        empty,
        [1, 2, 0],  # square, blue, small
        empty,
        empty,
        empty,
        empty,
        [4, 1, 1],  # star, green, large
        empty,
    ]


def test_fresh_scenes_keep_held_out_pairs_out():
    encoder = Encoder(EncoderConfig(name="resnet18", image_size=32))
    world = {"image_size": 32, "holdout": ["green:triangle"]}
    images, labels = _fresh_scenes(encoder, world, 200, random.Random(0), parse_holdout(world["holdout"]))
    assert images.shape == (200, 3, 32, 32) and labels.shape == (200, GRID * GRID, 3)
    green_triangle = (labels[..., 0] == 2) & (labels[..., 1] == 1)
    assert not green_triangle.any()
    objects = (labels[..., 0] < len(SHAPES)).sum(-1)  # occupied cells per image
    assert objects.min() >= 1 and objects.max() == PRETRAINING_OBJECTS  # fuller than captioned scenes


@pytest.mark.parametrize("protocol", ["novel-scenes", "novel-captions"])
def test_only_the_novel_scenes_protocol_keeps_held_out_pairs_from_the_cnn(monkeypatch, shapes, protocol):
    shown = []

    def recording(*args):
        images, labels = _fresh_scenes(*args)
        shown.append(labels)
        return images, labels

    monkeypatch.setattr(pretraining, "_fresh_scenes", recording)
    monkeypatch.setattr(pretraining, "BATCH_SIZE", 300)  # one step: the scenes shown are what is checked
    encoder = Encoder(EncoderConfig(name="resnet18", image_size=32, pool_grid=GRID, cell_classes=CELL_CLASSES))
    world = {"image_size": 32, "holdout": ["green:triangle"]}
    result = pretrain_encoder(
        encoder, world, shapes.split("val")[:2], epochs=1, images_per_epoch=300, device=torch.device("cpu"),
        seed=0, protocol=protocol,
    )  # fmt: skip
    labels = torch.cat(shown)
    green_triangles = ((labels[..., 0] == SHAPES.index("triangle")) & (labels[..., 1] == COLOURS.index("green"))).sum()
    assert result["protocol"] == protocol
    if protocol == "novel-scenes":
        assert result["held_out"] == ["green:triangle"] and green_triangles == 0
    else:  # every combination, the held-out one about as often as any other (1 object in 35)
        assert result["held_out"] == [] and green_triangles >= 10


def test_half_of_the_fresh_scenes_are_mirror_images_of_the_others():
    encoder = Encoder(EncoderConfig(name="resnet18", image_size=32))
    images, labels = _fresh_scenes(encoder, {"image_size": 32}, 40, random.Random(0), frozenset())
    mirrored_labels = labels.view(-1, GRID, GRID, 3).flip(2).flatten(1, 2)
    for i in range(len(images)):
        twins = [j for j in range(len(images)) if torch.equal(images[j], images[i].flip(-1))]
        assert len(twins) == 1 and torch.equal(labels[twins[0]], mirrored_labels[i])


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
    # The accuracies are those of the frozen encoder's cell head on the validation scenes.
    classifier = CellClassifier(encoder)
    images = encoder.transform.normalize(torch.stack([encoder.transform.load(r.path) for r in shapes.split("val")]))
    labels = torch.stack([cell_labels(Scene.from_dict(r.scene)) for r in shapes.split("val")])
    with torch.inference_mode():
        right = classifier.predict(classifier(images)) == labels  # (N, G*G, 3)
    assert result["val_cell_accuracy"] == pytest.approx(right.all(-1).float().mean().item())
    for j, name in enumerate(("shape", "colour", "size")):
        assert result[f"val_{name}_accuracy"] == pytest.approx(right[..., j].float().mean().item()), name


AUXILIARY = dict(encoder_weights="auxiliary", pool_grid=None, pretrain_epochs=1, epochs=1)


@pytest.fixture(scope="module")
def auxiliary_run(tmp_path_factory, shapes_json):
    """Run folder of a tiny model on a CNN pretrained on the scenes, under a protocol: trained
    once per protocol for the module (a test that changes the folder works on a copy)."""
    runs = {}

    def run(protocol: str):
        if protocol not in runs:
            root = tmp_path_factory.mktemp(f"auxiliary-{protocol}")
            train(tiny_config(shapes_json, root / "run", root / "cache", **AUXILIARY, protocol=protocol))
            runs[protocol] = root / "run"
        return runs[protocol]

    return run


@pytest.mark.slow  # CNN pretraining, then training on it: several seconds
def test_training_on_the_shapes_world_reads_the_pretrained_cell_head(tmp_path, shapes_json, shapes, auxiliary_run):
    run = tmp_path / "run"
    overrides = AUXILIARY
    shutil.copytree(auxiliary_run("novel-captions"), run)  # trained with the default protocol
    model = Captioner.load(run / "model.pt")
    classes = sum(map(len, CELL_CLASSES))
    assert model.encoder.config.cell_classes == CELL_CLASSES
    assert (model.decoder.config.cells, model.decoder.config.feature_dim) == (GRID * GRID, classes * GRID * GRID)
    # Each cell's feature is a probability distribution per attribute.
    images = []
    for record in shapes.split("test")[:2]:
        with Image.open(record.path) as image:
            images.append(image.convert("RGB"))
    features = model.encode(model.images_to_batch(images)).view(2, classes, GRID * GRID)
    sums = torch.stack([group.sum(dim=1) for group in features.split([len(g) for g in CELL_CLASSES], dim=1)])
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
    # The head in the model is the one pretraining trained and saved for resuming.
    saved = torch.load(run / "encoder-pretrained.pt", weights_only=True)["state_dict"]
    assert torch.equal(saved["head.weight"], model.encoder.head.weight)
    # A run stopped before its first epoch keeps only its pretrained CNN; started again with another
    # encoder, that file is refused, not loaded half.
    for name in ("last.pt", "model.pt", "metrics.jsonl"):
        (run / name).unlink()
    other = tiny_config(shapes_json, run, tmp_path / "cache", **{**overrides, "encoder": "resnet34"})
    with pytest.raises(CaptionerError, match="does not fit this encoder"):
        train(other)
    with pytest.raises(CaptionerError, match=f"pool grid must be {GRID}"):
        train(tiny_config(shapes_json, tmp_path / "other", tmp_path / "cache", **{**overrides, "pool_grid": 1}))
    # The same pretrained CNN under the other protocol would have seen what that protocol hides.
    scenes = tiny_config(shapes_json, run, tmp_path / "cache", **{**overrides, "protocol": "novel-scenes"})
    with pytest.raises(CaptionerError, match="pretrained under protocol novel-captions"):
        train(scenes)


@pytest.mark.slow  # CNN pretraining, then training on it, per protocol (novel-captions: the run above)
@pytest.mark.parametrize("protocol", ["novel-captions", "novel-scenes"])
def test_the_protocol_is_recorded_in_the_checkpoint_and_reported(shapes, auxiliary_run, protocol):
    model = Captioner.load(auxiliary_run(protocol) / "model.pt")
    assert model.encoder.pretraining["protocol"] == protocol
    assert model.encoder.pretraining["held_out"] == (["green:triangle"] if protocol == "novel-scenes" else [])
    report, _ = evaluate_split(model, shapes, "test", full=False)
    assert report["protocol"] == protocol
    # The CNN's readings of the held-out objects, from its own cell head: every one is counted.
    held = [o for r in shapes.split("holdout") for o in Scene.from_dict(r.scene).objects if (o.colour, o.shape) == ("green", "triangle")]
    assert report["holdout"]["cnn_reads_held_out"]["objects"] == len(held) > 0
    assert report["cnn_reads"]["objects"] == sum(len(r.scene["objects"]) for r in shapes.split("test"))
