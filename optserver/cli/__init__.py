"""The ``optserver`` command: ``serve``, ``demo``, ``worker``, ``create-session``, ``evaluate``."""

from __future__ import annotations

from optserver.cli.app import app, main

__all__ = ["app", "main"]
