"""What the stack's throwaway servers share (stack.cluster, stack.redis_cluster, stack.pg_pair):
servers of this machine under one directory of their own, started all or none, removed whole."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Self


class LocalServers:
    """Subclasses set `base` and say how to start them all (`_start`), stop one (`_stop`), which
    there are (`_members`) and what to remember of them for `load` (`_save`)."""

    base: Path

    def _start(self) -> None:
        raise NotImplementedError

    def _members(self) -> list[Any]:
        raise NotImplementedError

    def _stop(self, member: Any) -> Any:
        raise NotImplementedError

    def _save(self) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        """Start every server; if one does not come, stop those that did and remove the lot."""
        try:
            self._start()
            self._save()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop every server, delete the directory."""
        for member in self._members():
            self._stop(member)
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()
