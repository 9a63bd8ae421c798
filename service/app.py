"""The Flask app factory, and ``serve`` for the ``captioner serve`` development command."""

from __future__ import annotations

import logging
import os
import re
import signal
import time
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from flask import Flask, Response, g, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from captioner.data.images import DEFAULT_MAX_PIXELS
from captioner.errors import CaptionerError
from captioner.options import CNN_RUNTIMES
from captioner.runtime import torch_threads
from service.admission import Admission
from service.api import api
from service.errors import ServiceError, register_error_handlers
from service.keys import ApiKeys, Refusals, check_key
from service.logs import service_logger
from service.metrics import ServiceMetrics
from service.model import load_model
from service.model_process import ModelProcess, Placement
from service.models import DRAIN_GRACE_S, ModelSlot, ModelSource, ServedModels, read_sources

# Every key can be set from the environment as CAPTIONER_<KEY>, e.g. CAPTIONER_MAX_WAIT_MS=10.
DEFAULTS = {
    "MODEL_PATH": None,  # the model.pt to serve
    "MODEL_NAME": None,  # shown to clients; default from the encoder's name
    # Several models instead: name=path pairs, a folder of *.pt files or a file of name=path lines,
    # the first the default (service/models.py); re-read on SIGHUP, which swaps changed files in.
    "MODELS": None,
    # Example images the page offers with a model not of the shapes world (a subfolder named as
    # the model wins); shapes-world models get the scenes in service/static/examples.
    "EXAMPLES_DIR": None,
    "DEVICE": "auto",  # auto, cpu, cuda or cuda:N
    "CNN": "eager",  # eager (fp32) or int8 (CPU, a calibrated model: captioner calibrate)
    "TORCH_THREADS": None,  # the model process's torch threads; default: the usable CPUs less one
    "MODEL_CPUS": None,  # CPUs the model process runs on (set by service/gunicorn.conf.py); None: any
    # CPUs the model process takes as well if its CNN is slower than HEAVY_CNN_MS an image (set by
    # service/gunicorn.conf.py: the HTTP side's, with one worker and TORCH_THREADS left unset).
    "HEAVY_CNN_CPUS": None,
    "HEAVY_CNN_MS": 10,
    "MAX_CONTENT_LENGTH": 16 * 1024 * 1024,  # bytes per upload (Flask answers 413 beyond)
    "MAX_PIXELS": DEFAULT_MAX_PIXELS,  # width * height, checked before decoding
    "MAX_BATCH_SIZE": 16,  # images per model call
    "MAX_WAIT_MS": 5,  # how long a request may wait for others to join its batch
    "MAX_QUEUE": 256,  # requests handed to the model and not yet answered; 429 beyond
    # Requests in progress (reading, decoding, waiting for the model); 429 with Retry-After beyond,
    # before the body is read. Below gunicorn's request threads (32), so it is reachable.
    "MAX_IN_FLIGHT": 16,
    "MAX_DECODES": 2,  # images decoding at once; each is bounded in memory (README: memory)
    "REQUEST_TIMEOUT_S": 60,  # a request waiting longer for the model gets 503
    "LOG_LEVEL": "INFO",
    # A file of API keys, one a line (# comments), read at start and on SIGHUP: POST /v1/captions
    # and GET /v1/model then need "Authorization: Bearer KEY" (docs/service-stopping-and-keys.md).
    "API_KEYS_FILE": None,
    "METRICS_KEY": None,  # GET /metrics then needs "Authorization: Bearer <this key>"
}
# Taken from the environment as written: a key or a path of digits is not a number.
_TEXT = ("API_KEYS_FILE", "METRICS_KEY", "MODELS", "EXAMPLES_DIR")
# Endpoints that need a key, and which: an API key, or the metrics key. The probes, the page and
# its example images stay open.
_API_KEY_ENDPOINTS = ("api.captions", "api.model", "api.models")
_METRICS_ENDPOINT = "api.metrics"
_POSITIVE = (
    "MAX_CONTENT_LENGTH",
    "MAX_PIXELS",
    "MAX_BATCH_SIZE",
    "MAX_QUEUE",
    "REQUEST_TIMEOUT_S",
    "MAX_IN_FLIGHT",
    "MAX_DECODES",
)
# Quiet endpoints are polled by orchestrators and scrapers; logging each poll would drown the rest.
_QUIET_ENDPOINTS = ("/healthz", "/readyz", "/metrics")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def rounded(value, digits: int = 6):
    """``value`` with every float rounded to ``digits`` significant digits (in dicts and lists too)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(item, digits) for item in value]
    return value


class RoundedJSON(DefaultJSONProvider):
    """Flask's JSON with floats at 6 significant digits: float32 scores carry no more, and 16
    digits of noise make responses longer and harder to read."""

    sort_keys = False  # keep the documented key order in responses

    def dumps(self, obj, **kwargs) -> str:
        return super().dumps(rounded(obj), **kwargs)


@dataclass
class Runtime:
    """What an app's requests share, kept in ``app.extensions["captioner"]``."""

    models: ServedModels
    metrics: ServiceMetrics
    admission: Admission
    keys: ApiKeys | None = None  # None: API keys are off

    @property
    def model_process(self) -> ModelProcess:
        """The default model's model process, now (a swap replaces it)."""
        return self.models.default.current

    def reload_soon(self) -> None:
        """SIGHUP: read the key file and the models again, each in a thread of its own (a signal
        handler may have interrupted a thread that holds the log's lock)."""
        if self.keys is not None:
            self.keys.reload_soon()
        self.models.reload_soon()

    def stop(self) -> None:
        self.models.stop()


