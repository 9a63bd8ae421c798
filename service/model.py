"""The served model: loading it, and what clients are told about it (never a file-system path)."""

from __future__ import annotations

from pathlib import Path

from captioner.errors import CaptionerError
from captioner.models.captioner import Captioner
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
    return model


def model_card(model: Captioner) -> dict:
    """What ``GET /v1/model`` answers: identity, vocabulary, encoder, embedding, training metrics."""
    return {
        "name": model.name,
        "version": model.version,
        "created": model.created,
        "vocab_size": len(model.vocab),
        "encoder": {
            **model.encoder.config.to_dict(),
            "feature_dim": model.encoder.feature_dim,
            # A weights file is named by its base name only: the rest is server detail.
            "weights": Path(str(model.encoder.weights)).name,
        },
        "decoder": model.decoder.config.to_dict(),
        "embedding": model.embedding,
        "training_metrics": model.metrics,
        "device": str(model.device),
    }
