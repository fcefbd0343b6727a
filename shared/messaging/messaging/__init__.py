"""Shared messaging: envelope, outbox, relay, consumer runtime, idempotent apply helpers."""

from servicekit import tracing

from .consumer import Consumer, ConsumerSettings
from .envelope import DecodeError, Envelope, decode
from .errors import PermanentError, RetryableError, StoreUnavailable
from .handlers import Handlers
from .outbox import Outbox
from .relay import Relay, RelaySettings
from .topology import DEFAULT_RETRY_DELAYS, Topology

__all__ = [
    "DEFAULT_RETRY_DELAYS",
    "Consumer",
    "ConsumerSettings",
    "DecodeError",
    "Envelope",
    "Handlers",
    "Outbox",
    "PermanentError",
    "Relay",
    "RelaySettings",
    "RetryableError",
    "StoreUnavailable",
    "Topology",
    "decode",
    "tracing",
]
