"""The server's request loop with tcp and ipc both open, in-process."""
from __future__ import annotations

import shutil
import tempfile
import threading
import time

import pytest
import zmq

from djinn.server.server import Server, ServerConfig
from djinn.transport import ClientConnection

LONG_WAIT_MS = 20_000  # a loop that waited on each socket in turn would sit out half of it


@pytest.fixture
def two_socket_server():
    directory = tempfile.mkdtemp(prefix="djinn-")  # short: ipc paths must fit in sun_path
    server = Server(ServerConfig(port=0, ipc_path=f"{directory}/server"))
    try:
        yield server, {"tcp": server.address, "ipc": f"ipc://{directory}/server"}
    finally:
        for sock in server.sockets:
            sock.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.skipif(not zmq.has("ipc"), reason="no ipc:// here")
@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_a_request_on_either_socket_is_served_without_sitting_out_the_other(two_socket_server, transport):
    server, addresses = two_socket_server
    replies = []
    with ClientConnection(addresses[transport], timeout_s=LONG_WAIT_MS / 1e3) as client:
        asker = threading.Thread(target=lambda: replies.append(client.request("hello")))
        asker.start()
        started = time.monotonic()
        server.serve_once(LONG_WAIT_MS)  # one turn of the loop: it waits for the request, then serves it
        served_after_s = time.monotonic() - started
        asker.join(timeout=10)
    assert replies and replies[0].args["version"], "no reply to hello"
    assert served_after_s < LONG_WAIT_MS / 4e3, f"served after {served_after_s:.1f} s: the loop waited on the idle socket"
    assert server.requests_served == 1


def test_a_handler_bug_is_an_internal_reply_and_the_loop_goes_on(two_socket_server, monkeypatch):
    """Issue 13, item 1: whatever a handler or the loop's housekeeping raises is answered
    (`internal`, traceback in the log) or logged, and the next request is served."""
    from djinn.errors import DjinnError

    server, addresses = two_socket_server

    def broken(incoming):
        raise KeyError("a server bug")

    monkeypatch.setitem(server.handlers, "stats", broken)
    monkeypatch.setattr(server.sessions, "expire", lambda: 1 / 0)
    with ClientConnection(addresses["tcp"], timeout_s=LONG_WAIT_MS / 1e3) as client:
        errors = []

        def ask():
            try:
                client.request("stats")
            except DjinnError as err:
                errors.append(err)
            errors.append(client.request("hello"))

        asker = threading.Thread(target=ask)
        asker.start()
        while asker.is_alive():
            server.serve_once(100)
        assert errors[0].code == "internal" and "KeyError" in str(errors[0]) and errors[1].args["version"]
