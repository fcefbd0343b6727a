"""gunicorn settings of bench/post_apps.py: the person API's, on BENCH_APP_PORT."""

from servicekit.serving import gunicorn_settings

globals().update(gunicorn_settings("BENCH_APP", 8199))
