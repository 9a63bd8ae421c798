"""What a caption request carries: the image's bytes and its decoding options, both checked.

The image comes as multipart field ``image`` or as the raw body, whatever its content type says
(an ``image/*`` type is taken at its word; any other, or none, is sniffed for an accepted image
format); options come as query parameters or (multipart) form fields.
"""

from __future__ import annotations

import io

from flask import Request
from werkzeug.exceptions import RequestEntityTooLarge

from captioner.data.images import looks_like_image
from captioner.errors import CaptionerError
from captioner.options import DecodeOptions, check_applicable, field_types
from service.errors import ServiceError

IMAGE_FIELD = "image"
MODEL_FIELD = "model"  # which of the service's models (service.models); the default when not given
OPTION_TYPES = field_types(DecodeOptions)  # name -> type, in DecodeOptions' field order
MAX_SEED = 2**63 - 1  # what torch.Generator.manual_seed takes without wrapping
_HOW = f'send the image as multipart field "{IMAGE_FIELD}" or as the request body'
_SHOWN = 40  # characters of a client's text quoted back in a message


def _missing(message: str) -> ServiceError:
    return ServiceError(400, "missing_image", f"{message}; {_HOW}")


def hold_body_to_limit(request: Request, limit: int) -> None:
    """Read a body sent without Content-Length (chunked) now, refusing it past ``limit`` bytes.

    Werkzeug would cut such a body at the limit without a word, and the cut bytes would then be
    judged as an image. Read here, it is handed on with its length, like any other body.

    Raises:
        RequestEntityTooLarge: more than ``limit`` bytes arrived (answered as 413 ``too_large``).
    """
    if request.content_length is not None or "chunked" not in request.headers.get("Transfer-Encoding", "").lower():
        return
    stream, chunks, size = request.environ["wsgi.input"], [], 0
    while size <= limit:
        chunk = stream.read(min(1 << 16, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        raise RequestEntityTooLarge()
    # From here on the body is an ordinary one of known length.
    request.environ["wsgi.input"] = io.BytesIO(b"".join(chunks))
    request.environ["CONTENT_LENGTH"] = str(size)
    del request.environ["HTTP_TRANSFER_ENCODING"]
    request.__dict__.pop("content_length", None)  # werkzeug caches it


def read_image_bytes(request: Request) -> bytes:
    """The uploaded image's bytes (not yet decoded).

    Raises:
        ServiceError: 400 ``missing_image`` (no image, empty, wrong field name, two images) or 415
            ``unsupported_media_type`` (a body that is neither declared nor recognised an image).
    """
    mimetype = request.mimetype
    if mimetype == "multipart/form-data":
        uploads = request.files.getlist(IMAGE_FIELD)
        if len(uploads) > 1:
            raise ServiceError(400, "too_many_images", f'{len(uploads)} files in field "{IMAGE_FIELD}"; send one image')
        if not uploads:
            if IMAGE_FIELD in request.form:
                raise _missing(f'form field "{IMAGE_FIELD}" holds text, not a file')
            others = ", ".join(f'"{name[:_SHOWN]}"' for name in list(request.files)[:5])
            raise _missing(f"no field named {IMAGE_FIELD!r}" + (f" (got {others})" if others else ""))
        data = uploads[0].read()
    else:
        data = request.get_data(cache=False)
        # curl --data-binary says application/x-www-form-urlencoded, others octet-stream or
        # nothing: the bytes decide. An image/* type goes to the decoder, which explains itself.
        if data and not mimetype.startswith("image/") and not looks_like_image(data[:16]):
            what = f"the body (content type {mimetype[:_SHOWN]!r}) is not a JPEG, PNG, GIF, BMP, WEBP or TIFF image"
            raise ServiceError(415, "unsupported_media_type", f"{what}; {_HOW}")
    if not data:
        raise _missing("the request carries no image (empty body)")
    return data


def read_options(request: Request, defaults: dict | None = None) -> DecodeOptions:
    """Decoding options from the query string and multipart form fields, over the model's
    ``defaults`` (its default decoding: ``DecodeOptions.resolve``).

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
            if name == MODEL_FIELD:
                continue  # not a decoding option: model_name reads it
            if name not in OPTION_TYPES:
                known = ", ".join([*OPTION_TYPES, MODEL_FIELD])
                raise ServiceError(400, "unknown_option", f"unknown option {name[:_SHOWN]!r}; options are {known}")
            given = source.getlist(name)
            if name in values or len(given) > 1:
                raise ServiceError(400, "invalid_option", f"option {name!r} is given more than once")
            values[name] = given[0]
    typed = {name: _convert(name, text) for name, text in values.items()}
    try:
        options = DecodeOptions.resolve(defaults, typed)
        check_applicable(options.mode, values)  # named at all, even at its default
        return options
    except CaptionerError as exc:
        raise ServiceError(400, "invalid_option", str(exc)) from None


def model_name(request: Request, form: bool = True) -> str | None:
    """The model a request names (query parameter or, with ``form``, multipart form field); None:
    the default. Without ``form`` the body is not read (admission has not taken the request yet).

    Raises:
        ServiceError: 400 ``invalid_option``, the name given more than once.
    """
    given = request.args.getlist(MODEL_FIELD)
    if form and request.mimetype == "multipart/form-data":
        given += request.form.getlist(MODEL_FIELD)
    if len(given) > 1:
        raise ServiceError(400, "invalid_option", f"option {MODEL_FIELD!r} is given more than once")
    return given[0] if given else None


_YES, _NO = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _convert(name: str, text: str):
    kind = OPTION_TYPES[name]
    if kind is bool:  # bool("0") is True: a flag is read as a word
        word = text.strip().lower()
        if word not in _YES + _NO:
            raise ServiceError(400, "invalid_option", f"{name} must be 1 or 0 (true/false, yes/no), not {text[:_SHOWN]!r}")
        return word in _YES
    try:
        value = kind(text.strip())
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise ServiceError(400, "invalid_option", f"{name} must be {noun}, not {text[:_SHOWN]!r}") from None
    if name == "seed" and not 0 <= value <= MAX_SEED:
        raise ServiceError(400, "invalid_option", f"seed must be between 0 and {MAX_SEED}")
    return value
