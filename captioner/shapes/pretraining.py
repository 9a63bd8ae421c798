"""Auxiliary pretraining of the CNN on the shapes world: the stand-in for ImageNet pretraining.

On photos the encoder comes with ImageNet weights. No such weights exist for the synthetic shapes
world, so the CNN first learns a supervised task the scenes provide for free: for each cell of
the scene grid, which shape, colour and size sits there (or that it is empty). Then it is frozen
and used exactly as an ImageNet CNN would be.

Like ImageNet beside COCO, the pretraining images are not the captioning data: every epoch draws
fresh scenes of the same world (held-out combinations excluded, up to 7 objects where captions
describe 3) and their mirror images, so the CNN never sees an image twice and cannot overfit; the
data set's validation images measure it.

The CNN's last feature map is average-pooled to the scene grid and one small classifier, the
encoder's cell head, shared by all cells, reads each cell: every cell of every image trains the
same weights, which learns far faster on a CPU than a separate head per cell. The head stays with
the encoder: its class probabilities per cell are the features the decoder reads.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from captioner.data.datasets import ImageRecord
from captioner.errors import CaptionerError
from captioner.models.encoder import Encoder
from captioner.shapes.render import render_scene
from captioner.shapes.world import COLOURS, GRID, SHAPES, SIZES, Scene, parse_holdout, sample_scene

# Each attribute is a classification over its values plus "empty cell".
ATTRIBUTES = (("shape", len(SHAPES)), ("colour", len(COLOURS)), ("size", len(SIZES)))


def cell_labels(scene: Scene) -> torch.Tensor:
    """(GRID*GRID, 3) class per cell (row-major) and attribute; the last class of each means an empty cell."""
    labels = torch.tensor([count for _, count in ATTRIBUTES]).repeat(GRID * GRID, 1)  # (G*G, 3), all empty
    for obj in scene.objects:
        labels[obj.row * GRID + obj.col] = torch.tensor(
            [SHAPES.index(obj.shape), COLOURS.index(obj.colour), SIZES.index(obj.size)]
        )
    return labels


# The encoder's cell head for the shapes world: each attribute's values by name, "" for an empty cell.
COLOUR_CLASSES = (*COLOURS, "")
CELL_CLASSES = ((*SHAPES, ""), COLOUR_CLASSES, (*SIZES, ""))
# Pretraining scenes hold up to 7 objects where captioned ones hold 3: twice the objects per image
# on average, and the cost is per image. 9 epochs of captioned-size scenes left 4% of small shapes
# misread, which put a ceiling under the captions' truthfulness.
PRETRAINING_OBJECTS = 7


class CellClassifier(nn.Module):
    """Encoder with its cell head -> per-cell logits for every attribute, (B, GRID*GRID, sum(count + 1))."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        if encoder.config.cell_classes != CELL_CLASSES or encoder.config.pool_grid != GRID:
            raise CaptionerError(
                f"auxiliary pretraining needs an encoder with pool grid {GRID} and cell classes {CELL_CLASSES}"
            )
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.cell_logits(images)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        total, start = 0.0, 0
        for j, (_, count) in enumerate(ATTRIBUTES):
            part = logits[..., start : start + count + 1]
            total = total + F.cross_entropy(part.flatten(0, 1), labels[..., j].flatten())
            start += count + 1
        return total

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        predictions, start = [], 0
        for _, count in ATTRIBUTES:
            predictions.append(logits[..., start : start + count + 1].argmax(-1))
            start += count + 1
        return torch.stack(predictions, dim=-1)  # (B, G*G, 3)


def _tensors(encoder: Encoder, records: Sequence[ImageRecord]) -> tuple[torch.Tensor, torch.Tensor]:
    images = encoder.transform.normalize(torch.stack([encoder.transform.load(r.path) for r in records]))
    labels = torch.stack([cell_labels(Scene.from_dict(r.scene)) for r in records])
    return images, labels


