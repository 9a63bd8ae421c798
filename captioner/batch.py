"""Offline batch captioning: many image files in, one JSON record per image out, in input order.

Images are decoded in DataLoader worker processes while the model runs; an image that cannot be
decoded becomes an error record and never stops the run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from captioner.data.images import ImageError, decode_image
from captioner.options import DecodeOptions
from captioner.errors import CaptionerError
from captioner.models.captioner import Captioner
from captioner.models.encoder import EncoderConfig, image_to_tensor

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


def collect_inputs(inputs: Sequence[str]) -> list[Path]:
    """Image paths from files, folders (recursively, sorted) and text files listing images.

    Args:
        inputs: what the user named. A file with an image suffix is an image; another file is a
            list of images, one per line (relative to the list's folder; ``#`` starts a comment).

    Returns:
        The image paths, in the order given.
    """
    paths: list[Path] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            paths.append(path)
        elif path.is_file():
            try:
                lines = path.read_text().splitlines()
            except UnicodeDecodeError:
                raise CaptionerError(f"{name} is neither an image (by its suffix) nor a text list of images") from None
            for line in lines:
                line = line.split("#", 1)[0].strip()
                if line:
                    paths.append(path.parent / line)
        else:
            raise CaptionerError(f"input not found: {name}")
    return paths


class _DecodedImages(Dataset):
    """(index, tensor or None, error or None) per path; decoding errors are data, not exceptions."""

    def __init__(self, paths: Sequence[Path], config: EncoderConfig):
        self.paths, self.config = list(paths), config

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, image_to_tensor(decode_image(self.paths[i]).image, self.config), None
        except ImageError as exc:
            return i, None, {"code": exc.code, "message": str(exc)}


def _collate(items):
    return items


def caption_paths(
    model: Captioner,
    paths: Sequence[Path],
    options: DecodeOptions,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = False,
) -> Iterator[dict]:
    """Captions ``paths`` in batches, yielding one record per path in order.

    Yields:
        ``{"image", "captions": [{"text", "log_prob", "perplexity"}]}`` or ``{"image", "error": {"code", "message"}}``.
    """
    loader = DataLoader(
        _DecodedImages(paths, model.encoder.config),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    bar = tqdm(total=len(paths), desc="captioning", unit="img", disable=not progress)
    for items in loader:
        good = [(i, x) for i, x, _ in items if x is not None]
        described = {}
        if good:
            features = model.encode(torch.stack([x for _, x in good]).to(model.device))
            seeds = [options.seed] * len(good)
            for (i, _), captions in zip(good, model.describe(model.generate(features, options, seeds))):
                described[i] = captions
        for i, _, error in items:
            record = {"image": str(paths[i])}
            record |= {"error": error} if error else {"captions": described[i]}
            yield record
        bar.update(len(items))
    bar.close()
