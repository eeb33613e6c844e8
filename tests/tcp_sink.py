"""A TCP byte sink in an emulated link's server namespace, for the tests that time a transfer
against the link's rate (test_link.py, test_link_shaping.py)."""
from __future__ import annotations

import socket
import threading

from djinn.link.emulated import EmulatedLink
from djinn.netns_exec import call_in


def byte_sink(link: EmulatedLink, port: int) -> tuple[threading.Thread, list[int]]:
    """A listener on the link's server address (listening when this returns: made in the server's
    namespace by `call_in`, so no connect can race it) and the thread that counts the bytes of the
    one connection it accepts; the count lands in the list when the sender closes."""
    listener = call_in(link.server_netns, lambda: socket.create_server((link.server_address, port)))
    received: list[int] = []

    def count() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                total = 0
                while chunk := conn.recv(1 << 20):
                    total += len(chunk)
                received.append(total)

    thread = threading.Thread(target=count, name=f"tcp-sink:{port}", daemon=True)
    thread.start()
    return thread, received
