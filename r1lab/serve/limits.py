"""What one client may cost the server: request size and time, connections, and the Host names it answers to.

Kept apart from the app (no web imports), so that `r1lab serve --help` can print these fields' help.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from r1lab.config import opt


@dataclass
class ServerLimits:
    """Limits on clients; the defaults suit a server on a laptop or a LAN."""

    max_body_mb: float = opt(1.0, "largest request body in MiB (413 beyond); raise it for long-context models")
    header_timeout: float = opt(
        10.0, "seconds a client has to send a request's line and headers; then the connection is closed"
    )
    body_timeout: float = opt(30.0, "seconds a client has to send a whole request body (408 beyond)")
    max_connections: int = opt(512, "open connections (or requests in progress) beyond which requests get 503")
    keep_alive: float = opt(5.0, "seconds an idle keep-alive connection stays open")
    allowed_hosts: tuple[str, ...] = opt(
        (), "Host names answered besides localhost and the bound host ('*.example.com' patterns; '*' answers any)"
    )

    def validate(self) -> ServerLimits:
        """Named as `r1lab serve` spells them (--max-body-mb ...)."""
        for name in ("max_body_mb", "header_timeout", "body_timeout", "keep_alive"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"--{name.replace('_', '-')} must be a number > 0 (got {getattr(self, name)})")
        if self.max_connections < 1:
            raise ValueError(f"--max-connections must be >= 1 (got {self.max_connections})")
        return self

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))
