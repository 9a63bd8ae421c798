"""Safe image intake: turn untrusted bytes, paths or uploads into a loaded RGB image.

The command line, batch captioning and the HTTP service all decode images through
:func:`decode_image`, so every one of them refuses the same inputs with the same
:class:`ImageError` codes, and none of them decodes a decompression bomb.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from captioner.errors import CaptionerError

ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")
DEFAULT_MAX_PIXELS = 40_000_000

_ACCEPTED = "send a JPEG, PNG, GIF, BMP, WEBP or TIFF image"

# Leading bytes of the allowed formats. Data that starts like one of them but that Pillow
# cannot identify is a damaged file of that format rather than an unsupported one.
_SIGNATURES = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF, little-endian
    b"MM\x00*",  # TIFF, big-endian
)



def looks_like_image(head: bytes) -> bool:
    """Whether ``head`` (a file's first 16 bytes or more) starts like an allowed format."""
    return head.startswith(_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


# What Pillow's decoders raise on malformed data; anything else is a bug and propagates.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)


class ImageError(CaptionerError):
    """An image that cannot be accepted.

    ``code`` is a stable machine-readable string, ``status`` the HTTP status a service
    answers with. The message is one line and never names a directory, because the
    service shows it to clients.
    """

    STATUS = {
        "empty_image": 415,
        "unsupported_format": 415,
        "corrupt_image": 415,
        "too_many_pixels": 413,
        "file_not_found": 400,
    }

    def __init__(self, code: str, message: str) -> None:
        """Create the error.

        Args:
            code: One of the keys of ``STATUS``, which gives the HTTP status.
            message: One line for the user, without any file-system path.
        """
        super().__init__(message)
        self.code = code
        self.status = self.STATUS[code]


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image, ready for a model.

    Attributes:
        image: Fully loaded, mode ``"RGB"``, EXIF orientation applied.
        width: Width after orientation.
        height: Height after orientation.
        format: The container format, one of :data:`ALLOWED_FORMATS`.
    """

    image: Image.Image
    width: int
    height: int
    format: str


def decode_image(
    source: bytes | str | os.PathLike[str] | BinaryIO,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    target_size: int | None = None,
) -> DecodedImage:
    """Decode an untrusted image into RGB, refusing anything unsafe or unreadable.

    Only the first frame of animated or multi-page files is used. Images larger than
    ``max_pixels`` are refused from their header, before any pixel data is decoded.
    (Pillow's own hard limit, twice ``Image.MAX_IMAGE_PIXELS``, still applies on top.)

    Args:
        source: The encoded image as bytes, a file path (``str`` or path-like), or a
            binary file object. A seekable file object is read from its start, as
            Pillow does; it is left open.
        max_pixels: Largest accepted ``width * height``.
        target_size: The side the caller will resize to (a model's input size). When given,
            a large image is decoded or shrunk to no less than twice that side on each axis
            (JPEG decodes at 1/2, 1/4 or 1/8 scale; other formats are reduced by an integer
            factor right after decoding), so memory and later copies stay small. The reported
            width and height stay those of the file.

    Returns:
        The decoded image with its size and format.

    Raises:
        ImageError: With code ``empty_image``, ``unsupported_format``, ``corrupt_image``,
            ``too_many_pixels`` or (paths only) ``file_not_found``.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode_stream(io.BytesIO(source), max_pixels, target_size)
    if isinstance(source, (str, os.PathLike)):
        # Only the base name may appear in messages: the rest of the path is server detail.
        name = os.path.basename(os.fsdecode(source))
        try:
            fp = open(source, "rb")
        except FileNotFoundError as exc:
            raise ImageError("file_not_found", f"image file {name!r} does not exist") from exc
        except IsADirectoryError as exc:
            message = f"{name!r} is a directory, not an image file"
            raise ImageError("file_not_found", message) from exc
        except OSError as exc:
            raise ImageError("file_not_found", f"image file {name!r} cannot be read") from exc
        with fp:
            return _decode_stream(fp, max_pixels, target_size)
    return _decode_stream(_seekable(source), max_pixels, target_size)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert an image of any Pillow mode to RGB the way a viewer would show it.

    Transparent pixels are composited onto white: captions describe what a person sees
    in a viewer, and viewers and web pages overwhelmingly show transparency as white,
    whereas Pillow's plain conversion would expose whatever colour hides under alpha 0.
    16- and 32-bit integer and float images are scaled to 8 bits (Pillow's own
    conversion clips them at 255, turning a 16-bit photo white).

    Args:
        image: An image in any mode.

    Returns:
        An RGB image; ``image`` itself when it already is RGB without transparency.
    """
    image = _deep_to_grey8(image)
    if image.has_transparency_data:
        white = Image.new("RGBA", image.size, "white")
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def _seekable(fp: BinaryIO) -> BinaryIO:
    """Return ``fp`` rewound, or its contents in memory when it cannot seek (a pipe, a socket)."""
    try:
        fp.seek(0)
    except (AttributeError, OSError):  # io.UnsupportedOperation is an OSError
        return io.BytesIO(fp.read())
    return fp


def _decode_stream(fp: BinaryIO, max_pixels: int, target_size: int | None = None) -> DecodedImage:
    """Decode a seekable binary stream positioned at its start."""
    head = fp.read(16)
    fp.seek(0)
    if not head:
        raise ImageError("empty_image", f"the image is empty (0 bytes); {_ACCEPTED}")

    with warnings.catch_warnings():
        # Pillow warns about images over its global Image.MAX_IMAGE_PIXELS (and raises past
        # twice that, handled below). The global is shared with other code, so it stays
        # untouched and max_pixels alone decides here.
        # (catch_warnings swaps process-wide filters: threads decoding at once can leave these
        # two "ignore" filters in place, which costs only those warnings elsewhere.)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        # Pillow reports damaged metadata (say corrupt EXIF in a TIFF) as a UserWarning and
        # carries on; what decodes decides the outcome, and client data must not fill the logs.
        warnings.filterwarnings("ignore", category=UserWarning, module="PIL")
        try:
            # The allow-list keeps Pillow's rarer, less hardened parsers away from client data.
            with Image.open(fp, formats=ALLOWED_FORMATS) as opened:
                # open() has read only the header: refuse bombs before decoding any pixels.
                width, height = opened.size
                if width * height > max_pixels:
                    raise _too_many_pixels(max_pixels, f"{width}x{height} pixels")
                if target_size and opened.format in ("JPEG", "MPO"):
                    opened.draft(opened.mode, (2 * target_size, 2 * target_size))  # decode at 1/2..1/8
                opened.load()  # decode now, so corrupt data fails here and not in a caller
                small = _shrink(_deep_to_grey8(opened), target_size)
                oriented = ImageOps.exif_transpose(small)  # always a new, file-free image
                # An MPO (multi-picture, from some cameras) is a JPEG with extra frames.
                fmt = "JPEG" if opened.format == "MPO" else str(opened.format)
        except Image.DecompressionBombError as exc:  # over Pillow's hard limit
            raise _too_many_pixels(max_pixels) from exc
        except UnidentifiedImageError as exc:
            if looks_like_image(head):
                raise _corrupt() from exc
            raise ImageError("unsupported_format", f"not a supported image; {_ACCEPTED}") from exc
        except _DECODE_ERRORS as exc:
            raise _corrupt() from exc

    if oriented.size != small.size:  # turned by 90 degrees: the file's sides swap too
        width, height = height, width
    try:
        image = to_rgb(oriented)
    except ValueError as exc:  # a colour mode Pillow cannot convert, e.g. from an exotic TIFF
        message = f"{fmt} images in colour mode {oriented.mode} are not supported; {_ACCEPTED}"
        raise ImageError("unsupported_format", message) from exc
    return DecodedImage(image=image, width=width, height=height, format=fmt)


def _deep_to_grey8(image: Image.Image) -> Image.Image:
    """``image`` itself, or its 8-bit grey version when it holds 16-/32-bit integers or floats."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return _to_grey8(image)
    return image


def _shrink(image: Image.Image, target_size: int | None) -> Image.Image:
    """Reduce by the largest integer factor that keeps both sides at least ``2 * target_size``."""
    if not target_size:
        return image
    factor = min(image.width, image.height) // (2 * target_size)
    if factor < 2:
        return image
    try:
        return image.reduce(factor)  # a box filter: the same area average a resize would take
    except ValueError:  # modes reduce cannot take (P, 1): the caller's resize does it later
        return image


# Rows of a deep image scaled at once: bounds the temporary copies to a few megabytes.
_BAND_PIXELS = 1 << 20


def _to_grey8(image: Image.Image) -> Image.Image:
    """Scale a single-channel integer or float image to 8-bit grey by its bit depth.

    Works a band of rows at a time in float32, so the only full-size copy is the 8-bit result:
    a 6000x6000 16-bit image needs 36 MB here, not the gigabyte of whole-image float64 copies.
    """
    width, height = image.size
    rows = max(1, _BAND_PIXELS // max(1, width))
    bands = [(top, min(height, top + rows)) for top in range(0, height, rows)]

    def band(top: int, bottom: int) -> np.ndarray:  # (bottom - top, width) float32
        values = np.asarray(image.crop((0, top, width, bottom)), dtype=np.float32)
        return np.nan_to_num(values, nan=0.0)

    if image.mode.startswith("I;16"):
        full_scale = 65535.0  # I;16, I;16B, ...
    else:
        peak = max((float(band(top, bottom).max(initial=0.0)) for top, bottom in bands), default=0.0)
        if image.mode == "F":
            # Float images conventionally hold 0..1; larger values mean Pillow's 0..255 scale.
            full_scale = 1.0 if peak <= 1.0 else 255.0
        else:
            # Mode I records no bit depth: Pillow keeps 8-bit (L -> I), 16-bit (signed TIFFs,
            # I;16 -> I) and true 32-bit data in it, so take the narrowest depth that holds the data.
            full_scale = next((limit for limit in (255.0, 65535.0) if peak <= limit), 2.0**31 - 1)
    grey = np.empty((height, width), dtype=np.uint8)
    scale = np.float32(255.0 / full_scale)
    for top, bottom in bands:
        grey[top:bottom] = np.clip(np.rint(band(top, bottom) * scale), 0, 255)
    return Image.fromarray(grey)


def _too_many_pixels(max_pixels: int, size: str = "") -> ImageError:
    detail = f" ({size})" if size else ""
    message = f"the image is too large{detail}; at most {max_pixels:,} pixels are accepted"
    return ImageError("too_many_pixels", message)


def _corrupt() -> ImageError:
    return ImageError("corrupt_image", f"the image data is corrupt or truncated; {_ACCEPTED}")
