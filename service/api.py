"""The HTTP API: captions, the models and their cards, health, readiness, metrics, and the web page."""

from __future__ import annotations

import time
from concurrent.futures import TimeoutError as FutureTimeout

from flask import Blueprint, Response, abort, current_app, g, jsonify, request, send_from_directory
from prometheus_client import CONTENT_TYPE_LATEST

from captioner.consensus import neighbours_for
from captioner.data.images import ImageError, decode_image
from captioner.errors import CaptionerError
from service.admission import Busy
from service.errors import ServiceError, error_response
from service.examples import IMAGE_SUFFIXES, examples_for, operator_folder
from service.intake import hold_body_to_limit, model_name, read_image_bytes, read_options
from service.model import limits_card
from service.model_process import ModelProcess, NotReady, QueueFull
from service.models import ModelSlot, ServedModels

api = Blueprint("api", __name__)
_SHOWN = 40  # characters of a client's text quoted back in a message


def _models() -> ServedModels:
    return current_app.extensions["captioner"].models


def _slot(name: str | None) -> ModelSlot:
    """The named model (None: the default).

    Raises:
        ServiceError: 400 ``unknown_model``, no model has that name.
    """
    slot = _models().get(name)
    if slot is None:
        names = ", ".join(_models().names())
        raise ServiceError(400, "unknown_model", f"no model is named {name[:_SHOWN]!r}; this service has: {names}")
    return slot


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _not_ready(model_process: ModelProcess) -> ServiceError:
    if model_process.load_error is not None:
        return ServiceError(503, "not_ready", "the model failed to load; the server log has the details")
    if model_process.not_ready_reason is not None:
        return ServiceError(503, "not_ready", model_process.not_ready_reason)
    return ServiceError(503, "not_ready", "the model is not loaded yet; try again shortly")


@api.post("/v1/captions")
def captions():
    """Caption one uploaded image with the requested model and decoding options."""
    started = time.perf_counter()
    # Named in the query, the model is checked before anything of the body is read.
    slot = _slot(model_name(request, form=False))
    if not slot.ready:
        raise _not_ready(slot.current)
    try:
        # Admission comes first: a request turned away costs no read, no decode.
        with current_app.extensions["captioner"].admission.admitted():
            return _caption(started)
    except Busy as exc:
        raise ServiceError(429, "busy", f"the server is busy ({exc}); retry shortly", exc.retry_after) from None


def _caption(started: float):
    hold_body_to_limit(request, current_app.config["MAX_CONTENT_LENGTH"])
    read_options(request)  # a bad option is a 400 before the model is asked for
    slot = _slot(model_name(request))  # now a form field too
    # From here to its answer the request holds the model that serves the name now: a swap
    # (service.models) stops it only once this request has been answered.
    with slot.lease() as model_process:
        if not model_process.ready:
            raise _not_ready(model_process)
        return _caption_with(slot.name, model_process, started)


def _caption_with(name: str, model_process: ModelProcess, started: float):
    served = model_process.served
    options = read_options(request, served.default_decoding)
    rerank = served.card["decoding"]["rerank"]
    try:  # a model-dependent option: refused here, as read_options refuses the others
        neighbours_for(options.mode, options.rerank, (rerank["neighbours"], rerank["images"]) if rerank else None)
    except CaptionerError as exc:
        raise ServiceError(400, "invalid_option", str(exc)) from None
    data = read_image_bytes(request)
    with current_app.extensions["captioner"].admission.decoding():
        try:
            max_pixels, size = current_app.config["MAX_PIXELS"], served.transform.config.image_size
            decoded = decode_image(data, max_pixels=max_pixels, target_size=size)
        except ImageError as exc:
            raise ServiceError(exc.status, exc.code, str(exc)) from None
        del data
        # Resizing here keeps the model process for the model; it normalises whole batches.
        pixels = served.transform.resize(decoded.image)  # (3, S, S) uint8
    read_ms = _ms(time.perf_counter() - started)
    try:
        future = model_process.submit(pixels, options)
    except QueueFull as exc:
        raise ServiceError(429, "queue_full", f"the server is busy ({exc}); retry shortly", 1) from None
    except NotReady:
        raise _not_ready(model_process) from None
    try:
        result = future.result(timeout=current_app.config["REQUEST_TIMEOUT_S"])
    except FutureTimeout:
        future.cancel()
        raise ServiceError(503, "timeout", "the model did not answer in time; retry shortly") from None
    except NotReady as exc:  # shutting down, or the model process died and is starting again
        raise ServiceError(503, "not_ready", f"{exc}; retry shortly") from None
    current_app.extensions["captioner"].metrics.observe_captions(name, options.mode, options.explain)
    body = {
        "request_id": g.request_id,
        "model": {"name": served.name, "version": served.version},
        "image": {"width": decoded.width, "height": decoded.height, "format": decoded.format},
        "captions": result.captions,
    }
    if options.explain:
        # Each word's attention: rows x columns over the whole image.
        body["attention_grid"] = [served.pool_grid, served.pool_grid]
    body["timing_ms"] = {"read": read_ms, **result.timing_ms, "total": _ms(time.perf_counter() - started)}
    return jsonify(body)


@api.get("/v1/model")
def model():
    """The card of one model (``?model=NAME``; the default's without)."""
    model_process = _slot(model_name(request)).current
    if not model_process.ready:
        raise _not_ready(model_process)
    config = current_app.config
    return jsonify({**model_process.served.card, "limits": limits_card(config["MAX_CONTENT_LENGTH"], config["MAX_PIXELS"])})


@api.get("/v1/models")
def models():
    """Every model the service serves, the default first: what each was trained on, its version,
    its default decoding, whether it is ready, and the example images that fit it."""
    served_models = _models()
    default = served_models.default
    return jsonify({"default": default.name, "models": [_listing(slot, slot is default) for slot in served_models]})


def _listing(slot: ModelSlot, default: bool) -> dict:
    model_process = slot.current
    ready = model_process.ready
    served = model_process.served if ready else None
    trained_on = served.card["trained_on"] if served else None
    return {
        "name": slot.name,
        "default": default,
        "ready": ready,
        "not_ready": None if ready else _not_ready(model_process).message,
        "version": served.version if served else None,
        "trained_on": trained_on,
        "default_decoding": served.default_decoding if served else None,
        "examples": examples_for(slot.name, trained_on, current_app.config["EXAMPLES_DIR"]) if served else [],
    }


@api.get("/examples/<model>/<path:file>")
def example(model: str, file: str):
    """An example image from the operator's folder (``CAPTIONER_EXAMPLES_DIR``), open as the page is."""
    folder = operator_folder(current_app.config["EXAMPLES_DIR"], model)
    if folder is None or _models().get(model) is None or not file.lower().endswith(IMAGE_SUFFIXES):
        abort(404)
    return send_from_directory(folder, file)


@api.get("/healthz")
def healthz():
    """Alive: the process answers, whether or not the model is loaded."""
    return jsonify({"status": "ok"})


@api.get("/readyz")
def readyz():
    """Ready: 200 once the default model is loaded, 503 before (and after a failed load). Each
    model's own readiness is in /v1/models and the metric captioner_model_ready."""
    model_process = _models().default.current
    if not model_process.ready:
        error = _not_ready(model_process)
        return error_response(error.status, error.code, error.message)
    return jsonify({"status": "ready"})


@api.get("/metrics")
def metrics():
    exposition = current_app.extensions["captioner"].metrics.exposition()
    return Response(exposition, content_type=CONTENT_TYPE_LATEST)


@api.get("/")
def index():
    return current_app.send_static_file("index.html")
