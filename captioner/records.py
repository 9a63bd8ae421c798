"""What a batch run reads and writes: image paths (or, to score, image-caption pairs: ``read_pairs``)
in, one record per image (or pair) out, as lines.

Plain files and text, without torch: the Ray engine's driver lists inputs and writes records with
these and never imports torch (which costs it seconds before its actors start). The records are
JSON lines or CSV, appended whole, so that a killed run's output is a prefix of the finished one
and the run goes on after its last complete record (``ResumableOutput``).
"""

from __future__ import annotations

import csv
import glob
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from captioner.errors import CaptionerError
from captioner.io import strict_json

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

    @staticmethod
    def key(path) -> str:
        """What identifies the record of input ``path`` (``images`` reads it back)."""
        return str(path)

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
        expected = [self.records.key(p) for p in paths[: len(images)]]
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


class Pair(NamedTuple):
    """A caption to score, and its image."""

    image: Path
    caption: str


def read_pairs(path: str | Path, images: str | Path | None = None) -> list[Pair]:
    """The (image, caption) pairs of a CSV file with ``image`` and ``caption`` columns, or of JSON
    lines ``{"image": ..., "caption": ...}`` (by the file's suffix, ``.csv`` or else JSON lines).

    Args:
        path: the file.
        images: the folder relative image names are in (default: the file's own folder).

    Raises:
        CaptionerError: one line naming the file (and the line) where it is absent, unreadable,
            empty or not of either shape.
    """
    path = Path(path)
    if not path.is_file():
        raise CaptionerError(f"pairs file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise CaptionerError(f"{path.name} is not UTF-8 text: give a CSV (image,caption) or JSON lines") from None
    root = Path(images) if images is not None else path.parent
    rows: list[tuple[int, object, object]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
            raise CaptionerError(f"{path.name} needs a header with image and caption columns")
        rows = [(reader.line_num, row["image"], row["caption"]) for row in reader]
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                raise CaptionerError(f"{path.name}, line {number}: not JSON; give {{\"image\": ..., \"caption\": ...}} a line (or a .csv)") from None
            if not isinstance(item, dict):
                raise CaptionerError(f"{path.name}, line {number}: not a JSON object with image and caption")
            rows.append((number, item.get("image"), item.get("caption")))
    pairs = []
    for number, image, caption in rows:
        if not isinstance(image, str) or not image.strip() or not isinstance(caption, str):
            raise CaptionerError(f"{path.name}, line {number}: needs an image name and a caption, both text")
        pairs.append(Pair(root / image.strip(), caption))
    if not pairs:
        raise CaptionerError(f"{path.name} holds no (image, caption) pairs")
    return pairs


class ScoreFormat:
    """How ``captioner score``'s records are written (JSON lines or CSV) and read back, as
    ``RecordFormat`` does caption's: a record is known by its image and caption, whitespace collapsed."""

    columns = [
        "image", "caption", "score", "log_prob", "perplexity", "unfamiliar", "familiarity", "unknown_words",
        "truncated", "word_probs", "error_code", "error_message",
    ]  # fmt: skip

    def __init__(self, format: str):
        if format not in ("jsonl", "csv"):
            raise CaptionerError(f"unknown output format {format!r}: use jsonl or csv")
        self.format = format

    @staticmethod
    def key(pair: Pair) -> tuple[str, str]:
        return str(pair.image), " ".join(pair.caption.split())

    def line(self, record: dict) -> str:
        if self.format == "jsonl":
            return strict_json(record) + "\n"
        error = record.get("error") or {}
        if error:
            row = [record["image"], record["caption"]] + [""] * 8 + [error.get("code", ""), error.get("message", "")]
        else:
            row = [
                record["image"], record["caption"], _cell(record["score"]), record["log_prob"], record["perplexity"],
                _cell(record["unfamiliar"]), _cell(record["familiarity"]),
                " ".join(record["unknown_words"]), _cell(record["truncated"]),
                " ".join(f"{w['prob']:.6g}" for w in record["words"]), "", "",
            ]  # fmt: skip
        return _csv_line(row)

    def header(self) -> str:
        return "" if self.format == "jsonl" else _csv_line(self.columns)

    def images(self, text: str) -> list[tuple[str, str] | None]:
        """The (image, caption) of each whole record in ``text``; ``[None]`` where it is not of this format."""
        if self.format == "jsonl":
            try:
                return [(item["image"], item["caption"]) for item in map(json.loads, text.splitlines())]
            except (ValueError, KeyError, TypeError):
                return [None]
        rows = list(csv.reader(io.StringIO(text)))
        if not rows:
            return []
        if rows[0] != self.columns:
            return [None]
        return [(row[0], row[1]) if len(row) > 1 else None for row in rows[1:]]


def _cell(value) -> str:
    """A CSV cell: "" for None, true/false for booleans (as JSON writes them)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def _csv_line(row: list) -> str:
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerow(row)
    return text.getvalue()
