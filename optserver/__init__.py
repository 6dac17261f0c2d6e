"""optserver: a parameter server over plain HTTP."""

from __future__ import annotations

__version__ = "0.1.0"
