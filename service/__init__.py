"""The HTTP service: a Flask app that captions uploaded images with a captioner model.

``create_app``, ``stop_app`` and ``serve`` are imported on first use, so gunicorn's master can load
``service.logs`` for its log format without importing torch before it forks.
"""

__all__ = ["create_app", "serve", "stop_app"]


def __getattr__(name: str):
    if name in __all__:
        from service import app

        return getattr(app, name)
    raise AttributeError(f"module 'service' has no attribute {name!r}")
