"""What a caption request carries: the image's bytes and its decoding options, both checked.

The image comes as multipart field ``image`` or as the raw body with an ``image/*`` content type;
options come as query parameters or (multipart) form fields.
"""

from __future__ import annotations

from flask import Request

from captioner.errors import CaptionerError
from captioner.options import DecodeOptions, field_types
from service.errors import ServiceError

IMAGE_FIELD = "image"
OPTION_TYPES = field_types(DecodeOptions)  # name -> type, in DecodeOptions' field order
MAX_SEED = 2**63 - 1  # what torch.Generator.manual_seed takes without wrapping
_HOW = f'send the image as multipart field "{IMAGE_FIELD}" or as the request body with an image/* content type'


def _missing(message: str) -> ServiceError:
    return ServiceError(400, "missing_image", f"{message}; {_HOW}")


def read_image_bytes(request: Request) -> bytes:
    """The uploaded image's bytes (not yet decoded).

    Raises:
        ServiceError: 400 ``missing_image`` (no image, empty, wrong field name) or 415
            ``unsupported_media_type`` (a body that is not declared an image).
    """
    mimetype = request.mimetype
    if mimetype == "multipart/form-data":
        upload = request.files.get(IMAGE_FIELD)
        if upload is None:
            if IMAGE_FIELD in request.form:
                raise _missing(f'form field "{IMAGE_FIELD}" holds text, not a file')
            others = ", ".join(f'"{name}"' for name in request.files)
            raise _missing(f"no field named {IMAGE_FIELD!r}" + (f" (got {others})" if others else ""))
        data = upload.read()
    elif mimetype.startswith("image/"):
        data = request.get_data(cache=False)
    elif mimetype in ("", "application/x-www-form-urlencoded") or not request.content_length:
        data = b""
    else:
        raise ServiceError(415, "unsupported_media_type", f"content type {mimetype!r} is not accepted; {_HOW}")
    if not data:
        raise _missing("the request carries no image (empty body)")
    return data


def read_options(request: Request) -> DecodeOptions:
    """Decoding options from the query string and multipart form fields.

    Raises:
        ServiceError: 400 ``unknown_option`` or ``invalid_option`` with a message naming the option.
    """
    sources = [request.args]
    if request.mimetype == "multipart/form-data":
        sources.append(request.form)
    values: dict[str, str] = {}
    for source in sources:
        for name in source:
            if name == IMAGE_FIELD and source is request.form:
                continue  # text in the image field: read_image_bytes explains that one
            if name not in OPTION_TYPES:
                known = ", ".join(OPTION_TYPES)
                raise ServiceError(400, "unknown_option", f"unknown option {name[:40]!r}; options are {known}")
            given = source.getlist(name)
            if name in values or len(given) > 1:
                raise ServiceError(400, "invalid_option", f"option {name!r} is given more than once")
            values[name] = given[0]
    typed = {name: _convert(name, text) for name, text in values.items()}
    try:
        return DecodeOptions(**typed)
    except CaptionerError as exc:
        raise ServiceError(400, "invalid_option", str(exc)) from None


def _convert(name: str, text: str):
    kind = OPTION_TYPES[name]
    try:
        value = kind(text.strip())
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise ServiceError(400, "invalid_option", f"{name} must be {noun}, not {text[:40]!r}") from None
    if name == "seed" and not 0 <= value <= MAX_SEED:
        raise ServiceError(400, "invalid_option", f"seed must be between 0 and {MAX_SEED}")
    return value
