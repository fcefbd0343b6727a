"""Signed, expiring activation tokens bound to a CPF and the e-mail address they were sent to.

The notifier signs them with the same ACTIVATION_SECRET and salt; the format is the contract
between the two services (tests/test_activation_contract.py checks it across both).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from .errors import BadToken, ExpiredToken

SALT = "person-activation"
# The notifier signs on another host: a link signed up to this far in the future is a clock
# difference, not a forgery, and reads as fresh (itsdangerous alone calls it expired).
CLOCK_SKEW_SECONDS = 300


@dataclass(frozen=True)
class Claim:
    cpf: str
    email: str
    registered_at: datetime
    expired: bool = False


class Tokens:
    def __init__(self, secret: str, ttl_seconds: int) -> None:
        self._serializer = URLSafeTimedSerializer(secret, salt=SALT)
        self.ttl_seconds = ttl_seconds

    def issue(self, cpf: str, email: str, registered_at: datetime) -> str:
        return self._serializer.dumps(
            {"cpf": cpf, "email": email, "registered_at": registered_at.isoformat()}
        )

    def read(self, token: str, cpf: str) -> Claim:
        """Verify the signature and the CPF; an expired but genuine token is marked expired."""
        try:
            payload, expired = self._serializer.loads(token, max_age=self.ttl_seconds), False
        except SignatureExpired as exc:
            payload = self._serializer.load_payload(exc.payload)
            ahead = (exc.date_signed - datetime.now(UTC)).total_seconds() if exc.date_signed else 0
            if ahead > CLOCK_SKEW_SECONDS:
                raise BadToken("the activation link is not valid") from None
            expired = ahead <= 0
        except BadSignature:
            raise BadToken("the activation link is not valid") from None
        if not isinstance(payload, dict) or payload.get("cpf") != cpf:
            raise BadToken("the activation link was issued for another person")
        email, registered = payload.get("email"), payload.get("registered_at")
        if not isinstance(email, str) or not isinstance(registered, str):
            raise BadToken("the activation link is not valid")
        try:
            registered_at = datetime.fromisoformat(registered)
        except ValueError:
            raise BadToken("the activation link is not valid") from None
        if registered_at.tzinfo is None:
            raise BadToken("the activation link is not valid")
        return Claim(cpf, email, registered_at, expired)

    @staticmethod
    def raise_if_expired(claim: Claim) -> None:
        if claim.expired:
            raise ExpiredToken("the activation link has expired: ask for a new e-mail")
