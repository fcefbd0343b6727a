"""gunicorn settings of the score API (used by make up and the containers)."""

from servicekit.serving import gunicorn_settings

globals().update(gunicorn_settings("SCORE", 8102))
