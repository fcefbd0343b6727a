"""The whole benchmark in one run (`make bench`): the relay figures, the consumer runtime against
raw consuming, the production e-mail path, what verification costs, the person API under gunicorn
and under Granian, the stack figures, the stack against the seed's naive design, the stack with
replicas on a three-node cluster, the stack on a PostgreSQL primary and standby losing its
primary, then the score on a Redis Cluster.

Run: .venv/bin/python bench/bench.py [--events N] [--only PART,...]. Prints every `name: value`
line of relay_bench.py, consumer_bench.py, email_bench.py, verify_bench.py, web_server_bench.py,
stack_bench.py, peer_bench.py, cluster_bench.py, pg_failover_bench.py and redis_cluster_bench.py
on stdout (logs on stderr; see bench/README.md) and exits non-zero only if a figure could not be
measured. `--only fair` runs the fair comparisons alone: the relay and consumer ratios, the
stack's cost curve and latency steps, and the naive peer.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable

import cluster_bench
import consumer_bench
import email_bench
import peer_bench
import pg_failover_bench
import redis_cluster_bench
import relay_bench
import stack_bench
import verify_bench
import web_server_bench
from post_bench import need_wrk

PARTS = (
    "relay", "consumer", "email", "verify", "web", "stack", "peer", "cluster", "pg-failover",
    "redis-cluster",
)  # fmt: skip
# `--only fair`: these parts, the stack with these of its steps.
FAIR = ("relay", "consumer", "stack", "peer")
FAIR_STACK_STEPS = ("latency", "cost")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--events", type=int, default=50000, help="events per relay_bench phase (default 50000)"
    )
    parser.add_argument(
        "--only",
        default=",".join(PARTS),
        help=f"comma-separated parts to run, of {','.join(PARTS)}, or `fair` "
        f"({','.join(FAIR)}; the stack's steps {','.join(FAIR_STACK_STEPS)} only)",
    )
    args = parser.parse_args(argv)
    fair = args.only == "fair"
    parts = FAIR if fair else tuple(part for part in args.only.split(",") if part)
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    stack_args = ["--steps", ",".join(FAIR_STACK_STEPS)] if fair else []
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s %(message)s")
    need_wrk()  # before anything is measured
    figures: dict[str, float] = {}
    runs: dict[str, Callable[[], int]] = {
        "relay": lambda: relay_bench.main(["--events", str(args.events)]),
        "consumer": lambda: consumer_bench.main([]),
        "email": lambda: email_bench.main([]),
        "verify": lambda: verify_bench.main([]),
        "web": lambda: web_server_bench.main([]),  # gunicorn against Granian, same app
        "stack": lambda: stack_bench.main(stack_args, figures=figures),
        "peer": lambda: peer_bench.main([]),
        # The cluster's replication beside the single node's of this very run.
        "cluster": lambda: cluster_bench.main([], single_e2e=figures.get("e2e_events_s")),
        "pg-failover": lambda: pg_failover_bench.main([]),  # the person database's primary lost
        # The score's store on a Redis Cluster beside the single Redis of this very run.
        "redis-cluster": lambda: redis_cluster_bench.main(
            [], single_e2e=figures.get("e2e_events_s")
        ),
    }
    started = time.monotonic()
    failed = []
    for part in PARTS:
        if part not in parts:
            continue
        try:
            if runs[part]():
                failed.append(part)
        except KeyboardInterrupt:  # each part cleans up on its way out
            return 130
    print(f"bench took {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    if failed:
        print(f"not all measured: {', '.join(failed)}", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
