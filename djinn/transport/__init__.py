"""Djinn's wire: msgpack header + raw tensor frames over ZeroMQ DEALER/ROUTER."""
from djinn.transport.codecs import Codec, CodecPolicy, TensorKind
from djinn.transport.counters import ByteCounters
from djinn.transport.sockets import DEFAULT_TIMEOUT_S, ClientConnection, Incoming, ServerSocket, endpoint
from djinn.transport.wire import (ERROR_OP, PROTOCOL_VERSION, REPLY_OP, Header, Limits, Message, OutgoingTensor,
                                  TensorSpec, decode_message, encode_message)

__all__ = ["Codec", "CodecPolicy", "TensorKind", "ByteCounters", "ClientConnection", "Incoming", "ServerSocket",
           "endpoint", "DEFAULT_TIMEOUT_S", "ERROR_OP", "PROTOCOL_VERSION", "REPLY_OP", "Header", "Limits",
           "Message", "OutgoingTensor", "TensorSpec", "decode_message", "encode_message"]
