"""The person service's import worker (bulk registration): python -m person.importer."""

from __future__ import annotations

from servicekit import tracing
from servicekit.runner import configure_logging, run_until_signalled

from . import retention
from .config import PersonConfig
from .imports import Importer, ImporterSettings


def main() -> int:
    config = PersonConfig()
    configure_logging(config.log_level)
    tracing.configure("person-importer")
    settings = ImporterSettings(
        database_url=config.person_database_url,
        batch_size=config.import_batch_size,
        poll_interval=config.import_poll_seconds,
    )
    retention.pruner(config).start()  # beside the imports, in this long-running process
    return run_until_signalled(Importer(settings))


if __name__ == "__main__":
    raise SystemExit(main())
