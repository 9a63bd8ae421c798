"""The options of training and of caption generation, checked on construction.

Plain data without torch, so that the command line can build its parser, and refuse bad options,
without first spending seconds importing torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from captioner.errors import CaptionerError

BACKBONES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
)
MODES = ("greedy", "sample", "beam")
MAX_CAPTIONS = 10
MAX_BEAM_SIZE = 16
MAX_LENGTH = 100


@dataclass(frozen=True)
class DecodeOptions:
    """How to generate; validated on construction so every entry point gives the same errors."""

    mode: str = "greedy"
    num_captions: int = 1
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    top_p: float = 1.0  # 1: no nucleus filtering
    beam_size: int = 3
    max_length: int = 30
    seed: int | None = None

    def __post_init__(self):
        def bad(message):
            raise CaptionerError(message)

        if self.mode not in MODES:
            bad(f"unknown mode {self.mode!r}: use greedy, sample or beam")
        if not 1 <= self.num_captions <= MAX_CAPTIONS:
            bad(f"num_captions must be between 1 and {MAX_CAPTIONS}")
        if self.mode == "greedy" and self.num_captions != 1:
            bad("greedy decoding gives one caption; use sample or beam for more")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            bad("temperature must be a number greater than 0")
        if self.top_k < 0:
            bad("top_k must be 0 (off) or a positive number of words")
        if not (0 < self.top_p <= 1):
            bad("top_p must be in (0, 1]")
        if not 1 <= self.beam_size <= MAX_BEAM_SIZE:
            bad(f"beam_size must be between 1 and {MAX_BEAM_SIZE}")
        if self.mode == "beam" and self.num_captions > self.beam_size:
            bad(f"beam search with beam_size {self.beam_size} gives at most {self.beam_size} captions")
        if not 1 <= self.max_length <= MAX_LENGTH:
            bad(f"max_length must be between 1 and {MAX_LENGTH}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainConfig:
    """Every option of ``captioner train``; unknown keys are errors (``from_dict``)."""

    data: str
    out: str
    format: str = "auto"
    images: str | None = None
    skip_missing: bool = False
    # None picks by data: for the shapes world a small CNN pretrained on its scenes whose last
    # map is pooled to the scene grid; for photos ResNet-50 with ImageNet weights, globally pooled.
    encoder: str | None = None
    encoder_weights: str = "auto"  # auto: auxiliary pretraining on the shapes world, else imagenet
    image_size: int | None = None
    pool_grid: int | None = None
    pretrain_epochs: int = 10
    word2vec: str | None = None
    embed_dim: int | None = None
    hidden_size: int = 128
    num_layers: int = 1
    dropout: float = 0.3
    min_count: int = 5
    max_caption_length: int = 30
    epochs: int = 9
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.0
    clip_norm: float = 5.0
    seed: int = 0
    device: str = "auto"
    feature_cache: str | None = None
    num_workers: int = 0
    val_images: int = 1000  # validation images captioned each epoch for BLEU-4/CIDEr
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        # Refuse bad options before any work is done.
        if self.encoder is not None and self.encoder not in BACKBONES:
            raise CaptionerError(f"unknown encoder {self.encoder!r}; choose one of {', '.join(BACKBONES)}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.clip_norm <= 0:
            raise CaptionerError("epochs and batch size must be at least 1, lr and clip norm positive")

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CaptionerError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**values)
