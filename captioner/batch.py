"""Offline batch captioning: many image files in, one record per image out, in input order; and
batch scoring of given captions (``score_pairs``, ``run_score_job``: one record per pair, resumable alike).

Three stages run at once: images are decoded (in DataLoader worker processes, or in the main
thread), the CNN encodes the next batches in threads of its own, and the main thread writes the
captions of the batches before, several CNN batches at a time (``DECODE_IMAGES``). An image that
cannot be decoded becomes an error record and never stops the run.

A run writing to a file can be killed at any moment and started again with the same command:
records are appended whole and in input order, so the file is always a prefix of the finished
output, give or take a torn last line, which a restart cuts off before going on after the last
complete record. Under ``torchrun`` each rank captions one contiguous slice of the inputs into its
own part file (resumable the same way) and rank 0 joins the parts, in rank order, into the output
one process would have written.
"""

from __future__ import annotations

import shutil
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from captioner.data.images import ImageError
from captioner.errors import CaptionerError
from captioner.io import atomic_write, remove_temporaries
from captioner.models.captioner import Captioner
from captioner.models.encoder import ImageTransform
from captioner.options import DecodeOptions
from captioner.records import Pair, RecordFormat, ResumableOutput, ScoreFormat
from captioner.trust import MAX_WORDS
from captioner.distributed import Process


# Images whose captions the decoder writes at once, several CNN batches together where those are
# smaller. A decoder step costs its number of operations more than its arithmetic, so images are
# cheaper by the hundred: the shapes model on one thread, greedy, 0.38 ms an image at 32, 0.20 at
# 128, 0.18 at 256; beam 3 0.88, 0.60 and 0.58. The CNN's batch (``batch_size``) is the user's to
# choose, as its cost and memory grow with it; the decoder's state is a few kilobytes an image.
DECODE_IMAGES = 128


class _DecodedImages(Dataset):
    """(index, tensor or None, error or None) per path; decoding errors are data, not exceptions."""

    def __init__(self, paths: Sequence[Path], transform: ImageTransform):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return i, *load_image(self.transform, self.paths[i])


def load_image(transform: ImageTransform, source) -> tuple[torch.Tensor | None, dict | None]:
    """(3, S, S) uint8 pixels (``ImageTransform.load``) and no error, or no pixels and
    ``{"code", "message"}``: a bad image is data."""
    try:
        return transform.load(source), None
    except ImageError as exc:
        return None, {"code": exc.code, "message": str(exc)}
    except OSError as exc:  # it opened, then a read failed (a bad disk, a network file system)
        name = Path(source).name if isinstance(source, (str, Path)) else "image"
        message = f"image file {name!r} cannot be read ({exc.strerror or type(exc).__name__})"
        return None, {"code": "unreadable_file", "message": message}


def caption_tensors(model: Captioner, pixels: torch.Tensor, options: DecodeOptions) -> list[list[dict]]:
    """(B, 3, S, S) uint8 pixels from ``load_image`` -> their captions (``caption_features``)."""
    return caption_features(model, model.encode_pixels(pixels), options)


def caption_features(model: Captioner, features: torch.Tensor, options: DecodeOptions) -> list[list[dict]]:
    """(B, F) image features -> their captions, each image seeded alike (``options.seed``), so that
    an image's captions do not depend on the batch it came in: every engine captions here."""
    return model.describe(model.generate(features, options, [options.seed] * len(features)), features)


def encoded_ahead(
    model: Captioner, batches: Iterable[tuple], threads: int | None = None, ahead: int | None = None
) -> Iterator[tuple]:
    """``(key, pixels or None)`` -> ``(key, features or None)``, in order, the CNN ahead of the caller.

    The CNN encodes the next batches in threads of its own while the caller decodes the captions
    of earlier ones: its kernels release the GIL, so on a CPU the two overlap, and on two cores
    captioning runs at about the CNN's own pace rather than at the sum of both (README, "CPU
    inference"). ``threads`` batches encode at once (default: ``cnn_threads``), and ``ahead``
    batches (default: ``threads``) are handed to the CNN beyond the one the caller has. The
    threads are made here, after the caller has sized torch's pool, which each thread reads once.
    """
    threads = threads or cnn_threads(model.device)
    ahead = ahead or threads

    def finished(key, encoding):
        return key, encoding.result() if encoding is not None else None

    with ThreadPoolExecutor(threads, thread_name_prefix="captioner-cnn") as cnn:
        encoding = deque()  # (key, future) of the batches the CNN has, oldest first
        for key, pixels in batches:
            encoding.append((key, cnn.submit(model.encode_pixels, pixels.to(model.device)) if pixels is not None else None))
            if len(encoding) > ahead:
                yield finished(*encoding.popleft())
        while encoding:
            yield finished(*encoding.popleft())


