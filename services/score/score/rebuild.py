"""Rebuild the score read model under live traffic: python -m score.rebuild [--no-wait].

It wipes every key of the model, its generation marker last (the marker says `wiping` until
then). The score consumer sees the marker gone, asks the person service for a replay through the
broker and marks the model ready when the replay is complete; this command waits for that.
Version gates (and the item gate's membership repair) make the live events that arrive during
the wipe harmless: nothing needs stopping.
"""

from __future__ import annotations

import argparse
import sys
import time

from messaging.healing import READY

from .config import ScoreConfig
from .store import ScoreStore


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="score-rebuild", description=__doc__.split("\n")[0])
    parser.add_argument("--no-wait", action="store_true", help="return once the wipe is done")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait (900)")
    args = parser.parse_args(argv)
    config = ScoreConfig()
    store = ScoreStore.from_url(config.score_redis_url, config.score_key_prefix)
    wiped = store.wipe()
    print(
        f"wiped {wiped} key(s) under {config.score_key_prefix!r}; the score consumer asks "
        "the person service for a replay"
    )
    if args.no_wait:
        return 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        generation = store.generation()
        if generation is not None and generation.state == READY:
            print(f"rebuilt (replay request {generation.request_id})")
            return 0
        time.sleep(0.5)
    print(
        "the model is not rebuilt yet: is the score consumer running? (see /ready)", file=sys.stderr
    )
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
