"""The served model: loading it, and what clients are told about it (never a file-system path)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from captioner.errors import CaptionerError
from captioner.models.captioner import Captioner


def file_digest(path: str | Path, length: int = 12) -> str:
    """Short SHA-256 of a file: the model version, which changes whenever the weights do."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def load_model(path: str | Path | None, device: str = "auto", name: str | None = None) -> Captioner:
    """The captioner in ``path``, with ``info["name"]`` and ``info["version"]`` set for clients.

    Raises:
        CaptionerError: no path configured, or not a readable captioner checkpoint.
    """
    from captioner.training import resolve_device

    if not path:
        raise CaptionerError("no model configured: set CAPTIONER_MODEL_PATH to a model.pt file")
    model = Captioner.load(path, resolve_device(device))
    model.info["name"] = name or f"captioner-{model.encoder.config.name}-lstm"
    model.info["version"] = file_digest(path)
    return model


def model_card(model: Captioner) -> dict:
    """What ``GET /v1/model`` answers: identity, vocabulary, encoder, embedding, training metrics."""
    info = model.info
    decoder = model.decoder.config.to_dict()
    return {
        "name": info["name"],
        "version": info["version"],
        "created": info.get("created"),
        "vocab_size": len(model.vocab),
        "encoder": {
            **model.encoder.config.to_dict(),
            "feature_dim": model.encoder.feature_dim,
            # A weights file is named by its base name only: the rest is server detail.
            "weights": Path(str(info.get("encoder_weights", "none"))).name,
        },
        "decoder": decoder,
        "embedding": info.get("embedding", {}),
        "training_metrics": info.get("metrics", {}),
        "device": str(model.device),
    }
