"""One-file checkpoints of plain data: ``torch.load(path, weights_only=True)`` reads them.

A checkpoint carries everything inference needs (configs, weights, vocabulary) and what a reader
wants to know (where the embeddings and encoder weights came from, training metrics), so a model
is rebuilt from the file alone.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import torch

from captioner.data.vocab import Vocabulary
from captioner.errors import CaptionerError
from captioner.io import atomic_write
from captioner.models.captioner import Captioner
from captioner.models.decoder import DecoderConfig, LSTMDecoder
from captioner.models.encoder import Encoder, EncoderConfig

FORMAT = "captioner"
VERSION = 4  # 2: attention with cell positions; 3: positions from grid coordinates; 4: input feeding, coverage


def model_state(model: Captioner, **extra) -> dict:
    """The checkpoint dictionary of ``model``; ``extra`` adds top-level entries (metrics, training state)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "encoder": {
            "config": model.encoder.config.to_dict(),
            "weights": model.info.get("encoder_weights", "none"),
            "state_dict": model.encoder.state_dict(),
        },
        "decoder": {"config": model.decoder.config.to_dict(), "state_dict": model.decoder.state_dict()},
        "vocab": list(model.vocab.words),
        "embedding": model.info.get("embedding", {}),
        **extra,
    }


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Writes ``state`` atomically: a crash mid-write never leaves a torn file at ``path``."""
    with atomic_write(path) as f:
        torch.save(state, f)


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dictionary in ``path``, checked to be ours and of a version we read."""
    path = Path(path)
    if not path.is_file():
        raise CaptionerError(f"model file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise CaptionerError(f"{path.name} is not a captioner model: it cannot be read as a checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CaptionerError(f"{path.name} is not a captioner model (a PyTorch file of some other kind)")
    if state.get("version") != VERSION:
        raise CaptionerError(
            f"{path.name} has checkpoint format version {state.get('version')}; this captioner reads "
            f"version {VERSION} (retrain older models)"
        )
    missing = [k for k in ("encoder", "decoder", "vocab") if k not in state]
    if missing:
        raise CaptionerError(f"{path.name} is an incomplete captioner model: no {', '.join(missing)}")
    return state


def build_captioner(state: dict) -> Captioner:
    """A captioner rebuilt from a checkpoint dictionary."""
    try:
        vocab = Vocabulary(state["vocab"])
        encoder = Encoder(EncoderConfig.from_dict(state["encoder"]["config"]))
        encoder.load_state_dict(state["encoder"]["state_dict"])
        config = DecoderConfig(**state["decoder"]["config"])
        decoder_state = state["decoder"]["state_dict"]
        decoder = LSTMDecoder(config, decoder_state["embed.weight"], pad_id=vocab.pad)
        decoder.load_state_dict(decoder_state)
    except (KeyError, TypeError, RuntimeError) as exc:
        raise CaptionerError(f"the checkpoint's model does not fit together ({type(exc).__name__})") from None
    info = {
        "encoder_weights": state["encoder"].get("weights", "none"),
        "embedding": state.get("embedding", {}),
        "metrics": state.get("metrics", {}),
        "created": state.get("created"),
    }
    return Captioner(encoder, decoder, vocab, info)


def load_captioner(path: str | Path, device: str | torch.device = "cpu") -> Captioner:
    """Reads ``path`` and rebuilds its captioner in eval mode on ``device``."""
    model = build_captioner(read_checkpoint(path))
    model.info["name"] = Path(path).name
    return model.to(device).eval()
