"""Offline batch captioning: many image files in, one record per image out, in input order.

Three stages run at once: images are decoded (in DataLoader worker processes, or in the main
thread), the CNN encodes the next batch in a thread of its own, and the main thread decodes this
batch's captions. An image that cannot be decoded becomes an error record and never stops the run.

A run writing to a file can be killed at any moment and started again with the same command:
records are appended whole and in input order, so the file is always a prefix of the finished
output, give or take a torn last line, which a restart cuts off before going on after the last
complete record. Under ``torchrun`` each rank captions one contiguous slice of the inputs into its
own part file (resumable the same way) and rank 0 joins the parts, in rank order, into the output
one process would have written.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import shutil
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from captioner.data.images import ImageError
from captioner.runtime import Process
from captioner.errors import CaptionerError
from captioner.io import atomic_write, remove_temporaries, strict_json
from captioner.models.captioner import Captioner
from captioner.models.encoder import ImageTransform
from captioner.options import DecodeOptions

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


def collect_inputs(inputs: Sequence[str]) -> list[Path]:
    """Image paths from files, folders (recursively, sorted), globs and text files listing images.

    Args:
        inputs: what the user named. A file with an image suffix is an image; another file is a
            list of images, one per line (relative to the list's folder; ``#`` starts a comment);
            a name that is not a file but has ``*``, ``?`` or ``[`` is a glob (``**`` recurses).

    Returns:
        The image paths, in the order given.
    """
    paths: list[Path] = []
    for name in inputs:
        path = Path(name)
        if not path.exists() and glob.has_magic(name):
            matches = sorted(Path(p) for p in glob.glob(name, recursive=True))
            images = [p for p in matches if _is_image_name(p)]
            if not images:
                raise CaptionerError(f"no images match {name}")
            paths += images
        elif path.is_dir():
            paths += sorted(p for p in path.rglob("*") if _is_image_name(p))
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


def _is_image_name(path: Path) -> bool:
    """A file named as an image; a dangling or looping link too, so that it gets an error record
    rather than vanishing from the output."""
    return path.suffix.lower() in IMAGE_SUFFIXES and (path.is_file() or path.is_symlink())


class _DecodedImages(Dataset):
    """(index, tensor or None, error or None) per path; decoding errors are data, not exceptions."""

    def __init__(self, paths: Sequence[Path], transform: ImageTransform):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return i, *load_image(self.transform, self.paths[i])


def load_image(transform: ImageTransform, source) -> tuple[torch.Tensor | None, dict | None]:
    """(3, S, S) tensor and no error, or no tensor and ``{"code", "message"}``: a bad image is data."""
    try:
        return transform.load(source), None
    except ImageError as exc:
        return None, {"code": exc.code, "message": str(exc)}
    except OSError as exc:  # it opened, then a read failed (a bad disk, a network file system)
        name = Path(source).name if isinstance(source, (str, Path)) else "image"
        message = f"image file {name!r} cannot be read ({exc.strerror or type(exc).__name__})"
        return None, {"code": "unreadable_file", "message": message}


def caption_tensors(model: Captioner, batch: torch.Tensor, options: DecodeOptions) -> list[list[dict]]:
    """(B, 3, S, S) preprocessed images -> their captions (``caption_features``)."""
    return caption_features(model, model.encode(batch.to(model.device)), options)


def caption_features(model: Captioner, features: torch.Tensor, options: DecodeOptions) -> list[list[dict]]:
    """(B, F) image features -> their captions, each image seeded alike (``options.seed``), so that
    an image's captions do not depend on the batch it came in: every engine captions here."""
    return model.describe(model.generate(features, options, [options.seed] * len(features)))


def encoded_ahead(model: Captioner, batches: Iterable[tuple]) -> Iterator[tuple]:
    """``(key, images or None)`` -> ``(key, features or None)``, in order, the CNN one batch ahead.

    The CNN encodes batch n + 1 in a thread of its own while the caller decodes the captions of
    batch n: its kernels release the GIL, so on a CPU the two overlap, and on two cores captioning
    runs at about the CNN's own pace rather than at the sum of both (README, "CPU inference").
    The thread is made here, after the caller has sized torch's pool, which each thread reads once.
    """
    def finished(key, encoding):
        return key, encoding.result() if encoding is not None else None

    with ThreadPoolExecutor(1, thread_name_prefix="captioner-cnn") as cnn:
        previous = None  # the batch the CNN is encoding while the next one is read
        for key, images in batches:
            encoding = cnn.submit(model.encode, images.to(model.device)) if images is not None else None
            if previous is not None:
                yield finished(*previous)
            previous = key, encoding
        if previous is not None:
            yield finished(*previous)


def _collate(items):
    """A batch as one (G, 3, S, S) tensor of its good images and every item's error: stacked in the
    worker, so that one shared-memory tensor crosses to the main process rather than one per image."""
    good = [x for _, x, _ in items if x is not None]
    return [i for i, _, _ in items], torch.stack(good) if good else None, [error for _, _, error in items]


def caption_paths(
    model: Captioner,
    paths: Sequence[Path],
    options: DecodeOptions,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
) -> Iterator[dict]:
    """Captions ``paths`` in batches, yielding one record per path in order.

    Yields:
        ``{"image", "captions": [{"text", "log_prob", "perplexity"}]}`` or ``{"image", "error": {"code", "message"}}``.
    """
    loader = DataLoader(
        _DecodedImages(paths, model.transform),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    for (indices, errors), features in encoded_ahead(model, (((i, e), x) for i, x, e in loader)):
        captions = iter(caption_features(model, features, options) if features is not None else ())
        for i, error in zip(indices, errors):
            record = {"image": str(paths[i])}
            record |= {"error": error} if error else {"captions": next(captions)}
            yield record


class RecordFormat:
    """How records are written as lines, JSON lines or CSV, and how image names are read back.

    Args:
        format: ``jsonl`` or ``csv``.
        num_captions: captions per image (the CSV's columns).
    """

    def __init__(self, format: str, num_captions: int):
        if format not in ("jsonl", "csv"):
            raise CaptionerError(f"unknown output format {format!r}: use jsonl or csv")
        self.format = format
        numbered = (lambda name, k: f"{name}_{k}") if num_captions > 1 else (lambda name, k: name)
        self.columns = ["image"]
        for k in range(1, num_captions + 1):
            self.columns += [numbered("caption", k), numbered("log_prob", k), numbered("perplexity", k)]
        self.columns += ["error_code", "error_message"]

    def line(self, record: dict) -> str:
        """One record as one line, newline included."""
        if self.format == "jsonl":
            return strict_json(record) + "\n"
        row = [record["image"]]
        for caption in record.get("captions", []):
            row += [caption["text"], caption["log_prob"], caption["perplexity"]]
        row += [""] * (len(self.columns) - 2 - len(row))
        error = record.get("error") or {}
        row += [error.get("code", ""), error.get("message", "")]
        return _csv_line(row)

    def header(self) -> str:
        """What comes before the first record: the CSV's column names, nothing for JSON lines."""
        return "" if self.format == "jsonl" else _csv_line(self.columns)

    def images(self, text: str) -> list[str | None]:
        """The image of each whole record in ``text``; ``[None]`` where it is not of this format."""
        if self.format == "jsonl":
            try:
                return [json.loads(line)["image"] for line in text.splitlines()]
            except (ValueError, KeyError, TypeError):
                return [None]  # not ours: never matches
        rows = list(csv.reader(io.StringIO(text)))
        if not rows:
            return []
        if rows[0] != self.columns:
            return [None]
        return [row[0] for row in rows[1:]]


class ResumableOutput:
    """A batch job's output file, appended one whole record at a time, so a killed run can go on.

    Args:
        path: the file.
        records: the format its lines are in.
    """

    def __init__(self, path: Path, records: RecordFormat):
        self.path, self.records = Path(path), records

    def recover(self, paths: Sequence[Path]) -> int:
        """Makes the file fit to go on with, and says how many of ``paths`` it already holds.

        A torn last line (a kill mid-record) is cut off, once the whole records before it are
        known to be of ``paths``, in order; an absent file holds none.

        Raises:
            CaptionerError: if the file holds records of other images, or of another format.
        """
        if not self.path.exists():
            return 0
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        images = self.records.images(complete.decode("utf-8", errors="replace"))
        expected = [str(p) for p in paths[: len(images)]]
        if len(images) > len(paths) or images != expected:
            raise CaptionerError(
                f"{self.path.name} already holds captions of other images or in another format; "
                "to resume, repeat the command that wrote it, else choose another --output"
            )
        if len(complete) < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
        return len(images)

    def append(self, records: Iterator[dict]) -> None:
        """Writes ``records`` after those already there (the header first into an empty file)."""
        with open(self.path, "a", encoding="utf-8") as f:
            if f.tell() == 0:
                f.write(self.records.header())
            for record in records:
                f.write(self.records.line(record))  # one write per record: a kill can tear only the last line
                f.flush()


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
        batch_size: images per model call.
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


def _csv_line(row: list) -> str:
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerow(row)
    return text.getvalue()


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
