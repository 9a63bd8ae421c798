"""Readers for the published caption data-set formats, all into one record type.

Formats (detected by content, or forced with ``format=``):

* ``karpathy``: Karpathy's split JSON (dataset_coco.json, dataset_flickr8k.json,
  dataset_flickr30k.json, and our synthetic shapes world): ``images[].sentences[].raw``.
* ``coco``: COCO captions JSON (captions_train2014.json): ``images[]`` + ``annotations[]``.
* ``flickr``: Flickr8k/30k token files, ``name.jpg#0<TAB>caption`` per line, with the
  ``Flickr_8k.{train,dev,test}Images.txt`` split lists beside them.
* ``csv``: a CSV whose header names an image and a caption column (Kaggle's Flickr8k
  ``captions.txt``, Kaggle's pipe-separated Flickr30k ``results.csv``, ...).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple

from captioner.errors import CaptionerError

FORMATS = ("karpathy", "coco", "flickr", "csv")

_DESCRIPTIONS = {
    "karpathy": "Karpathy split JSON (images[].sentences)",
    "coco": "COCO captions JSON (images[] + annotations[])",
    "flickr": "a Flickr token file (name.jpg#0<TAB>caption)",
    "csv": "a CSV with image and caption columns",
}

# Image folders looked for beside a data-set file, in order. "Flicker8k_Dataset" is the
# real (misspelt) folder of the Flickr8k download; "flickr30k_images" is Kaggle's Flickr30k.
_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k-images", "flickr30k_images", "Images", "images")

# Flickr split lists, found beside the token file by the end of their names.
_SPLIT_LISTS = (("train", "*trainImages.txt"), ("val", "*devImages.txt"), ("test", "*testImages.txt"))

_IMAGE_COLUMNS = ("image", "image_name", "filename", "file_name", "path")
_CAPTION_COLUMNS = ("caption", "comment", "caption_text", "text", "sentence")
_CSV_DELIMITERS = (",", "\t", "|")

# A token-file line: "name.jpg#0<TAB>caption" (the "#n" caption index is optional when parsing).
_TOKEN_LINE = re.compile(r"(?P<name>[^\t]*?)(?:#\d+)?\t(?P<caption>.*)")
_TOKEN_HEAD = re.compile(r"[^\t#]+#\d+\t")  # stricter, for detection: tells it from a TSV
# "captions_train2014.json" -> split "train", image folder "train2014".
_SPLIT_IN_NAME = re.compile(r"(?:^|[_.-])(train|val|test)(\d{4})?(?=[_.-]|$)")


@dataclass(frozen=True)
class ImageRecord:
    """One image and its reference captions.

    ``image_id`` is ``str(cocoid)`` / the COCO image id for COCO files and the file name
    otherwise; ``path`` is absolute; ``captions`` are the raw references, stripped;
    ``scene`` is the shapes-world scene a Karpathy entry may carry.
    """

    image_id: str
    path: Path
    captions: tuple[str, ...]
    split: str
    scene: dict | None = None


@dataclass(frozen=True)
class Dataset:
    """The records read from one data-set file, in file order."""

    records: tuple[ImageRecord, ...]
    format: str
    name: str
    source: Path
    missing: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict)

    def split(self, name: str) -> list[ImageRecord]:
        """Returns the records of one split.

        Args:
            name: the split, e.g. "train", "val", "test" or "holdout".

        Returns:
            Its records, in file order.

        Raises:
            CaptionerError: if the split has no records; the message lists the splits
                that do, with their sizes.
        """
        chosen = [r for r in self.records if r.split == name]
        if not chosen:
            counts = Counter(r.split for r in self.records)
            present = ", ".join(f"{split} ({count})" for split, count in counts.items())
            raise CaptionerError(
                f"data set {self.name!r} has no {name!r} images; its splits are: {present} "
                f"(name each image's split in a 'split' column of a CSV, or in the data set file)"
            )
        return chosen

    def with_validation(self, fraction: float, seed: int) -> tuple[Dataset, int]:
        """A data set without validation images with about ``fraction`` of its training images
        moved to "val" (at least one, leaving at least one), and how many moved; one with some:
        itself, 0.

        An image goes to "val" when a hash of the seed and its id falls below ``fraction``: the
        choice depends on the image alone, not on its place in the file or on the other images,
        so an image stays on its side when rows are added, removed or reordered.
        """
        if any(r.split == "val" for r in self.records):
            return self, 0
        train = [r for r in self.records if r.split == "train"]
        if len(train) < 2:
            raise CaptionerError(
                f"data set {self.name!r} has {len(train)} training image(s): at least 2 are needed to hold one out for validation"
            )
        def draw(r: ImageRecord) -> float:  # uniform in [0, 1), fixed by the seed and the image
            return int.from_bytes(hashlib.sha256(f"{seed}:{r.image_id}".encode()).digest()[:8]) / 2**64

        ranked = sorted(train, key=draw)
        count = min(max(1, sum(draw(r) < fraction for r in train)), len(train) - 1)
        held = {id(r) for r in ranked[:count]}
        records = tuple(replace(r, split="val") if id(r) in held else r for r in self.records)
        return replace(self, records=records), len(held)


    def summary(self) -> dict:
        """What a model trained on this data set records of it (plain data, no paths): name,
        format, images per split, training captions, and for the shapes world its held-out pairs."""
        world = self.meta.get("shapes_world")
        return {
            "name": self.name,
            "format": self.format,
            "images": dict(Counter(r.split for r in self.records)),
            "train_captions": sum(len(r.captions) for r in self.records if r.split == "train"),  # paired with images
            "world": "shapes" if isinstance(world, dict) else None,
            "held_out": list(world.get("holdout", [])) if isinstance(world, dict) else [],
            "held_out_words": self.meta.get("held_out_words", []),
        }


class _Entry(NamedTuple):
    """A record before its image folder is known."""

    image_id: str
    file: str  # the image's path relative to the image folder, as the data-set file lists it
    captions: tuple[str, ...]
    split: str
    scene: dict | None = None


class _Parsed(NamedTuple):
    entries: list[_Entry]
    name: str
    meta: dict
    image_dirs: list[Path]  # candidate image folders, preferred first; always includes the file's own


def detect_format(path: str | os.PathLike[str]) -> str:
    """Tells which caption data-set format a file holds, by its content.

    Args:
        path: the data-set file.

    Returns:
        One of :data:`FORMATS`.

    Raises:
        CaptionerError: if the file is missing, unreadable, empty or in no known format.
    """
    label, source = _check_file(path)
    return _detect(label, _read_text(label, source))[0]


def load_dataset(
    path: str | os.PathLike[str],
    *,
    format: str = "auto",
    images: str | os.PathLike[str] | None = None,
    split: str | None = None,
    skip_missing: bool = False,
) -> Dataset:
    """Reads a caption data set into :class:`ImageRecord` s.

    Args:
        path: the data-set file (Karpathy JSON, COCO captions JSON, Flickr token file or CSV).
        format: "auto" to detect it from the content, or one of :data:`FORMATS` to insist.
        images: the image folder; by default it is found beside the data-set file (the
            file's own folder, or a usual image folder such as ``Flicker8k_Dataset``).
        split: the split of images the file does not assign one to (COCO captions files,
            Flickr token files without split lists, CSV rows without a split); by default
            it comes from the COCO file name (captions_val2014.json -> "val"), else "train".
        skip_missing: leave out images not found on disk (listed in ``Dataset.missing``)
            instead of failing.

    Returns:
        The data set, records in file order; images without captions are left out.

    Raises:
        CaptionerError: if the file is missing, malformed or in the wrong format, if no
            image has a caption, or if images are missing and ``skip_missing`` is False.
    """
    if format != "auto" and format not in FORMATS:
        raise CaptionerError(f"unknown data-set format {format!r}: expected auto, {', '.join(FORMATS)}")
    label, source = _check_file(path)
    text = _read_text(label, source)
    if format == "auto":
        format, content = _detect(label, text)
    else:
        content = _parse_json(label, text) if format in ("karpathy", "coco") else text
    parsed = _READERS[format](label, source, content, split)

    entries = [e for e in parsed.entries if e.captions]
    if not parsed.entries:
        raise CaptionerError(f"{label} lists no images")
    if not entries:
        raise CaptionerError(f"{label} lists {len(parsed.entries)} images but none has a caption")

    root = _image_root(images, parsed.image_dirs, entries[0].file)
    missing = _missing_files(root, [e.file for e in entries])
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        if len(missing) == len(entries):
            raise CaptionerError(
                f"none of the {len(entries)} images listed in {label} is under {root} ({shown}); "
                "check the image folder"
            )
        if not skip_missing:
            raise CaptionerError(
                f"{len(missing)} of {len(entries)} images listed in {label} are missing from {root}: "
                f"{shown}; pass --skip-missing to leave them out"
            )
    gone = set(missing)
    records = tuple(
        ImageRecord(e.image_id, root / e.file, e.captions, e.split, e.scene) for e in entries if e.file not in gone
    )
    return Dataset(records, format, parsed.name, source, tuple(missing), parsed.meta)


# --- reading and detecting -------------------------------------------------------------


def _check_file(path: str | os.PathLike[str]) -> tuple[str, Path]:
    """Returns the path as the user wrote it (for messages) and as an absolute path."""
    label = os.fspath(path)
    source = Path(os.path.abspath(os.path.expanduser(label)))
    if not source.exists():
        raise CaptionerError(f"data-set file {label} does not exist")
    if not source.is_file():
        raise CaptionerError(f"{label} is a folder: pass the caption file inside it (JSON, token file or CSV)")
    return label, source


def _read_text(label: str, source: Path) -> str:
    try:
        # utf-8-sig: CSVs saved by Excel start with a byte-order mark.
        text = source.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise CaptionerError(f"{label} is not a caption data set: it is not UTF-8 text") from None
    except OSError as exc:
        raise CaptionerError(f"cannot read {label}: {exc.strerror or exc}") from None
    if not text.strip():
        raise CaptionerError(f"{label} is empty")
    return text


def _parse_json(label: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CaptionerError(f"{label} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None


def _detect(label: str, text: str) -> tuple[str, Any]:
    """Returns the format and the content its reader takes (parsed JSON or the text)."""
    head = text.lstrip()
    if head[0] in "{[":
        data = _parse_json(label, text)
        images = data.get("images") if isinstance(data, dict) else None
        if isinstance(images, list) and isinstance(data.get("annotations"), list):
            return "coco", data
        if isinstance(images, list) and (not images or (isinstance(images[0], dict) and "sentences" in images[0])):
            return "karpathy", data
        raise CaptionerError(_not_a_dataset(label, _json_shape(data)))
    first_line = head.split("\n", 1)[0]
    if _TOKEN_HEAD.match(first_line):
        return "flickr", text
    if _csv_delimiter(first_line) is not None:
        return "csv", text
    raise CaptionerError(_not_a_dataset(label, f"first line {_snippet(first_line)}"))


def _not_a_dataset(label: str, found: str) -> str:
    kinds = [_DESCRIPTIONS[f] for f in FORMATS]
    return f"{label} is not a caption data set: expected {', '.join(kinds[:-1])} or {kinds[-1]} (found {found})"


def _json_shape(data: Any) -> str:
    if isinstance(data, dict):
        keys = [repr(k) for k in list(data)[:5]] + (["..."] if len(data) > 5 else [])
        return f"a JSON object with keys {', '.join(keys)}" if keys else "an empty JSON object"
    return "a JSON list" if isinstance(data, list) else f"a JSON {type(data).__name__}"


def _snippet(text: str, limit: int = 50) -> str:
    """A short quoted excerpt of file content for a message; repr keeps it on one line."""
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def _split_name(value: Any, default: str | None) -> str:
    """The record split: as written, "restval" (Karpathy's extra COCO train images) -> "train"."""
    name = str(value).strip() if value is not None else ""
    if not name:
        return default or "train"
    return "train" if name == "restval" else name


def _name_from_file(source: Path) -> str:
    """"Flickr8k.token.txt" -> "flickr8k", "captions_val2014.json" -> "captions_val2014"."""
    return source.name.split(".", 1)[0].lower() or source.name


# --- one reader per format ---------------------------------------------------------------


def _read_karpathy(label: str, source: Path, data: Any, split: str | None) -> _Parsed:
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise CaptionerError(f"{label} is not Karpathy split JSON: no top-level 'images' list")
    entries = []
    for index, image in enumerate(images):
        where = f"{label} is not Karpathy split JSON: images[{index}]"
        if not isinstance(image, dict) or not isinstance(image.get("sentences"), list):
            raise CaptionerError(f"{where} has no 'sentences' list")
        if not isinstance(image.get("filename"), str):
            raise CaptionerError(f"{where} has no 'filename'")
        filename = image["filename"]
        # Only the COCO file has "filepath" (train2014/val2014) and "cocoid".
        file = f"{image['filepath']}/{filename}" if image.get("filepath") else filename
        image_id = str(image["cocoid"]) if "cocoid" in image else filename
        captions = tuple(c for c in map(_sentence_text, image["sentences"]) if c)
        scene = image.get("scene") if isinstance(image.get("scene"), dict) else None
        entries.append(_Entry(image_id, file, captions, _split_name(image.get("split"), split), scene))
    name = data.get("dataset")
    meta = {k: v for k, v in data.items() if k not in ("images", "dataset")}
    if "shapes_world" in meta:
        _check_shapes_world(label, meta["shapes_world"])
    folder = source.parent
    return _Parsed(
        entries,
        name if isinstance(name, str) and name else _name_from_file(source),
        meta,
        [folder] + [folder / d for d in _IMAGE_DIRS],
    )


def _check_shapes_world(label: str, world: Any) -> None:
    """The settings ``captioner synth`` wrote, as far as training and evaluation read them."""
    where = f"{label}: 'shapes_world'"
    if not isinstance(world, dict):
        raise CaptionerError(f"{where} must be an object of the generator's settings, not {type(world).__name__}")
    size = world.get("image_size")
    if not (isinstance(size, int) and not isinstance(size, bool) and 8 <= size <= 4096):
        raise CaptionerError(f"{where} 'image_size' must be a whole number of pixels from 8 to 4096")
    holdout = world.get("holdout", [])
    if not (isinstance(holdout, list) and all(isinstance(h, str) for h in holdout)):
        raise CaptionerError(f"{where} 'holdout' must be a list of \"colour:shape\" strings")


def _sentence_text(sentence: Any) -> str:
    """A Karpathy sentence's caption: "raw", else its tokens joined by spaces."""
    if not isinstance(sentence, dict):
        return ""
    raw = sentence.get("raw")
    if isinstance(raw, str) and raw.strip():
        return raw.strip()
    tokens = sentence.get("tokens")
    return " ".join(str(t) for t in tokens).strip() if isinstance(tokens, list) else ""


def _read_coco(label: str, source: Path, data: Any, split: str | None) -> _Parsed:
    for key in ("images", "annotations"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise CaptionerError(f"{label} is not COCO captions JSON: no top-level {key!r} list")
    files: dict[Any, str] = {}
    captions: dict[Any, list[str]] = {}
    for index, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise CaptionerError(f"{label} is not COCO captions JSON: images[{index}] needs 'id' and 'file_name'")
        files[image["id"]] = image["file_name"]
        captions[image["id"]] = []
    # Grouped through a dict: COCO train2014 has 400k captions.
    for index, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, dict) or not isinstance(annotation.get("caption"), str):
            raise CaptionerError(f"{label} is not COCO captions JSON: annotations[{index}] has no 'caption'")
        bucket = captions.get(annotation.get("image_id"))
        if bucket is None:
            raise CaptionerError(
                f"{label}: annotations[{index}] refers to image_id {annotation.get('image_id')!r}, "
                "which images[] does not list"
            )
        caption = annotation["caption"].strip()
        if caption:
            bucket.append(caption)

    in_name = _SPLIT_IN_NAME.search(source.name.lower())
    record_split = split or (in_name[1] if in_name else "train")
    entries = [_Entry(str(i), files[i], tuple(captions[i]), record_split) for i in files]
    meta = {k: v for k, v in data.items() if k not in ("images", "annotations", "licenses")}
    # The COCO download keeps annotations/ beside train2014/ and val2014/.
    folder = source.parent
    image_dirs = [folder]
    if in_name:
        image_dirs += [folder / (in_name[1] + (in_name[2] or "")), folder.parent / (in_name[1] + (in_name[2] or ""))]
    return _Parsed(entries, _name_from_file(source), meta, image_dirs)


def _read_flickr(label: str, source: Path, text: str, split: str | None) -> _Parsed:
    captions: dict[str, list[str]] = {}
    # split("\n"), not splitlines(): line numbers must match what an editor shows.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        match = _TOKEN_LINE.fullmatch(line)
        if match is None or not match["name"].strip():
            raise CaptionerError(f"{label} line {number}: expected 'name.jpg#0<TAB>caption', got {_snippet(line)}")
        bucket = captions.setdefault(match["name"].strip(), [])
        if match["caption"].strip():
            bucket.append(match["caption"].strip())

    listed = _flickr_split_lists(source.parent)
    entries = []
    for name, caps in captions.items():
        # With split lists, an image in none of them is not silently trained on.
        record_split = listed.get(name, "unassigned") if listed else (split or "train")
        entries.append(_Entry(name, name, tuple(caps), record_split))
    folder = source.parent
    return _Parsed(entries, _name_from_file(source), {}, [folder / d for d in _IMAGE_DIRS] + [folder])


def _flickr_split_lists(folder: Path) -> dict[str, str]:
    """Image name -> split, from the Flickr_8k.*Images.txt lists in ``folder`` (if any)."""
    splits: dict[str, str] = {}
    for split, pattern in _SPLIT_LISTS:
        for list_file in sorted(folder.glob(pattern)):
            try:
                lines = list_file.read_text(encoding="utf-8-sig").split("\n")
            except (OSError, UnicodeDecodeError) as exc:
                raise CaptionerError(f"cannot read split list {list_file}: {exc}") from None
            for line in lines:
                if line.strip():
                    splits.setdefault(line.strip(), split)
    return splits


def _read_csv(label: str, source: Path, text: str, split: str | None) -> _Parsed:
    header_line = text.lstrip().split("\n", 1)[0]
    delimiter = _csv_delimiter(header_line)
    if delimiter is None:
        columns = max((_header_columns(header_line, d) for d in _CSV_DELIMITERS), key=len)
        has_image = _column(columns, _IMAGE_COLUMNS) is not None
        kind, wanted = ("caption", _CAPTION_COLUMNS) if has_image else ("image", _IMAGE_COLUMNS)
        raise CaptionerError(
            f"{label} has no {kind} column: expected a header naming one of {', '.join(wanted)} "
            f"(header: {_snippet(header_line)})"
        )
    # Kaggle's Flickr30k results.csv puts a space after each '|'; skipinitialspace lets a
    # quoted field start after it (cells are stripped anyway).
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, skipinitialspace=True)
    header = [c.strip().lower() for c in next(row for row in reader if row)]
    image_col, caption_col = _column(header, _IMAGE_COLUMNS), _column(header, _CAPTION_COLUMNS)
    split_col = _column(header, ("split",))
    captions: dict[str, list[str]] = {}
    splits: dict[str, str] = {}
    try:
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise CaptionerError(
                    f"{label} line {reader.line_num} has {len(row)} fields but the header has {len(header)} "
                    f"(quote captions that contain {delimiter!r})"
                )
            name = row[image_col].strip()
            bucket = captions.setdefault(name, [])
            if row[caption_col].strip():
                bucket.append(row[caption_col].strip())
            # An image's split is that of its first row.
            splits.setdefault(name, _split_name(row[split_col] if split_col is not None else None, split))
    except csv.Error as exc:
        raise CaptionerError(f"{label} line {reader.line_num}: {exc}") from None
    entries = [_Entry(name, name, tuple(caps), splits[name]) for name, caps in captions.items()]
    folder = source.parent
    return _Parsed(entries, _name_from_file(source), {}, [folder / d for d in _IMAGE_DIRS] + [folder])


def _header_columns(line: str, delimiter: str) -> list[str]:
    row = next(csv.reader([line], delimiter=delimiter, skipinitialspace=True), [])
    return [c.strip().lower() for c in row]


def _column(columns: list[str], names: tuple[str, ...]) -> int | None:
    """Index of the first of ``names`` (in their order of preference) among ``columns``."""
    return next((columns.index(n) for n in names if n in columns), None)


def _csv_delimiter(header_line: str) -> str | None:
    """The delimiter that splits the header into an image and a caption column, if any."""
    for delimiter in _CSV_DELIMITERS:
        columns = _header_columns(header_line, delimiter)
        if _column(columns, _IMAGE_COLUMNS) is not None and _column(columns, _CAPTION_COLUMNS) is not None:
            return delimiter
    return None


_READERS: dict[str, Callable[[str, Path, Any, str | None], _Parsed]] = {
    "karpathy": _read_karpathy,
    "coco": _read_coco,
    "flickr": _read_flickr,
    "csv": _read_csv,
}


# --- images on disk ------------------------------------------------------------------------


def _image_root(images: str | os.PathLike[str] | None, candidates: list[Path], probe: str) -> Path:
    """The image folder: ``images`` if given, else the first candidate holding ``probe``.

    Downloads nest images differently (COCO's annotations/ beside val2014/, Kaggle's
    flickr30k_images/flickr30k_images/), so the folder that really holds the first image
    wins; if none does, the first existing candidate is used and the missing-image check
    reports the problem.
    """
    if images is not None:
        root = Path(os.path.abspath(os.path.expanduser(os.fspath(images))))
        if not root.is_dir():
            raise CaptionerError(f"image folder {os.fspath(images)} does not exist")
        return root
    existing = [c for c in candidates if c.is_dir()]
    return next((c for c in existing if (c / probe).is_file()), existing[0])


def _missing_files(root: Path, files: list[str]) -> list[str]:
    """The files not found under ``root``, in order.

    One directory listing per folder instead of one stat per image (COCO lists 120k),
    and plain strings rather than Path objects, which cost more than the check itself.
    """
    listings: dict[str, set[str]] = {}
    missing = []
    for file in files:
        folder, _, name = file.rpartition("/")
        names = listings.get(folder)
        if names is None:
            try:
                names = set(os.listdir(os.path.join(root, folder)))
            except OSError:
                names = set()
            listings[folder] = names
        # isfile() settles what the listing cannot (case-insensitive file systems, "\\" separators).
        if name not in names and not os.path.isfile(os.path.join(root, file)):
            missing.append(file)
    return missing