def create_app(config: dict | None = None) -> Flask:
    """Build the captioning service; each model loads in a process of its own (service.models,
    service.model_process).

    Configuration is layered: ``DEFAULTS``, then ``CAPTIONER_*`` environment variables (values
    are read as JSON where they parse, so numbers are numbers), then ``config``.
    The models are loaded after this returns, in processes the worker starts (under gunicorn,
    after the fork); ``/readyz`` answers 503 until the default model is loaded.

    Args:
        config: overrides, e.g. ``{"MODEL_PATH": "run/model.pt", "MAX_BATCH_SIZE": 8}``.

    Returns:
        The Flask app, its model processes already starting. ``stop_app(app)`` ends them (a test
        fixture's teardown); otherwise they end when the interpreter exits.

    Raises:
        CaptionerError: a setting, the key file or the models' list is not right (one line).
    """
    app = Flask(__name__)
    app.config.from_mapping(DEFAULTS)
    app.config.from_prefixed_env("CAPTIONER")
    app.config.from_mapping({key: os.environ[f"CAPTIONER_{key}"] for key in _TEXT if f"CAPTIONER_{key}" in os.environ})
    app.config.from_mapping(config or {})
    _check_config(app.config)
    app.json = RoundedJSON(app)
    # Before the model process starts: a key file that is not right refuses the service at once.
    keys = ApiKeys.from_file(app.config["API_KEYS_FILE"]) if app.config["API_KEYS_FILE"] is not None else None
    metrics_key = app.config["METRICS_KEY"]
    metrics_keys = ApiKeys((check_key(metrics_key, "service setting METRICS_KEY"),)) if metrics_key is not None else None

    config = app.config
    sources = partial(read_sources, config["MODELS"], config["MODEL_PATH"], config["MODEL_NAME"])
    sources()  # a malformed MODELS refuses the service before any model process starts

    metrics = ServiceMetrics()
    register_error_handlers(app)
    app.register_blueprint(api)
    _add_request_hooks(app, metrics, service_logger(config["LOG_LEVEL"]))
    _add_key_check(app, {**dict.fromkeys(_API_KEY_ENDPOINTS, keys), _METRICS_ENDPOINT: metrics_keys}, metrics)
    placement = Placement(
        int(config["TORCH_THREADS"] or torch_threads()), config["MODEL_CPUS"], config["HEAVY_CNN_CPUS"], config["HEAVY_CNN_MS"]
    )

    def make_process(source: ModelSource) -> ModelProcess:
        """A model process for ``source`` (each model its own; a swap makes another)."""
        return ModelProcess(
            partial(load_model, source.path, config["DEVICE"], source.shown_as, config["CNN"]),
            max_batch_size=config["MAX_BATCH_SIZE"],
            max_wait_ms=config["MAX_WAIT_MS"],
            max_queue=config["MAX_QUEUE"],
            placement=placement,
            log_level=config["LOG_LEVEL"],
            on_batch=metrics.batch_size.labels(source.name).observe,
            name=source.name,
        )

    def make_slot(source: ModelSource) -> ModelSlot:
        """A named model, its model process starting."""
        swapped = partial(lambda name, outcome: metrics.swaps.labels(name, outcome).inc(), source.name)
        # A swapped-out model process waits for its last request: its read, decode and the model's answer.
        drain_s = config["REQUEST_TIMEOUT_S"] + DRAIN_GRACE_S
        slot = ModelSlot(source, make_process, drain_timeout_s=drain_s, on_swap=swapped)
        metrics.track_model(source.name, slot.queue_depth, lambda: slot.ready)
        return slot

    models = ServedModels(sources, make_slot, on_removed=metrics.forget_model)
    admission = Admission(int(config["MAX_IN_FLIGHT"]), int(config["MAX_DECODES"]))
    app.extensions["captioner"] = Runtime(models, metrics, admission, keys)
    return app


