"""Integration tests run against a real server in a subprocess (see optserver.embedded)."""

from __future__ import annotations

from optserver.embedded import EmbeddedServer as LiveServer
from optserver.embedded import embedded_server as live_server
from optserver.embedded import free_port

__all__ = ["LiveServer", "free_port", "live_server"]
