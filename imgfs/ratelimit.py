"""Log lines that repeat at most once per interval: a dead store or a full disk fails every request,
and an operator needs the first line, not a flood."""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass, field


@dataclass
class RateLimit:
    interval: float
    last: dict[Hashable, float] = field(default_factory=dict)

    def allow(self, what: Hashable) -> bool:
        """True at most once per ``interval`` seconds for each ``what``."""
        now = time.monotonic()
        if now - self.last.get(what, -1e9) >= self.interval:
            self.last[what] = now
            return True
        return False
