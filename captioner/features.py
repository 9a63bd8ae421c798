"""Image features of a frozen encoder, computed once and cached on disk.

The cache lives in ``CACHE_DIR/<encoder fingerprint>/``: the fingerprint covers the backbone,
its input preparation and every weight, and each image is keyed by its absolute path, size and
modification time. Features are written in shards as they are computed, so an interrupted
extraction resumes where it stopped, and decoder epochs never run the CNN again.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from captioner.io import atomic_write
from captioner.models.encoder import Encoder, ImageTransform, weights_fingerprint

SHARD_SIZE = 2048


def default_cache_dir() -> Path:
    """``$CAPTIONER_CACHE`` or ``~/.cache/captioner/features`` (XDG_CACHE_HOME respected)."""
    if os.environ.get("CAPTIONER_CACHE"):
        return Path(os.environ["CAPTIONER_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "captioner" / "features"


class ImageTensors(Dataset):
    """Decodes image files to normalised tensors (in DataLoader workers)."""

    def __init__(self, paths: Sequence[Path], transform: ImageTransform):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform.load(self.paths[i])


def _image_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()


def image_batches(
    paths: Sequence[Path], transform: ImageTransform, batch_size: int, num_workers: int = 0, progress: bool = False
):
    """Yields (B, 3, S, S) normalised image batches of ``paths``, in order, decoded in ``num_workers`` processes."""
    loader = DataLoader(ImageTensors(paths, transform), batch_size=batch_size, num_workers=num_workers)
    yield from tqdm(loader, desc="images", unit="batch", disable=not progress, leave=False)


@torch.inference_mode()
def compute_features(
    encoder: Encoder,
    paths: Sequence[Path],
    *,
    device: torch.device,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
):
    """Yields (B, F) float32 feature batches of ``paths``, in order."""
    encoder = encoder.to(device).eval()
    for batch in image_batches(paths, encoder.transform, batch_size, num_workers, progress):
        batch = batch.to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
            yield encoder.forward_features(batch).float().cpu()


def cached_features(
    encoder: Encoder,
    paths: Sequence[Path],
    *,
    cache_dir: Path,
    device: torch.device,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """(N, F) features of ``paths``, computing only those not in the cache.

    Args:
        encoder: the frozen encoder.
        paths: image files.
        cache_dir: the cache root (see ``default_cache_dir``).
        device: where the encoder runs.
        batch_size: images per forward pass.
        num_workers: DataLoader worker processes decoding images.
        progress: show a progress bar.

    Returns:
        The features, in the order of ``paths``.
    """
    root = Path(cache_dir) / weights_fingerprint(encoder)
    root.mkdir(parents=True, exist_ok=True)
    index_path = root / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    keys = [_image_key(Path(p)) for p in paths]
    todo = sorted({k: i for i, k in enumerate(keys) if k not in index}.values())
    bar = tqdm(total=len(todo), desc="encoding images", unit="img", disable=not progress or not todo)
    for start in range(0, len(todo), SHARD_SIZE):
        chunk = todo[start : start + SHARD_SIZE]
        parts = []
        for part in compute_features(
            encoder, [paths[i] for i in chunk], device=device, batch_size=batch_size, num_workers=num_workers
        ):
            parts.append(part)
            bar.update(len(part))
        feats = torch.cat(parts)
        shard = f"shard-{uuid.uuid4().hex[:12]}.pt"
        with atomic_write(root / shard) as f:
            torch.save(feats.clone(), f)
        index.update({keys[i]: [shard, row] for row, i in enumerate(chunk)})
        with atomic_write(index_path, "w") as f:
            f.write(json.dumps(index))
    bar.close()
    shards = {}
    rows = []
    for key in keys:
        shard, row = index[key]
        if shard not in shards:
            shards[shard] = torch.load(root / shard, weights_only=True)
        rows.append(shards[shard][row])
    return torch.stack(rows) if rows else torch.empty(0, encoder.feature_dim)
