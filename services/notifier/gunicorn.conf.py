"""gunicorn settings of the notifier API (used by make up and the containers)."""

from servicekit.serving import gunicorn_settings

globals().update(gunicorn_settings("NOTIFIER", 8103))