def stop_app(app: Flask) -> None:
    """End the app's model processes: the batches in progress finish, requests still waiting get
    503. For a test fixture or a notebook that is done with an app; at exit it happens anyway."""
    app.extensions["captioner"].stop()


def _check_config(config) -> None:
    for key in _POSITIVE:
        if not isinstance(config[key], (int, float)) or config[key] <= 0:
            raise CaptionerError(f"service setting {key} must be a positive number, not {config[key]!r}")
    for key in ("MAX_WAIT_MS", "HEAVY_CNN_MS"):
        if not isinstance(config[key], (int, float)) or config[key] < 0:
            raise CaptionerError(f"service setting {key} must be 0 or more, not {config[key]!r}")
    for key in _TEXT:
        if config[key] is not None and (not isinstance(config[key], str) or not config[key]):
            raise CaptionerError(f"service setting {key} must be text, and not empty")
    threads = config["TORCH_THREADS"]
    if threads is not None and (not isinstance(threads, int) or threads <= 0):
        raise CaptionerError(f"service setting TORCH_THREADS must be a positive whole number, not {threads!r}")
    for key in ("MODEL_CPUS", "HEAVY_CNN_CPUS"):
        cpus = config[key]
        if cpus is not None and not (
            isinstance(cpus, list) and cpus and all(isinstance(cpu, int) and not isinstance(cpu, bool) and cpu >= 0 for cpu in cpus)
        ):
            raise CaptionerError(f"service setting {key} must be a list of CPU numbers, such as [2, 3], not {cpus!r}")
    if config["CNN"] not in CNN_RUNTIMES:
        raise CaptionerError(f"service setting CNN must be one of {', '.join(CNN_RUNTIMES)}, not {config['CNN']!r}")


def _add_request_hooks(app: Flask, metrics: ServiceMetrics, logger: logging.Logger) -> None:
    """Request ids, per-request metrics and one JSON log line per request."""

    @app.before_request
    def start_request():
        g.started = time.perf_counter()
        given = request.headers.get("X-Request-ID", "")
        # A client's id is kept when it is plain (it ends up in logs); otherwise a fresh one.
        g.request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex

    @app.after_request
    def finish_request(response):
        request_id = g.get("request_id") or uuid.uuid4().hex
        response.headers["X-Request-ID"] = request_id
        endpoint = _route(app)
        seconds = time.perf_counter() - g.get("started", time.perf_counter())
        metrics.observe_request(endpoint, request.method, response.status_code, seconds, _error_code(response))
        level = logging.DEBUG if endpoint in _QUIET_ENDPOINTS else logging.INFO
        fields = {
            "request_id": request_id,
            "method": request.method,
            "path": request.path,
            "status": response.status_code,
            "duration_ms": round(seconds * 1000, 3),
        }
        if "key" in g:
            fields["key"] = g.key  # the key's short hash (service.keys.key_id), or why it was refused
        logger.log(level, "request", extra={"fields": fields})
        return response


