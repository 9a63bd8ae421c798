"""Every error the service answers is JSON: ``{"error": {"code": ..., "message": ...}}``.

Clients get a stable code and one line they can show; tracebacks and file-system paths stay in
the server log.
"""

from __future__ import annotations

import json
import logging

from flask import Flask, jsonify, request
from werkzeug.exceptions import ClientDisconnected, HTTPException, MethodNotAllowed, RequestEntityTooLarge

log = logging.getLogger("captioner.service")


class ServiceError(Exception):
    """An error answered as JSON with ``status``, a machine-readable ``code`` and a message."""

    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, retry_after: int | None = None, headers: dict | None = None):
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    response.headers.update(headers or {})
    return response


def error_body(status: int, code: str, message: str) -> bytes:
    """The JSON of an error answered outside Flask (by the gunicorn worker)."""
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def _http_code(exc: HTTPException) -> str:
    """``NotFound`` -> ``not_found``: werkzeug's names are the codes clients expect."""
    if isinstance(exc, RequestEntityTooLarge):
        return "too_large"
    return (exc.name or "error").lower().replace(" ", "_").replace("'", "")


def _too_large_message(app: Flask) -> str:
    """Bytes over the limit, or (a body within it) a form with too many parts or too big a field."""
    limit = app.config["MAX_CONTENT_LENGTH"]
    if request.content_length is not None and request.content_length <= limit:
        parts, field = app.config["MAX_FORM_PARTS"], app.config["MAX_FORM_MEMORY_SIZE"]
        return f"the form is too large; at most {parts:,} parts and {field:,} bytes per text field are accepted"
    return f"the upload is too large; at most {limit:,} bytes are accepted"


def register_error_handlers(app: Flask) -> None:
    """Turn service errors, werkzeug's HTTP errors and anything unexpected into JSON."""

    @app.errorhandler(ServiceError)
    def service_error(exc: ServiceError):
        return error_response(exc.status, exc.code, exc.message, exc.retry_after, exc.headers)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if isinstance(exc, ClientDisconnected) and isinstance(exc.__context__, TimeoutError):
            # The worker's read deadline (service.worker) passed while the body was being read.
            return error_response(408, "request_timeout", "the request did not arrive in time")
        if isinstance(exc, RequestEntityTooLarge):
            message = _too_large_message(app)
        else:
            # werkzeug's descriptions are generic prose without request details.
            message = exc.description or exc.name
        response = error_response(exc.code or 500, _http_code(exc), message)
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response

    @app.errorhandler(Exception)
    def unexpected_error(exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal server error; the server log has the details")
