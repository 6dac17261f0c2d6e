"""The server's pool of large buffers: frozen copies of the weights answers are encoded from,
and large request bodies (see :mod:`optserver_client.buffers` for why and how they are reused).

One pool per process, as the kernels' thread pool is; :func:`configure` sizes it from
``Settings.buffer_pool_bytes`` when the app is created.
"""

from __future__ import annotations

from optserver_client.buffers import BufferPool

__all__ = ["DEFAULT_POOL_BYTES", "configure", "pool"]

#: The pool's bound before :func:`configure` (the setting's default).
DEFAULT_POOL_BYTES = 256 << 20

_pool = BufferPool(DEFAULT_POOL_BYTES)


def pool() -> BufferPool:
    return _pool


def configure(max_bytes: int) -> None:
    """Bound the pool at ``max_bytes`` (0: no reuse); buffers kept so far are forgotten."""
    global _pool
    _pool = BufferPool(max_bytes)
