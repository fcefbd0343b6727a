"""gunicorn settings of the score API (used by make up and the containers)."""

import os

bind = os.environ.get("BIND", f"127.0.0.1:{os.environ.get('SCORE_PORT', '8102')}")
workers = int(os.environ.get("SCORE_WORKERS", "2"))
threads = int(os.environ.get("SCORE_THREADS", "4"))
worker_class = "gthread"
accesslog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(L)ss request_id=%({x-request-id}i)s'
graceful_timeout = 20
