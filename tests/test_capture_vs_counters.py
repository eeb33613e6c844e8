"""The packet capture and the transport's own counters agree on a 1 GB transfer.

Two independent measurements of the same bytes: the capture reads the kernel's
packets of the server's port, the transport counts what it framed. TCP payload must
match the framed bytes within 2% (ZMTP's greeting and handshake add a few hundred
bytes), and the wire total must exceed it by no more than the TCP/IP headers.
"""
from __future__ import annotations

import threading

import pytest
import torch

from djinn.telemetry.wire_capture import WireCapture, capture_available
from djinn.transport import ClientConnection, ServerSocket

GIGABYTE_ELEMENTS = (1 << 30) // 4
TENSORS_PER_MESSAGE = 4  # 1 GB as four 256 MB frames, as a large upload would go
AGREEMENT = 0.02
MAX_HEADER_FRACTION = 0.05  # IPv4 + TCP + L2 headers per loopback segment of ~64 KB


@pytest.mark.slow
def test_capture_agrees_with_transport_counters_on_one_gigabyte():
    ok, reason = capture_available()
    if not ok:
        pytest.skip(f"wire capture: {reason}")
    server = ServerSocket("tcp://127.0.0.1:0", ["sink"])
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            incoming = server.receive(50)
            if incoming is not None:
                server.reply(incoming.peer, incoming.request_id, {"n": len(incoming.message.tensors)})

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    port = int(server.address.rsplit(":", 1)[1])
    data = torch.arange(GIGABYTE_ELEMENTS, dtype=torch.float32)
    parts = {f"part{i}": chunk for i, chunk in enumerate(data.chunk(TENSORS_PER_MESSAGE))}
    try:
        with ClientConnection(server.address, timeout_s=120) as client:
            client.request("sink")  # connect and handshake before the measured region
            before = client.counters.snapshot()
            with WireCapture(port) as capture:
                client.request("sink", tensors=parts)
            counted = client.counters.since(before)
    finally:
        stop.set()
        thread.join(5)
        server.close()
    wire = capture.result
    framed = counted.sent_total + counted.received_total
    assert wire.kernel_drops == 0
    assert counted.sent_payload == GIGABYTE_ELEMENTS * 4
    assert abs(wire.unique_payload_bytes - framed) <= AGREEMENT * framed, (wire, counted)
    assert framed <= wire.wire_bytes <= framed * (1 + AGREEMENT + MAX_HEADER_FRACTION), (wire, counted)
