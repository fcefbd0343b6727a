"""The whole benchmark in one run (`make bench`): the relay figures, the production e-mail path,
what verification costs, the stack figures, then the stack with replicas on a three-node cluster,
and the score on a Redis Cluster.

Run: .venv/bin/python bench/bench.py [--events N]. Prints every `name: value` line of
relay_bench.py, email_bench.py, verify_bench.py, stack_bench.py, cluster_bench.py and
redis_cluster_bench.py on stdout
(logs on stderr; see bench/README.md) and exits non-zero only if a figure could not be measured.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import cluster_bench
import email_bench
import redis_cluster_bench
import relay_bench
import stack_bench
import verify_bench
from post_bench import need_wrk


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--events", type=int, default=50000, help="events per relay_bench phase (default 50000)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s %(message)s")
    need_wrk()  # before anything is measured
    started = time.monotonic()
    try:
        relay = relay_bench.main(["--events", str(args.events)])
        email = email_bench.main([])
    except KeyboardInterrupt:  # each cleaned up on its way out
        return 130
    verify = verify_bench.main([])
    figures: dict[str, float] = {}
    stack = stack_bench.main([], figures=figures)
    # The cluster's replication beside the single node's of this very run.
    cluster = cluster_bench.main([], single_e2e=figures.get("e2e_events_s"))
    # The score's store on a Redis Cluster beside the single Redis of this very run.
    redis_cluster = redis_cluster_bench.main([], single_e2e=figures.get("e2e_events_s"))
    print(f"bench took {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    return 1 if relay or email or verify or stack or cluster or redis_cluster else 0


if __name__ == "__main__":
    sys.exit(main())
