"""gunicorn settings of the notifier API (used by make up and the containers)."""

import os

bind = os.environ.get("BIND", f"127.0.0.1:{os.environ.get('NOTIFIER_PORT', '8103')}")
workers = int(os.environ.get("NOTIFIER_WORKERS", "2"))
threads = int(os.environ.get("NOTIFIER_THREADS", "4"))
worker_class = "gthread"
accesslog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(L)ss request_id=%({x-request-id}i)s'
graceful_timeout = 20
