"""gunicorn settings of the score API (used by make up and the containers)."""

from messaging.serving import gunicorn_settings

globals().update(gunicorn_settings("SCORE", 8102))
