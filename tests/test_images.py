"""Tests for captioner.data.images: real odd and hostile files, made here with Pillow or by hand."""

from __future__ import annotations

import io
import os
import resource
import time
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

from captioner.data.images import (
    ALLOWED_FORMATS,
    DEFAULT_MAX_PIXELS,
    DecodedImage,
    ImageError,
    decode_image,
    to_rgb,
)
from captioner.errors import CaptionerError

from tests.helpers import blank_png, encode, noise

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


# --- helpers ------------------------------------------------------------------------------


def refused(source, code: str, **kwargs) -> ImageError:
    """Decode ``source``, expecting an ImageError with ``code`` and a client-safe message."""
    with pytest.raises(ImageError) as info:
        decode_image(source, **kwargs)
    error = info.value
    message = str(error)
    assert error.code == code, message
    assert error.status == {"too_many_pixels": 413, "file_not_found": 400}.get(code, 415)
    assert isinstance(error, CaptionerError)
    assert message and "\n" not in message and "Traceback" not in message
    assert "/" not in message and "\\" not in message  # no file-system path
    return error


@pytest.fixture
def no_decoding(monkeypatch):
    """Make any pixel decoding fail the test (and stay cheap if the code under test is wrong)."""

    def load(self):
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


@pytest.fixture(scope="module")
def huge_png() -> bytes:
    return blank_png(30_000, 30_000)


# --- size limits --------------------------------------------------------------------------


def test_hand_made_png_is_genuine():
    decoded = decode_image(blank_png(20, 3))
    assert (decoded.width, decoded.height, decoded.format) == (20, 3, "PNG")
    assert decoded.image.getextrema() == ((0, 0),) * 3


@pytest.mark.alone  # "fast" is timed
def test_decompression_bomb_is_refused_fast_without_decoding(huge_png, no_decoding):
    assert len(huge_png) < 1_000_000  # 900 megapixels in well under a megabyte
    limit_before = Image.MAX_IMAGE_PIXELS
    peak_rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    refused(huge_png, "too_many_pixels")
    assert time.perf_counter() - start < 1.0
    peak_growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_rss_before
    assert peak_growth_kib < 100_000  # decoding would need 900 MB
    assert Image.MAX_IMAGE_PIXELS == limit_before  # the shared global is left alone


def test_our_limit_refuses_from_the_header_below_pillows_limit(no_decoding):
    width, height = 8000, 6000  # 48 MP: over DEFAULT_MAX_PIXELS, under Pillow's own limits
    assert DEFAULT_MAX_PIXELS < width * height < Image.MAX_IMAGE_PIXELS
    error = refused(blank_png(width, height), "too_many_pixels")
    assert "8000x6000" in str(error) and "40,000,000" in str(error)


def test_max_pixels_boundary():
    data = blank_png(100, 100)
    assert decode_image(data, max_pixels=10_000).width == 100
    refused(data, "too_many_pixels", max_pixels=9_999)