def _fresh_scenes(
    encoder: Encoder, world: dict, count: int, rng: random.Random, holdout: frozenset[tuple[str, str]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` images of ``world`` (the data set's generation settings), in random order: half
    newly drawn and rendered scenes, none showing a pair of ``holdout``, half their mirror images.

    Rendering is a fifth of an epoch's time, and a mirrored scene is as good as a new one: every
    shape is left-right symmetric and the grid mirrors onto itself, so only the cells' columns change.
    """
    scenes = [sample_scene(rng, holdout=holdout, max_objects=PRETRAINING_OBJECTS) for _ in range((count + 1) // 2)]
    images = torch.stack([encoder.transform(render_scene(s, world["image_size"], rng)) for s in scenes])
    labels = torch.stack([cell_labels(scene) for scene in scenes])  # (n, G*G, 3), cells row-major
    mirrored = labels.view(-1, GRID, GRID, labels.size(-1)).flip(2).flatten(1, 2)
    order = torch.randperm(2 * len(scenes), generator=torch.Generator().manual_seed(rng.getrandbits(63)))[:count]
    return torch.cat([images, images.flip(-1)])[order], torch.cat([labels, mirrored])[order]


BATCH_SIZE = 64  # scenes per step
LR = 6e-3  # the peak AdamW learning rate of the one-cycle schedule


def pretrain_encoder(
    encoder: Encoder,
    world: dict,
    val: Sequence[ImageRecord],
    *,
    epochs: int,
    images_per_epoch: int,
    device: torch.device,
    seed: int,
    protocol: str = "novel-scenes",
    progress: bool = False,
) -> dict:
    """Trains ``encoder`` (in place) to read the scene grid, then freezes it.

    Args:
        encoder: a randomly initialised encoder; its weights are trained.
        world: the shapes world's settings (the data set's ``shapes_world``: image size, held-out pairs).
        val: validation records with scenes, for the reported accuracy.
        epochs: number of epochs.
        images_per_epoch: fresh scenes drawn for each epoch.
        device: where to train.
        seed: random seed of the drawn scenes.
        protocol: ``novel-scenes`` keeps the world's held-out pairs out of the pretraining scenes;
            ``novel-captions`` shows every combination (only the captions hold pairs out).
        progress: show a progress bar.

    Returns:
        ``{"epochs", "protocol", "held_out", "val_cell_accuracy", "val_<attribute>_accuracy"...}``:
        ``held_out`` lists the pairs no pretraining scene showed; a cell counts as right when its
        shape, colour and size (or emptiness) are all predicted right.
    """
    holdout = parse_holdout(world.get("holdout", [])) if protocol == "novel-scenes" else frozenset()
    rng = random.Random(seed)
    val_x, val_y = _tensors(encoder, val)
    for module in encoder.modules():
        # torchvision's MobileNetV3 keeps batch-norm statistics with momentum 0.01, tuned for
        # ImageNet's long epochs; over a few hundred steps they would lag far behind the weights.
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    encoder.requires_grad_(True)
    # Channels-last convolutions train a third faster on CPUs (oneDNN) and are no slower on GPUs.
    model = CellClassifier(encoder).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    steps = epochs * ((images_per_epoch + BATCH_SIZE - 1) // BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=steps)
    bar = tqdm(total=steps, desc="pretraining CNN", unit="step", disable=not progress)
    for _ in range(epochs):
        model.train()
        train_x, train_y = _fresh_scenes(encoder, world, images_per_epoch, rng, holdout)
        for x, y in zip(train_x.split(BATCH_SIZE), train_y.split(BATCH_SIZE)):
            loss = model.loss(model(x.to(device, memory_format=torch.channels_last)), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    with torch.inference_mode():
        predicted = torch.cat([model.predict(model(x.to(device))).cpu() for x in val_x.split(256)])
    right = predicted == val_y  # (N, G*G, 3)
    held_out = sorted(f"{colour}:{shape}" for colour, shape in holdout)
    result = {"epochs": epochs, "protocol": protocol, "held_out": held_out}
    result["val_cell_accuracy"] = right.all(-1).float().mean().item()
    for j, (name, _) in enumerate(ATTRIBUTES):
        result[f"val_{name}_accuracy"] = right[..., j].float().mean().item()
    encoder.to("cpu", memory_format=torch.contiguous_format).freeze()
    return result
