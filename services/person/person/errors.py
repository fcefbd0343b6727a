"""Domain failures; api.py maps each to one HTTP status."""


class NotFound(Exception):
    """The person or item does not exist (404)."""


class Conflict(Exception):
    """The request contradicts the current state, e.g. an existing CPF (409)."""


class Unprocessable(Exception):
    """A field is valid on its own but not for this person (422)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


class BadToken(Exception):
    """An activation token that is forged, tampered with or for someone else (400)."""


class ExpiredToken(Exception):
    """An activation token past its time to live (410)."""


class TooSoon(Exception):
    """Asked again too soon (429 with Retry-After)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
