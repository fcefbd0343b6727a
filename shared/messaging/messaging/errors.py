"""Typed handler failures: the consumer runtime retries, dead-letters or pauses by the type."""


class RetryableError(Exception):
    """A failure that may pass later (a lock timeout, a conflict): retry after a delay."""


class PermanentError(Exception):
    """A failure that will never pass for this message: dead-letter it at once with the reason."""


class StoreUnavailable(Exception):
    """The handler's store does not answer: not the message's fault, and not one of its attempts.

    The runtime stops taking messages, returns those in hand and resumes once the store's probe
    answers again. Adapters raise it for connection failures only, never for a bad message.
    """
