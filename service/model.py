"""The served model: loading it, what the HTTP process knows of it, and what clients are told
about it (never a file-system path)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from captioner.data.images import ALLOWED_FORMATS
from captioner.errors import CaptionerError
from captioner.models.captioner import Captioner
from captioner.models.encoder import ImageTransform
from captioner.options import MAX_BEAM_SIZE, MAX_CAPTIONS, MAX_LENGTH, MODES, DecodeOptions
from captioner.runtime import resolve_device


def load_model(path: str | Path | None, device: str = "auto", name: str | None = None, cnn: str = "eager") -> Captioner:
    """The captioner in ``path``, named ``name`` for clients when given, its CNN in ``cnn`` arithmetic.

    Raises:
        CaptionerError: no path configured, or not a readable captioner checkpoint.
    """
    if not path:
        raise CaptionerError("no model configured: set CAPTIONER_MODEL_PATH to a model.pt file")
    model = Captioner.load(path, resolve_device(device), cnn=cnn)
    if name:
        model.name = name
    if model.memory:  # re-ranking's CIDEr-D tables (seconds for Flickr8k): now, not at the first beam request
        model.memory.cider
    return model


@dataclass(frozen=True)
class ServedModel:
    """What the HTTP process knows of the model in the model process: plain data, sent once."""

    name: str
    version: str
    transform: ImageTransform  # the model's preprocessing, run by the request threads
    pool_grid: int  # attention's cells per side
    card: dict  # model_card's, without the limits on requests
    default_decoding: dict | None = None  # the decoding the model was chosen with, where it carries one

    @classmethod
    def of(cls, model: Captioner) -> ServedModel:
        card = model_card(model)
        chosen = dict(model.default_decoding) or None  # None: the model carries no default decoding
        return cls(model.name, model.version, model.transform, model.encoder.config.pool_grid, card, chosen)


def model_card(model: Captioner) -> dict:
    """What ``GET /v1/model`` answers, less the limits on requests: identity, what it was trained
    on and how it scored, its vocabulary, encoder, embedding and decoding defaults."""
    grid = model.encoder.config.pool_grid
    return {
        "name": model.name,
        "version": model.version,
        "created": model.created,
        "trained_on": model.data or None,  # None: a checkpoint from before the record
        "training_metrics": model.metrics,  # the saved epoch's: val_* are on the validation split
        "vocab_size": len(model.vocab),
        "encoder": {
            **model.encoder.config.to_dict(),
            "feature_dim": model.encoder.feature_dim,
            # A weights file is named by its base name only: the rest is server detail.
            "weights": Path(str(model.encoder.weights)).name,
        },
        "attention_grid": [grid, grid],  # rows, columns of cells over the whole (resized) image
        "decoder": model.decoder.config.to_dict(),
        "embedding": model.embedding,
        "decoding": {
            "defaults": DecodeOptions.resolve(model.default_decoding, {}).to_dict(),  # the model's own, where it has one
            "modes": list(MODES),
            "limits": {"num_captions": MAX_CAPTIONS, "beam_size": MAX_BEAM_SIZE, "max_length": MAX_LENGTH},
            # Beam search's re-ranking by the training captions the model keeps (None: it keeps none).
            "rerank": dict(zip(("neighbours", "images"), model.memory.summary)) if model.memory else None,
        },
        "device": str(model.device),
        "cnn": model.encoder.cnn,  # eager (fp32) or int8
    }


def limits_card(max_bytes: int, max_pixels: int) -> dict:
    """The limits on requests, for the model card."""
    return {"max_bytes": max_bytes, "max_pixels": max_pixels, "formats": list(ALLOWED_FORMATS)}
