"""gunicorn settings of the person API (used by make up and the containers)."""

from servicekit.serving import gunicorn_settings

globals().update(gunicorn_settings("PERSON", 8101))