def cnn_threads(device: torch.device) -> int:
    """Batches the CNN encodes at once: two on a CPU where torch's pool is a single thread, else one.

    One CNN thread keeps one core busy; the caller's thread, decoding captions, waits for it
    whenever the CNN is the slower (a photo model always, the shapes model greedy at 32 a batch),
    and its core idles. A second CNN thread takes that core up: with one torch thread each, a
    CNN call has no parallel op to stall when the caller's thread takes the CPU. On 2 CPUs,
    ResNet-50 at 224 px went from 12 to 22 img/s and the shapes model greedy at 32 a batch from
    600 to 738 (README, "CPU inference"). Torch pools of several threads would oversubscribe the
    CPUs, and a GPU queues the calls anyway.
    """
    return 2 if device.type == "cpu" and torch.get_num_threads() == 1 else 1


def _collate(items):
    """A batch as one (G, 3, S, S) uint8 tensor of its good images and every item's error: stacked in
    the worker, so that one shared-memory tensor crosses to the main process rather than one per image."""
    good = [x for _, x, _ in items if x is not None]
    return [i for i, _, _ in items], torch.stack(good) if good else None, [error for _, _, error in items]


def caption_paths(
    model: Captioner,
    paths: Sequence[Path],
    options: DecodeOptions,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    decode_images: int = DECODE_IMAGES,
) -> Iterator[dict]:
    """Captions ``paths`` in batches, yielding one record per path in order.

    The CNN encodes ``batch_size`` images at a time; the decoder captions the CNN batches
    together until they hold ``decode_images`` images (``DECODE_IMAGES``).

    Yields:
        ``{"image", "captions": [{"text", "log_prob", "perplexity"}]}`` or ``{"image", "error": {"code", "message"}}``.
    """
    loader = DataLoader(
        _DecodedImages(paths, model.transform),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    per_group = -(-decode_images // batch_size)  # CNN batches the decoder captions at once
    # The CNN keeps the next group's batches and its threads' share in hand while the caller
    # writes this group's captions, so that its threads need not wait for the decoder.
    threads = cnn_threads(model.device)
    encoded = encoded_ahead(model, (((i, e), x) for i, x, e in loader), threads, ahead=per_group + threads)
    for group in _groups(encoded, per_group):
        features = [f for _, f in group if f is not None]
        captions = iter(caption_features(model, torch.cat(features), options) if features else ())
        for (indices, errors), _ in group:
            for i, error in zip(indices, errors):
                record = {"image": str(paths[i])}
                record |= {"error": error} if error else {"captions": next(captions)}
                yield record


def _groups(items: Iterator, size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` items (the last, what is left)."""
    group = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def run_batch_job(
    model: Captioner,
    paths: Sequence[Path],
    options: DecodeOptions,
    output: Path,
    *,
    format: str = "jsonl",
    batch_size: int = 32,
    num_workers: int = 0,
    process: Process = Process(),
    progress: bool = False,
) -> dict:
    """Captions ``paths`` into ``output``, resuming what an earlier run of the same job wrote.

    Args:
        model: the captioner.
        paths: the inputs, in output order.
        options: decoding options.
        output: the JSONL or CSV file.
        format: ``jsonl`` or ``csv``.
        batch_size: images per CNN call (the decoder takes ``DECODE_IMAGES`` or more at once).
        num_workers: DataLoader workers decoding images.
        process: this process's rank among ``world_size`` (torchrun); each captions its slice.
        progress: show a progress bar (rank 0).

    Returns:
        ``{"images", "resumed", "captioned"}`` for this process's share.
    """
    record_format = RecordFormat(format, options.num_captions)
    if process.is_main:  # a join of the parts that a kill interrupted
        remove_temporaries(output.parent, of=output.name)
    final = ResumableOutput(output, record_format)
    parts = [_part_path(output, Process(r, process.world_size)) for r in range(process.world_size)]
    if process.distributed and output.exists():
        if final.recover(paths) == len(paths):  # finished already; perhaps killed before the parts went
            process.barrier()
            if process.is_main:
                for stale in parts:
                    stale.unlink(missing_ok=True)
            return {"images": 0, "resumed": 0, "captioned": 0}
        raise CaptionerError(
            f"{output.name} holds an unfinished single-process run: resume it without torchrun, or delete it"
        )
    # Contiguous slices, so the joined parts keep input order; sizes differ by at most one image
    # and no image is repeated to even them out (as DistributedSampler's padding would).
    start = len(paths) * process.rank // process.world_size
    stop = len(paths) * (process.rank + 1) // process.world_size
    mine = paths[start:stop]
    part = ResumableOutput(parts[process.rank] if process.distributed else output, record_format)
    done = part.recover(mine)
    records = caption_paths(model, mine[done:], options, batch_size=batch_size, num_workers=num_workers)
    shown = dict(total=len(mine), initial=done, desc="captioning", unit="img", disable=not (progress and process.is_main))
    with tqdm(records, **shown) as counted:
        part.append(counted)
    if process.distributed:
        process.barrier()
        if process.is_main:
            _join_parts(final, parts)
        process.barrier()
    return {"images": len(mine), "resumed": done, "captioned": len(mine) - done}


def _part_path(output: Path, process: Process) -> Path:
    return output.with_name(f"{output.name}.part{process.rank}-of-{process.world_size}")


def _join_parts(final: ResumableOutput, parts: list[Path]) -> None:
    """Concatenates the parts (CSV: one header) into ``final`` atomically, then removes them."""
    header = final.records.header().encode()
    with atomic_write(final.path) as out:
        out.write(header)
        for part in parts:
            with open(part, "rb") as f:
                f.seek(len(header))
                shutil.copyfileobj(f, out, 1 << 20)
    for part in parts:
        part.unlink()


def score_pairs(model: Captioner, pairs: Sequence[Pair], *, batch_size: int = 32, max_words: int = MAX_WORDS) -> Iterator[dict]:
    """Scores each pair's caption against its image (``Captioner.score``), yielding one record per
    pair in order; the CNN encodes a batch's images once each, ahead of the scoring (``encoded_ahead``).

    Yields:
        ``{"image", "caption", "score", ...}`` (``Captioner.score_features``) or ``{"image",
        "caption", "error": {"code", "message"}}`` for an image that cannot be decoded.
    """

    def batches():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            loaded = {image: load_image(model.transform, image) for image in dict.fromkeys(p.image for p in chunk)}
            good = [image for image, (pixels, _) in loaded.items() if pixels is not None]
            pixels = torch.stack([loaded[image][0] for image in good]) if good else None
            yield (chunk, loaded, {image: row for row, image in enumerate(good)}), pixels

    for (chunk, loaded, row_of), features in encoded_ahead(model, batches()):
        scorable = [p for p in chunk if p.image in row_of]
        texts, rows = [p.caption for p in scorable], [row_of[p.image] for p in scorable]
        scored = iter(model.score_features(features, texts, rows, max_words) if scorable else ())
        for pair in chunk:
            record = {"image": str(pair.image), "caption": ScoreFormat.key(pair)[1]}
            error = loaded[pair.image][1]
            record |= {"error": error} if error else next(scored)
            yield record


def run_score_job(
    model: Captioner,
    pairs: Sequence[Pair],
    output: Path,
    *,
    format: str = "jsonl",
    batch_size: int = 32,
    max_words: int = MAX_WORDS,
    progress: bool = False,
) -> dict:
    """Scores ``pairs`` into ``output``, resuming what an earlier run of the same job wrote (as
    ``run_batch_job`` does captions: whole records appended in order, a torn last line cut off).

    Returns:
        ``{"pairs", "resumed", "scored"}``.
    """
    out = ResumableOutput(output, ScoreFormat(format))
    done = out.recover(pairs)
    records = score_pairs(model, pairs[done:], batch_size=batch_size, max_words=max_words)
    with tqdm(records, total=len(pairs), initial=done, desc="scoring", unit="pair", disable=not progress) as counted:
        out.append(counted)
    return {"pairs": len(pairs), "resumed": done, "scored": len(pairs) - done}
