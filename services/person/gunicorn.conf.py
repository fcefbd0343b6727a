"""gunicorn settings of the person API (used by make up and the containers)."""

from messaging.serving import gunicorn_settings

globals().update(gunicorn_settings("PERSON", 8101))
