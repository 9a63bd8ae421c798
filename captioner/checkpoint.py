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
# 2: cell positions; 3: from grid coordinates; 4: input feeding, coverage; 5: copying class names;
# 6: a checksum of the content
VERSION = 6
READABLE = (5, 6)  # version 5 has no checksum: its tensors are only checked to be finite


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Writes ``state``, stamped with format, version, time and a checksum of it all, atomically:
    a crash mid-write never leaves a torn file at ``path``."""
    # A state read from an older file keeps its creation time but is written as this version.
    stamped = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **state, "format": FORMAT, "version": VERSION}
    stamped["checksum"] = content_digest(stamped)
    with atomic_write(path) as f:
        torch.save(stamped, f)


def read_checkpoint(path: str | Path) -> dict:
    """The dictionary in ``path``, checked to be an undamaged captioner checkpoint of a version
    this code reads.

    Raises:
        CaptionerError: naming the file, if it is absent, of another kind or version, or damaged
            (unreadable, a checksum that does not match, or a weight that is not finite).
    """
    path = Path(path)
    if not path.is_file():
        raise CaptionerError(f"model file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise CaptionerError(
            f"{path.name} is damaged or not a captioner model: it cannot be read as a checkpoint"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CaptionerError(f"{path.name} is not a captioner model (a PyTorch file of some other kind)")
    if state.get("version") not in READABLE:
        raise CaptionerError(
            f"{path.name} has checkpoint format version {state.get('version')}; this captioner reads "
            f"versions {READABLE[0]} to {READABLE[-1]} (retrain older models)"
        )
    recorded = state.pop("checksum", None)
    if state["version"] >= 6 and recorded != content_digest(state):
        problem = "its content does not match the checksum written with it"
    elif not _all_finite(state):
        problem = "it holds numbers that are NaN or infinite"
    else:
        return state
    raise CaptionerError(f"{path.name} is damaged: {problem}; restore it from a copy or train again")


def content_digest(value) -> str:
    """SHA-256 of a checkpoint's content: every tensor's dtype, shape and bytes, and every other
    value's type and repr, dictionaries in key order. Unlike a digest of the file, it does not
    depend on how torch.save lays the file out."""
    digest = hashlib.sha256()
    _feed(digest, value)
    return digest.hexdigest()


def _feed(digest, value) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}".encode())
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"{type(value).__name__}:{value!r};".encode())


def _all_finite(value) -> bool:
    """No NaN or infinity in any floating-point tensor (garbage bytes read as floats often are)."""
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_all_finite(v) for v in value)
    return True


def file_digest(path: str | Path, length: int = 12) -> str:
    """Short SHA-256 of a file: a model's version, which changes whenever its weights do."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]
