"""Byte counters of one connection, per direction, split into payload and framing."""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class ByteCounters:
    sent_payload: int = 0
    sent_framing: int = 0
    received_payload: int = 0
    received_framing: int = 0
    messages_sent: int = 0
    messages_received: int = 0

    def count_sent(self, payload: int, framing: int) -> None:
        self.sent_payload += payload
        self.sent_framing += framing
        self.messages_sent += 1

    def count_received(self, payload: int, framing: int) -> None:
        self.received_payload += payload
        self.received_framing += framing
        self.messages_received += 1

    @property
    def sent_total(self) -> int:
        return self.sent_payload + self.sent_framing

    @property
    def received_total(self) -> int:
        return self.received_payload + self.received_framing

    def snapshot(self) -> "ByteCounters":
        return ByteCounters(**{f.name: getattr(self, f.name) for f in fields(self)})

    def since(self, earlier: "ByteCounters") -> "ByteCounters":
        return ByteCounters(**{f.name: getattr(self, f.name) - getattr(earlier, f.name) for f in fields(self)})
