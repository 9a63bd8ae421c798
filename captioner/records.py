"""What a batch run reads and writes: image paths in, one record per image out, as lines.

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


def _csv_line(row: list) -> str:
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerow(row)
    return text.getvalue()
