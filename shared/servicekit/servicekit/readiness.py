"""What a readiness check raises to say why the process is not ready (`/ready` shows it)."""

from __future__ import annotations


class NotReady(Exception):
    """A readiness check that fails with a reason worth showing (/ready says it)."""


class Rebuilding(NotReady):
    """The read model is being rebuilt from a replay: /ready answers `rebuilding`."""