def _add_key_check(app: Flask, needed: dict[str, ApiKeys | None], metrics: ServiceMetrics) -> None:
    """Refuse a request without the key its endpoint needs (``needed``: endpoint -> keys, None:
    open): 401, from the headers alone, before the body is read or the model is asked; an address
    refused too often gets 429 first."""
    refusals = Refusals()

    @app.before_request
    def check_key_of_request():
        needs = needed.get(request.endpoint)
        if needs is None:
            return None
        address = request.remote_addr or "unknown"
        wait = refusals.retry_after(address)
        if wait is not None:
            message = f"too many requests with a missing or wrong key from this address; retry in {wait} s"
            raise ServiceError(429, "too_many_refusals", message, wait)
        key, verdict = needs.identify(request.headers.get("Authorization"))
        if key is not None:
            g.key = key
            return None
        g.key = verdict  # logged: "missing" or "wrong", never what was sent
        refusals.add(address)
        metrics.unauthorized.labels(_route(app), verdict).inc()
        challenge = 'Bearer realm="captioner"' + (', error="invalid_token"' if verdict == "wrong" else "")
        message = 'this needs an API key, sent as "Authorization: Bearer KEY"' if verdict == "missing" else "the key was refused"
        raise ServiceError(401, "unauthorized", message, headers={"WWW-Authenticate": challenge})


def _route(app: Flask) -> str:
    """The route pattern a request matched (bounded label values), also for a method the route
    does not allow; "unmatched" for a path no route has."""
    if request.url_rule is not None:
        return request.url_rule.rule
    refused = request.routing_exception
    if isinstance(refused, MethodNotAllowed) and refused.valid_methods:
        try:
            rule, _ = app.url_map.bind_to_environ(request.environ).match(
                method=refused.valid_methods[0], return_rule=True
            )
            return rule.rule
        except HTTPException:
            pass
    return "unmatched"


def _error_code(response: Response) -> str | None:
    """The ``error.code`` of a JSON error answer (every error the service gives is one)."""
    if response.status_code < 400 or not response.is_json:
        return None
    body = response.get_json(silent=True)
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else "unknown"


def serve(
    model_path: str, host: str = "127.0.0.1", port: int = 8000, cnn: str = "eager", api_keys_file: str | None = None
) -> None:
    """Run the service on Flask's threaded development server (gunicorn is for production).

    ``model_path`` is a model file (``MODEL_PATH``), or several models as ``MODELS`` takes them: a
    folder of ``*.pt`` files, or ``name=path`` pairs (service/models.py). Waits for every model
    first, so a bad model file is reported at once. Ctrl-C or SIGTERM stops it; SIGHUP reads the
    key file (with API keys on) and the models again, swapping in the files that changed.

    Raises:
        CaptionerError: a model cannot be loaded, or the key file is not right.
    """
    spec = str(model_path)
    several = "=" in spec or Path(spec).is_dir()
    config = {"MODELS" if several else "MODEL_PATH": spec, "CNN": cnn}
    if api_keys_file is not None:
        config["API_KEYS_FILE"] = str(api_keys_file)
    app = create_app(config)
    runtime = app.extensions["captioner"]
    # SIGTERM stops the server as Ctrl-C does: werkzeug's loop ends, the model processes are stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGHUP, lambda signum, frame: runtime.reload_soon())
    try:
        for slot in runtime.models:
            model_process = slot.current
            while not model_process.wait_ready(0.1):
                error = model_process.load_error
                if error is not None:
                    message = str(error) if isinstance(error, CaptionerError) else f"it cannot be loaded ({type(error).__name__})"
                    raise CaptionerError(f"model {slot.name}: {message}" if several else message)
        # threaded: the micro-batcher can only group requests that arrive at the same time.
        app.run(host=host, port=port, threaded=True)
    finally:
        runtime.stop()
