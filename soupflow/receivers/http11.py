"""HTTP/1.1 over a blocking socket with h11: what the STOW-RS receiver and the admin endpoint
share."""

from __future__ import annotations

import socket
from typing import Any

import h11

READ_BYTES = 256 * 1024


def next_event(http: h11.Connection, connection: socket.socket) -> Any:
    """The next h11 event, reading from the socket as h11 needs (b"": the peer closed)."""
    while True:
        event = http.next_event()
        if event is not h11.NEED_DATA:
            return event
        http.receive_data(connection.recv(READ_BYTES))
