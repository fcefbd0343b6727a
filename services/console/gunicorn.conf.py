"""gunicorn settings of the console (used by make up and the containers)."""

from servicekit.serving import gunicorn_settings

globals().update(gunicorn_settings("CONSOLE", 8104))
