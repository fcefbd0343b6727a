"""gunicorn settings of the notifier API (used by make up and the containers)."""

from messaging.serving import gunicorn_settings

globals().update(gunicorn_settings("NOTIFIER", 8103))
