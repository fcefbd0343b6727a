"""An event pipeline for read models: a transactional outbox and its relay on the producer's
side; on each read model's, a consumer runtime that applies every change exactly once in effect,
retries, dead-letters what it cannot process, pauses while its store is away, and heals a store
that lost its data or verifies one that lost part of it. See shared/messaging/README.md,
and the documentation site's library pages (docs/library/).

What this module exports is the public API, and nothing else is promised; `messaging.testing`
is the test kit (an in-memory broker, waiting for effects, publishing as a relay does).
"""

from .consumer import Consumer, ConsumerSettings
from .envelope import DecodeError, Envelope, decode
from .errors import PermanentError, RetryableError, StoreUnavailable
from .generations import PostgresGeneration, RedisGeneration
from .handlers import Handlers
from .healing import Healing
from .operable import run, serve_health
from .outbox import Outbox
from .outbox import install as install_outbox
from .relay import Relay, RelaySettings
from .replay_server import ReplayServer
from .settings import BrokerSettings
from .stores import (
    RedisVersionGate,
    postgres_errors,
    postgres_write_probe,
    redis_client,
    redis_errors,
    redis_write_probe,
    versioned_upsert,
)
from .topology import DEFAULT_RETRY_DELAYS, Topology
from .verification import Verification, VerifiedStore

__all__ = [
    "DEFAULT_RETRY_DELAYS",
    "BrokerSettings",
    "Consumer",
    "ConsumerSettings",
    "DecodeError",
    "Envelope",
    "Handlers",
    "Healing",
    "Outbox",
    "PermanentError",
    "PostgresGeneration",
    "RedisGeneration",
    "RedisVersionGate",
    "Relay",
    "RelaySettings",
    "ReplayServer",
    "RetryableError",
    "StoreUnavailable",
    "Topology",
    "Verification",
    "VerifiedStore",
    "decode",
    "install_outbox",
    "postgres_errors",
    "postgres_write_probe",
    "redis_client",
    "redis_errors",
    "redis_write_probe",
    "run",
    "serve_health",
    "versioned_upsert",
]
