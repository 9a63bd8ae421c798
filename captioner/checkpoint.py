"""Checkpoint files: saving atomically, reading back, checking format and version.

File work only: what goes into a checkpoint is the model's business (``Captioner.to_checkpoint``,
``Captioner.from_checkpoint``). A checkpoint is plain data that ``torch.load(path,
weights_only=True)`` reads, stamped here with the format, its version and when it was written.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path

import torch

from captioner.errors import CaptionerError
from captioner.io import atomic_write

FORMAT = "captioner"
VERSION = 5  # 2: cell positions; 3: from grid coordinates; 4: input feeding, coverage; 5: copying class names


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Writes ``state``, stamped with format, version and time, atomically: a crash mid-write
    never leaves a torn file at ``path``."""
    stamped = {
        "format": FORMAT,
        "version": VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **state,
    }
    with atomic_write(path) as f:
        torch.save(stamped, f)


def read_checkpoint(path: str | Path) -> dict:
    """The dictionary in ``path``, checked to be a captioner checkpoint of the version this code reads."""
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
    return state


def file_digest(path: str | Path, length: int = 12) -> str:
    """Short SHA-256 of a file: a model's version, which changes whenever its weights do."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]
