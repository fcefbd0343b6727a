"""Typed handler failures: the consumer runtime decides retry or dead letter from the type."""


class RetryableError(Exception):
    """A failure that may pass later (a store briefly away, a lock timeout): retry after a delay."""


class PermanentError(Exception):
    """A failure that will never pass for this message: dead-letter it at once with the reason."""
