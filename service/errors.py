"""Every error the service answers is JSON: ``{"error": {"code": ..., "message": ...}}``.

Clients get a stable code and one line they can show; tracebacks and file-system paths stay in
the server log.
"""

from __future__ import annotations

import logging

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge

log = logging.getLogger("captioner.service")


class ServiceError(Exception):
    """An error answered as JSON with ``status``, a machine-readable ``code`` and a message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_response(status: int, code: str, message: str):
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    return response


def _http_code(exc: HTTPException) -> str:
    """``NotFound`` -> ``not_found``: werkzeug's names are the codes clients expect."""
    if isinstance(exc, RequestEntityTooLarge):
        return "too_large"
    return (exc.name or "error").lower().replace(" ", "_").replace("'", "")


def register_error_handlers(app: Flask) -> None:
    """Turn service errors, werkzeug's HTTP errors and anything unexpected into JSON."""

    @app.errorhandler(ServiceError)
    def service_error(exc: ServiceError):
        return error_response(exc.status, exc.code, exc.message)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if isinstance(exc, RequestEntityTooLarge):
            limit = app.config["MAX_CONTENT_LENGTH"]
            message = f"the upload is too large; at most {limit:,} bytes are accepted"
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
