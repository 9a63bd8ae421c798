"""WSGI entry point: ``gunicorn -c service/gunicorn.conf.py`` serves ``service.wsgi:app``.

Configured from ``CAPTIONER_*`` environment variables (see ``service.app.DEFAULTS``).
"""

from service.app import create_app

app = create_app()
