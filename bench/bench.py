"""The whole benchmark in one run (`make bench`): the relay figures, then the stack figures.

Run: .venv/bin/python bench/bench.py [--events N]. Prints every `name: value` line of
relay_bench.py and stack_bench.py on stdout (logs on stderr; see bench/README.md) and exits
non-zero only if a figure could not be measured.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import relay_bench
import stack_bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--events", type=int, default=50000, help="events per relay_bench phase (default 50000)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s %(message)s")
    started = time.monotonic()
    try:
        relay = relay_bench.main(["--events", str(args.events)])
    except KeyboardInterrupt:  # relay_bench cleaned up on its way out
        return 130
    stack = stack_bench.main([])
    print(f"bench took {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    return 1 if relay or stack else 0


if __name__ == "__main__":
    sys.exit(main())