def test_pillow_bomb_warning_is_handled_locally(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # so tiny images trip Pillow's checks
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # 144 pixels: Pillow warns; our own limit allows it, so it decodes without a warning.
        assert decode_image(blank_png(12, 12)).width == 12
        # 400 pixels: over twice Pillow's limit, Pillow raises DecompressionBombError.
        refused(blank_png(20, 20), "too_many_pixels")
    assert Image.MAX_IMAGE_PIXELS == 100


# --- broken, empty and unsupported input --------------------------------------------------


def test_truncated_jpeg_is_corrupt():
    data = encode(noise((64, 64)), "JPEG", quality=90)
    refused(data[: len(data) // 2], "corrupt_image")


def test_truncated_and_damaged_png_are_corrupt():
    data = encode(noise((64, 64)), "PNG")
    refused(data[: len(data) // 2], "corrupt_image")  # cut inside the pixel data
    refused(data[:20], "corrupt_image")  # cut inside the header: still recognisably a PNG
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0xFF  # breaks the IDAT checksum
    refused(bytes(damaged), "corrupt_image")


@pytest.mark.parametrize("fmt", ALLOWED_FORMATS)
@pytest.mark.parametrize("keep", [12, 16, 100])
def test_truncated_headers_are_corrupt_not_unsupported(fmt, keep):
    # Pillow cannot identify these at all; their signature shows they are damaged images.
    # (Truncated TIFFs also make Pillow warn about corrupt EXIF; that must stay inside.)
    data = encode(noise((64, 64)), fmt)
    refused(data[:keep], "corrupt_image")


@pytest.mark.parametrize("source", [b"", bytearray(), "file", "fileobj"])
def test_empty_input(source, tmp_path):
    if source == "file":
        source = tmp_path / "empty.png"
        source.write_bytes(b"")
    elif source == "fileobj":
        source = io.BytesIO()
    refused(source, "empty_image")


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "holiday.jpg"
    path.write_text("this is not a picture\n")
    error = refused(path, "unsupported_format")
    assert str(tmp_path) not in str(error)
    assert "JPEG" in str(error)  # says what is accepted


@pytest.mark.parametrize("fmt", ["ICO", "PCX", "PPM", "TGA"])
def test_format_pillow_can_read_but_we_do_not_allow(fmt):
    data = encode(Image.new("RGB", (16, 16), RED), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow alone would accept it
    refused(data, "unsupported_format")


@pytest.mark.parametrize(
    "data",
    [
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n",
        b"\x00" * 100,
    ],
)
def test_non_images_are_unsupported(data):
    refused(data, "unsupported_format")


# --- sources and file handling ------------------------------------------------------------


class Unseekable(io.RawIOBase):
    """A pipe-like stream: readable, not seekable."""

    def __init__(self, data: bytes):
        self._data = io.BytesIO(data)

    def readable(self):
        return True

    def readinto(self, buffer):
        chunk = self._data.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


SOURCE_KINDS = ["bytes", "bytearray", "memoryview", "str", "pathlib", "file", "bytesio", "pipe"]


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_sources(kind, tmp_path):
    data = encode(Image.new("RGB", (7, 5), GREEN), "PNG")
    path = tmp_path / "green.png"
    path.write_bytes(data)
    if kind in ("file", "bytesio", "pipe"):
        streams = {
            "file": lambda: path.open("rb"),
            "bytesio": lambda: io.BytesIO(data),
            "pipe": lambda: Unseekable(data),
        }
        stream = streams[kind]()
        if stream.seekable():
            stream.read(3)  # a seekable stream is read from its start, as Pillow does
        with stream:
            decoded = decode_image(stream)
            assert not stream.closed  # the caller's stream is the caller's to close
    else:
        sources = {
            "bytes": data,
            "bytearray": bytearray(data),
            "memoryview": memoryview(data),
            "str": str(path),
            "pathlib": path,
        }
        decoded = decode_image(sources[kind])
    assert isinstance(decoded, DecodedImage)
    assert (decoded.width, decoded.height, decoded.format) == (7, 5, "PNG")
    assert decoded.image.mode == "RGB" and decoded.image.getpixel((6, 4)) == GREEN


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_path_source_is_fully_loaded_and_closed(tmp_path):
    path = tmp_path / "anim.gif"  # multi-frame: Pillow itself would keep this file open
    frames = [Image.new("RGB", (8, 8), colour) for colour in (RED, BLUE)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    before = open_fds()
    decoded = decode_image(path)
    assert open_fds() == before
    path.unlink()
    assert decoded.image.getpixel((0, 0)) == RED


def test_missing_file(tmp_path):
    error = refused(tmp_path / "nowhere" / "cat.jpg", "file_not_found")
    assert "cat.jpg" in str(error)
    assert "nowhere" not in str(error) and str(tmp_path) not in str(error)


def test_directory_is_not_an_image(tmp_path):
    (tmp_path / "photos").mkdir()
    refused(tmp_path / "photos", "file_not_found")


def test_decoded_image_is_frozen():
    decoded = decode_image(blank_png(4, 4))
    with pytest.raises(AttributeError):
        decoded.width = 5


# --- formats, frames and orientation ------------------------------------------------------


def close_to(actual, expected, tolerance=6) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected))


@pytest.mark.parametrize("fmt", ALLOWED_FORMATS)
def test_every_allowed_format_decodes(fmt):
    params = {"quality": 95} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    decoded = decode_image(encode(Image.new("RGB", (10, 6), (200, 30, 90)), fmt, **params))
    assert (decoded.width, decoded.height, decoded.format) == (10, 6, fmt)
    assert decoded.image.mode == "RGB"
    assert close_to(decoded.image.getpixel((5, 3)), (200, 30, 90))


def test_mpo_counts_as_jpeg():
    frames = [Image.new("RGB", (8, 8), colour) for colour in (RED, BLUE)]
    data = encode(frames[0], "MPO", save_all=True, append_images=frames[1:])
    decoded = decode_image(data)
    assert decoded.format == "JPEG"
    assert close_to(decoded.image.getpixel((4, 4)), RED)


@pytest.mark.parametrize(
    ("fmt", "params"),
    [("GIF", {}), ("WEBP", {"lossless": True}), ("TIFF", {})],
)
def test_first_frame_only(fmt, params):
    frames = [Image.new("RGB", (8, 8), colour) for colour in (GREEN, RED, BLUE)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **params)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    assert decode_image(data).image.getpixel((4, 4)) == GREEN


@pytest.mark.parametrize(
    ("orientation", "marked_corner"),
    [(6, "top_right"), (8, "bottom_left"), (1, "top_left")],
)
def test_exif_orientation(orientation, marked_corner):
    # Stored 40 wide x 20 high with a red top-left corner; 6 = rotate 90 degrees clockwise
    # to view, 8 = counter-clockwise.
    stored = Image.new("RGB", (40, 20), WHITE)
    stored.paste(RED, (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation
    decoded = decode_image(encode(stored, "JPEG", quality=95, exif=exif))
    width, height = (40, 20) if orientation == 1 else (20, 40)
    assert (decoded.width, decoded.height) == decoded.image.size == (width, height)
    corners = {
        "top_left": (3, 3),
        "top_right": (width - 4, 3),
        "bottom_left": (3, height - 4),
        "bottom_right": (width - 4, height - 4),
    }
    for corner, xy in corners.items():
        expected = RED if corner == marked_corner else WHITE
        assert close_to(decoded.image.getpixel(xy), expected, 30), corner


# --- colour modes -------------------------------------------------------------------------


def test_cmyk_jpeg():
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert b"Adobe" in data  # Adobe-style CMYK, stored inverted
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    decoded = decode_image(data)
    assert close_to(decoded.image.getpixel((8, 8)), RED)


def test_16_bit_png_is_scaled_not_clipped():
    data = encode(Image.fromarray(np.full((4, 6), 32768, dtype=np.uint16)), "PNG")
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == "I;16"
    assert opened.convert("RGB").getpixel((0, 0)) == WHITE  # why to_rgb exists: Pillow clips
    decoded = decode_image(data)
    assert close_to(decoded.image.getpixel((0, 0)), (128, 128, 128), 1)


@pytest.mark.parametrize(
    ("image", "grey"),
    [
        (Image.frombytes("I;16B", (2, 1), b"\xff\xff\x80\x00"), [255, 128]),
        (Image.fromarray(np.array([[65535, 32768]], dtype=np.int32)), [255, 128]),  # 16-bit in I
        (Image.fromarray(np.array([[255, 100]], dtype=np.int32)), [255, 100]),  # 8-bit data in I
        (Image.fromarray(np.array([[2**31 - 1, -5]], dtype=np.int32)), [255, 0]),  # full 32 bits
        (Image.fromarray(np.array([[1.0, 0.5]], dtype=np.float32)), [255, 128]),  # float 0..1
        (Image.fromarray(np.array([[300.0, 100.0]], dtype=np.float32)), [255, 100]),  # float 0..255
    ],
    ids=["I;16B", "I-16bit", "I-8bit", "I-32bit", "F-unit", "F-255"],
)
def test_deep_modes_are_scaled_by_bit_depth(image, grey):
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert [rgb.getpixel((x, 0)) for x in range(2)] == [(g, g, g) for g in grey]


def test_palette_with_transparency_composites_on_white():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0])  # index 0 black (transparent), 1 red
    image.putpixel((0, 0), 1)
    data = encode(image, "PNG", transparency=0)
    decoded = decode_image(data)
    assert decoded.image.getpixel((0, 0)) == RED
    assert decoded.image.getpixel((3, 3)) == WHITE  # not the black hidden under transparency


def test_palette_without_transparency():
    image = Image.new("P", (2, 1), 0)
    image.putpalette([0, 0, 255, 255, 0, 0])
    image.putpixel((1, 0), 1)
    decoded = decode_image(encode(image, "PNG"))
    assert [decoded.image.getpixel((x, 0)) for x in range(2)] == [BLUE, RED]


def test_la_composites_on_white():
    image = Image.new("LA", (3, 1))
    for x, pixel in enumerate([(0, 0), (0, 255), (0, 128)]):
        image.putpixel((x, 0), pixel)
    decoded = decode_image(encode(image, "PNG"))
    pixels = [decoded.image.getpixel((x, 0)) for x in range(3)]
    assert pixels[:2] == [WHITE, BLACK]
    assert close_to(pixels[2], (127, 127, 127), 1)


def test_rgba_composites_on_white():
    image = Image.new("RGBA", (3, 1))
    for x, pixel in enumerate([(255, 0, 0, 0), (0, 0, 255, 255), (255, 0, 0, 128)]):
        image.putpixel((x, 0), pixel)
    decoded = decode_image(encode(image, "PNG"))
    pixels = [decoded.image.getpixel((x, 0)) for x in range(3)]
    assert pixels[:2] == [WHITE, BLUE]
    assert close_to(pixels[2], (255, 127, 127), 1)


def test_one_bit_png():
    image = Image.new("1", (2, 1), 0)
    image.putpixel((1, 0), 1)
    data = encode(image, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "1"
    decoded = decode_image(data)
    assert [decoded.image.getpixel((x, 0)) for x in range(2)] == [BLACK, WHITE]


@pytest.mark.parametrize(
    ("mode", "colour"),
    [("L", 77), ("RGB", (1, 2, 3)), ("YCbCr", (76, 85, 255)), ("HSV", (0, 255, 255))],
)
def test_other_modes(mode, colour):
    rgb = to_rgb(Image.new(mode, (1, 1), colour))
    assert rgb.mode == "RGB"
    expected = {"L": (77, 77, 77), "RGB": (1, 2, 3), "YCbCr": RED, "HSV": RED}[mode]
    assert close_to(rgb.getpixel((0, 0)), expected, 2)


# --- decoding to the size a model needs -----------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_target_size_decodes_small_and_reports_the_files_size(fmt):
    stored = Image.new("RGB", (1600, 800), WHITE)
    stored.paste(RED, (0, 0, 800, 800))  # left half red
    decoded = decode_image(encode(stored, fmt), target_size=100)
    assert (decoded.width, decoded.height) == (1600, 800)  # what the file holds
    # Shrunk, but never below twice the target on either side.
    assert 200 <= decoded.image.height < 800 and decoded.image.width == 2 * decoded.image.height
    left = decoded.image.getpixel((decoded.image.width // 4, decoded.image.height // 2))
    assert left[0] > 240 and left[1] < 20  # still red on the left: the same picture, smaller


def test_target_size_keeps_turned_sides_and_leaves_small_images_alone():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 1200 wide x 600 high, shown turned: 600 x 1200
    decoded = decode_image(encode(Image.new("RGB", (1200, 600)), "JPEG", exif=exif), target_size=100)
    assert (decoded.width, decoded.height) == (600, 1200)
    assert decoded.image.width < decoded.image.height
    small = decode_image(encode(noise((150, 150)), "PNG"), target_size=100)
    assert small.image.size == (150, 150)


def test_deep_image_decodes_without_whole_image_float_copies():
    # 16-bit grey, 6000x6000: 72 MB decoded; the old float64 conversion peaked near 1 GB.
    values = np.zeros((6000, 6000), dtype=np.uint16)
    values[::97, ::89] = 65535
    data = encode(Image.fromarray(values), "PNG")
    del values
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    decoded = decode_image(data, target_size=96)
    rise_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert (decoded.width, decoded.height) == (6000, 6000) and decoded.image.mode == "RGB"
    assert rise_mb < 300, f"decoding raised peak memory by {rise_mb:.0f} MB"
