"""Image features of a frozen encoder, computed once and cached on disk.

The cache lives in ``CACHE_DIR/<encoder fingerprint>/``: the fingerprint covers the backbone,
its input preparation and every weight, and each image is keyed by its absolute path, size and
modification time. Features are written in shards as they are computed, so an interrupted
extraction resumes where it stopped, and decoder epochs never run the CNN again.

``index.json`` records each shard's SHA-256 and the images it holds, and a checksum of itself: a
shard that is damaged, truncated, deleted or swapped for another is recomputed with a warning,
never trusted, and so is everything a damaged index listed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from captioner.io import atomic_write, remove_temporaries
from captioner.models.encoder import Encoder, ImageTransform, weights_fingerprint

SHARD_SIZE = 2048
# A temporary file or an unlisted shard younger than this may be another run's write in progress.
STALE_SECONDS = 3600
INDEX_VERSION = 2  # 2: each shard with its SHA-256 and its images, the whole with a checksum


def default_cache_dir() -> Path:
    """``$CAPTIONER_CACHE`` or ``~/.cache/captioner/features`` (XDG_CACHE_HOME respected)."""
    if os.environ.get("CAPTIONER_CACHE"):
        return Path(os.environ["CAPTIONER_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "captioner" / "features"


class ImageTensors(Dataset):
    """Decodes image files to resized uint8 pixels (in DataLoader workers)."""

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
    for pixels in tqdm(loader, desc="images", unit="batch", disable=not progress, leave=False):
        yield transform.normalize(pixels)


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
    if device.type == "cpu" and encoder.cnn == "eager":
        encoder.use_channels_last()  # the same features, several times sooner on the CPU (EfficientNet-Lite0: 3.6x)
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

    Every shard is checked against the SHA-256 and the images the index records for it before
    its features are used; a damaged, truncated, deleted or swapped shard (or a damaged index) is
    computed again, with a one-line warning, instead of trusted.

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
    remove_temporaries(root, older_than=STALE_SECONDS)
    index = _read_index(root / "index.json")
    _remove_unlisted_shards(root, index)
    keys = [_image_key(Path(p)) for p in paths]
    loaded = _load_shards(root, index, set(keys), encoder.feature_dim)
    where = {key: (name, row) for name in loaded for row, key in enumerate(index[name]["images"])}
    todo = sorted({k: i for i, k in enumerate(keys) if k not in where}.values())
    bar = tqdm(total=len(todo), desc="encoding images", unit="img", disable=not progress or not todo)
    for start in range(0, len(todo), SHARD_SIZE):
        chunk = todo[start : start + SHARD_SIZE]
        parts = []
        for part in compute_features(
            encoder, [paths[i] for i in chunk], device=device, batch_size=batch_size, num_workers=num_workers
        ):
            parts.append(part)
            bar.update(len(part))
        name, loaded[name] = _write_shard(root, torch.cat(parts), index, [keys[i] for i in chunk])
        where |= {keys[i]: (name, row) for row, i in enumerate(chunk)}
    bar.close()
    rows = [loaded[name][row] for name, row in (where[key] for key in keys)]
    return torch.stack(rows) if rows else torch.empty(0, encoder.feature_dim)


def _write_shard(root: Path, feats: torch.Tensor, index: dict, images: list[str]) -> tuple[str, torch.Tensor]:
    """Writes (N, F) ``feats`` of ``images`` as a new shard and records it, with its SHA-256, in
    ``index`` and index.json; returns its name and the features as a reader will see them."""
    name = f"shard-{uuid.uuid4().hex[:12]}.pt"
    buffer = io.BytesIO()
    torch.save(feats.clone(), buffer)  # clone: only these rows, not a larger storage they view
    data = buffer.getvalue()
    with atomic_write(root / name) as f:
        f.write(data)
    index[name] = {"sha256": hashlib.sha256(data).hexdigest(), "images": images}
    _write_index(root / "index.json", index)
    return name, torch.load(io.BytesIO(data), weights_only=True)


def _remove_unlisted_shards(root: Path, index: dict) -> None:
    """Removes shards no index lists (a damaged index's, or a run's that lost a race to write the
    index), once they are old enough not to be another live run's newest shard."""
    now = time.time()
    for path in root.glob("shard-*.pt"):
        try:
            if path.name not in index and now - path.stat().st_mtime >= STALE_SECONDS:
                path.unlink()
        except FileNotFoundError:
            pass


def _warn(message: str) -> None:
    tqdm.write(f"captioner: warning: {message}", file=sys.stderr)


def _index_digest(shards: dict) -> str:
    return hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest()


def _read_index(path: Path) -> dict[str, dict]:
    """The shards ``path`` lists, ``{name: {"sha256", "images": [key, ...]}}``; none (with a
    warning) if the index is damaged, not ours or of an older captioner."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        shards = data["shards"]
        whole = data["version"] == INDEX_VERSION and data["checksum"] == _index_digest(shards)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        whole = False
    if not whole:
        _warn(f"the feature cache index {path} is damaged or of an older captioner: recomputing its features")
        return {}
    return shards


def _write_index(path: Path, shards: dict) -> None:
    with atomic_write(path, "w") as f:
        f.write(json.dumps({"version": INDEX_VERSION, "shards": shards, "checksum": _index_digest(shards)}))


def _load_shards(root: Path, index: dict, wanted: set[str], feature_dim: int) -> dict[str, torch.Tensor]:
    """The features of every shard holding a ``wanted`` image, each checked against its digest
    and size in ``index``; a shard that fails is dropped from ``index`` (so it is recomputed)."""
    loaded = {}
    for name, entry in list(index.items()):
        if not wanted.intersection(entry["images"]):
            continue
        try:
            data = (root / name).read_bytes()
            feats = torch.load(io.BytesIO(data), weights_only=True) if hashlib.sha256(data).hexdigest() == entry["sha256"] else None
        except OSError:  # deleted, unreadable
            feats = None
        if isinstance(feats, torch.Tensor) and feats.shape == (len(entry["images"]), feature_dim):
            loaded[name] = feats
        else:
            _warn(f"feature cache shard {root / name} is damaged or missing: recomputing its {len(entry['images'])} images")
            del index[name]
            (root / name).unlink(missing_ok=True)
    return loaded
