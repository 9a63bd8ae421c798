"""The HTTP API: captions, model card, health, readiness, metrics, and the web page."""

from __future__ import annotations

import time
from concurrent.futures import TimeoutError as FutureTimeout

from flask import Blueprint, Response, current_app, g, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST

from captioner.consensus import neighbours_for
from captioner.data.images import ImageError, decode_image
from captioner.errors import CaptionerError
from service.admission import Busy
from service.errors import ServiceError, error_response
from service.intake import hold_body_to_limit, read_image_bytes, read_options
from service.model import limits_card
from service.model_process import ModelProcess, NotReady, QueueFull

api = Blueprint("api", __name__)


def _model_process() -> ModelProcess:
    return current_app.extensions["captioner"].model_process


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _not_ready() -> ServiceError:
    model_process = _model_process()
    if model_process.load_error is not None:
        return ServiceError(503, "not_ready", "the model failed to load; the server log has the details")
    if model_process.not_ready_reason is not None:
        return ServiceError(503, "not_ready", model_process.not_ready_reason)
    return ServiceError(503, "not_ready", "the model is not loaded yet; try again shortly")


@api.post("/v1/captions")
def captions():
    """Caption one uploaded image with the requested decoding options."""
    started = time.perf_counter()
    model_process = _model_process()
    if not model_process.ready:
        raise _not_ready()
    try:
        # Admission comes first: a request turned away costs no read, no decode.
        with current_app.extensions["captioner"].admission.admitted():
            return _caption(model_process, started)
    except Busy as exc:
        raise ServiceError(429, "busy", f"the server is busy ({exc}); retry shortly", exc.retry_after) from None


def _caption(model_process: ModelProcess, started: float):
    hold_body_to_limit(request, current_app.config["MAX_CONTENT_LENGTH"])
    options = read_options(request)
    served = model_process.served
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
        raise _not_ready() from None
    try:
        result = future.result(timeout=current_app.config["REQUEST_TIMEOUT_S"])
    except FutureTimeout:
        future.cancel()
        raise ServiceError(503, "timeout", "the model did not answer in time; retry shortly") from None
    except NotReady as exc:  # shutting down, or the model process died and is starting again
        raise ServiceError(503, "not_ready", f"{exc}; retry shortly") from None
    current_app.extensions["captioner"].metrics.observe_captions(options.mode, options.explain)
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
    model_process = _model_process()
    if not model_process.ready:
        raise _not_ready()
    config = current_app.config
    return jsonify({**model_process.served.card, "limits": limits_card(config["MAX_CONTENT_LENGTH"], config["MAX_PIXELS"])})


@api.get("/healthz")
def healthz():
    """Alive: the process answers, whether or not the model is loaded."""
    return jsonify({"status": "ok"})


@api.get("/readyz")
def readyz():
    """Ready: 200 once the model is loaded, 503 before (and after a failed load)."""
    if not _model_process().ready:
        error = _not_ready()
        return error_response(error.status, error.code, error.message)
    return jsonify({"status": "ready"})


@api.get("/metrics")
def metrics():
    exposition = current_app.extensions["captioner"].metrics.exposition()
    return Response(exposition, content_type=CONTENT_TYPE_LATEST)


@api.get("/")
def index():
    return current_app.send_static_file("index.html")
