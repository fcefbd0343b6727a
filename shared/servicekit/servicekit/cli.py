"""servicekit apikey new --scopes a,b: a fresh API key and the API_KEYS entry to configure."""

from __future__ import annotations

import argparse
import json
import sys

from .auth import new_key


def apikey_new(scopes: str) -> int:
    """Print a fresh key (to hand to its client, once) and the API_KEYS entry to configure."""
    names = [name.strip() for name in scopes.split(",") if name.strip()]
    if not names:
        print("servicekit: --scopes needs at least one scope, e.g. orders:write", file=sys.stderr)
        return 2
    try:
        key, entry = new_key(names)
    except ValueError as exc:
        print(f"servicekit: {exc}", file=sys.stderr)
        return 2
    print(f"key: {key}")
    print(f"API_KEYS entry: {json.dumps(entry)}")
    print("Keep the key secret: only its SHA-256 digest goes into API_KEYS (merge the entry into")
    print("the JSON object there); send it as Authorization: Bearer <key>.")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="servicekit", description="the services' own tools")
    commands = top.add_subparsers(dest="command", required=True)
    keys = commands.add_parser("apikey", help="API keys")
    keys.add_argument("action", choices=["new"])
    keys.add_argument("--scopes", required=True, help="comma-separated, e.g. orders:read")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return apikey_new(args.scopes)


if __name__ == "__main__":
    raise SystemExit(main())
