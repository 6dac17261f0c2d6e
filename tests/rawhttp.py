"""Raw HTTP/1.1 over a socket, for tests that must see exactly what the server sends."""

from __future__ import annotations

import socket

__all__ = ["read_response"]


def read_response(
    sock: socket.socket, *, strict: bool = False
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one answer with a Content-Length (the body is cut at that
    length, or shorter if the connection closed first). ``strict``: the whole body arrived,
    and nothing after it so far."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    if strict:
        assert len(body) >= length, "the answer was cut short"
        assert len(body) == length, "more than one answer"
    return status, headers, body[:length]
