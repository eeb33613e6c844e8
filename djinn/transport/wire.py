"""The message format: one msgpack header frame, then one raw frame per tensor.

`encode_message` and `decode_message` are the only code that frames bytes. Every
field of a received header is validated, and every frame checked against its
declared size, before a tensor is built: a malformed message raises a
`ProtocolError` subclass that the receiver turns into an error reply.
`decode_message` is `read_header` then `assemble`; a receiver that lands frames in
buffers of its own (`Landed`) calls the two itself, with the header read between
receiving the header frame and the tensor frames.
"""
from __future__ import annotations

import hmac
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import msgpack
import torch

from djinn.errors import BadHeader, FrameMismatch, TooLarge, Unauthenticated, UnknownOp, UnsupportedVersion
from djinn.transport import codecs
from djinn.transport.codecs import Codec, CodecPolicy, TensorKind

PROTOCOL_VERSION = 1
REPLY_OP = "reply"
ERROR_OP = "error"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32,
    "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts before it allocates anything."""
    max_header_bytes: int = 1 << 20
    max_tensor_bytes: int = 8 << 30
    max_message_bytes: int = 16 << 30
    max_tensors: int = 4096
    max_dims: int = 8


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]
    codec: Codec
    nbytes: int  # bytes of the frame as sent (compressed size for zstd/lz4)
    kind: TensorKind


@dataclass(frozen=True)
class Header:
    op: str
    request_id: int
    tensors: tuple[TensorSpec, ...] = ()
    args: Mapping[str, Any] = field(default_factory=dict)
    auth: str | None = None
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class Message:
    header: Header
    tensors: dict[str, torch.Tensor]
    payload_bytes: int  # tensor frames
    framing_bytes: int  # header frame + ZMTP frame prefixes

    @property
    def op(self) -> str:
        return self.header.op

    @property
    def args(self) -> Mapping[str, Any]:
        return self.header.args


@dataclass(frozen=True)
class OutgoingTensor:
    tensor: torch.Tensor
    kind: TensorKind = TensorKind.OTHER
    codec: Codec | None = None  # None: the policy's codec for the kind


def zmtp_prefix_bytes(frame_len: int) -> int:
    """ZMTP/3 puts a flags byte and a 1- or 8-byte length before every frame."""
    return 2 if frame_len <= 255 else 9


def _as_outgoing(value) -> OutgoingTensor:
    return value if isinstance(value, OutgoingTensor) else OutgoingTensor(value)


def encode_message(header: Header, tensors: Mapping[str, torch.Tensor | OutgoingTensor] | None = None,
                   policy: CodecPolicy = CodecPolicy()) -> tuple[list, int, int]:
    """Frames ready for `send_multipart(copy=False)`, with payload and framing byte counts.

    Contiguous CPU tensors go out as views of their own memory; others are made
    contiguous (and moved to the CPU) first, which is the only copy on this path.
    """
    specs, frames = [], []
    for name, value in (tensors or {}).items():
        out = _as_outgoing(value)
        tensor = out.tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        if not tensor.is_contiguous() or tensor.numel() == 1:
            # is_contiguous() ignores the strides of size-1 dims, so a one-element slice such
            # as ids[:, -1] keeps a stride the byte view rejects; copying one element is free.
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        if tensor.dtype not in DTYPE_NAMES:
            raise TypeError(f"tensor {name!r}: dtype {tensor.dtype} cannot travel")
        codec = out.codec or policy.codec_for(out.kind)
        data = codecs.encode(tensor, codec) if tensor.numel() else memoryview(b"")
        specs.append(TensorSpec(name, DTYPE_NAMES[tensor.dtype], tuple(tensor.shape), codec, len(data), out.kind))
        frames.append(data)
    head = msgpack.packb({
        "v": header.version, "op": header.op, "id": header.request_id, "args": dict(header.args),
        "auth": header.auth,
        "tensors": [[s.name, s.dtype, list(s.shape), s.codec.value, s.nbytes, s.kind.value] for s in specs],
    }, use_bin_type=True)
    payload, framing = frame_byte_counts([head, *frames])
    return [head, *frames], payload, framing


def frame_byte_counts(frames) -> tuple[int, int]:
    """Payload (tensor frames) and framing (header frame + ZMTP prefixes) bytes of one message."""
    lengths = [len(f) for f in frames]
    return sum(lengths[1:]), sum(lengths[:1]) + sum(zmtp_prefix_bytes(n) for n in lengths)


def _field(raw: Mapping, key: str, types, what: str):
    if key not in raw:
        raise BadHeader(f"header has no '{key}' ({what})")
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, types):
        raise BadHeader(f"header field '{key}' must be {what}, got {type(value).__name__}")
    return value


def _enum(cls, value, what: str):
    try:
        return cls(value)
    except ValueError:
        raise BadHeader(f"unknown {what} {value!r}; known: {', '.join(m.value for m in cls)}") from None


def parse_header(frame, known_ops: Iterable[str], limits: Limits) -> Header:
    if len(frame) > limits.max_header_bytes:
        raise TooLarge(f"header of {len(frame)} bytes exceeds the {limits.max_header_bytes}-byte limit")
    try:
        raw = msgpack.unpackb(frame, raw=False, strict_map_key=True,
                              max_array_len=limits.max_tensors * 8, max_map_len=4096)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise BadHeader(f"header frame is not valid msgpack: {exc}") from None
    if not isinstance(raw, dict):
        raise BadHeader(f"header must be a map, got {type(raw).__name__}")
    version = _field(raw, "v", int, "the protocol version")
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION})")
    op = _field(raw, "op", str, "the op name")
    if op not in known_ops:
        raise UnknownOp(f"unknown op {op!r}")
    request_id = _field(raw, "id", int, "the request id")
    args = _field(raw, "args", dict, "a map of arguments")
    auth = raw.get("auth")
    if auth is not None and not isinstance(auth, str):
        raise BadHeader("header field 'auth' must be a string")
    entries = _field(raw, "tensors", list, "a list of tensor specs")
    if len(entries) > limits.max_tensors:
        raise TooLarge(f"{len(entries)} tensors exceed the limit of {limits.max_tensors}")
    specs = tuple(_parse_spec(e, limits) for e in entries)
    if len({s.name for s in specs}) != len(specs):  # tensors are keyed by name: a duplicate would drop a frame
        raise BadHeader("tensor names must be unique")
    return Header(op, request_id, specs, args, auth, version)


def _parse_spec(entry, limits: Limits) -> TensorSpec:
    if not isinstance(entry, list) or len(entry) != 6:
        raise BadHeader(f"tensor spec must be [name, dtype, shape, codec, nbytes, kind], got {entry!r}"[:200])
    name, dtype, shape, codec, nbytes, kind = entry
    if not isinstance(name, str):
        raise BadHeader("tensor name must be a string")
    if dtype not in DTYPES:
        raise BadHeader(f"tensor {name!r}: unknown dtype {dtype!r}")
    if (not isinstance(shape, list) or len(shape) > limits.max_dims
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise BadHeader(f"tensor {name!r}: shape must be at most {limits.max_dims} non-negative ints, got {shape!r}"[:200])
    if not isinstance(nbytes, int) or nbytes < 0:
        raise BadHeader(f"tensor {name!r}: byte length must be a non-negative int")
    codec = _enum(Codec, codec, f"codec of tensor {name!r}")
    kind = _enum(TensorKind, kind, f"semantic kind of tensor {name!r}")
    if codec not in codecs.LOSSLESS and not DTYPES[dtype].is_floating_point:
        raise BadHeader(f"tensor {name!r}: lossy codec {codec.value} applies to floating tensors, not {dtype}")
    decoded = _decoded_bytes(dtype, shape, codec)
    if max(decoded, nbytes) > limits.max_tensor_bytes:
        raise TooLarge(f"tensor {name!r} declares {max(decoded, nbytes)} bytes, over the "
                       f"{limits.max_tensor_bytes}-byte limit")
    if codec not in (Codec.ZSTD, Codec.LZ4) and nbytes != decoded:
        raise FrameMismatch(f"tensor {name!r}: {dtype} {shape} is {decoded} bytes as {codec.value}, "
                            f"header declares {nbytes}")
    return TensorSpec(name, dtype, tuple(shape), codec, nbytes, kind)


def _decoded_bytes(dtype: str, shape, codec: Codec) -> int:
    """Bytes of the frame once decompressed: what the receiver allocates."""
    return math.prod(shape) * codecs.wire_itemsize(DTYPES[dtype], codec)


def read_header(head, known_ops: Iterable[str], limits: Limits, auth_token: str | None = None) -> Header:
    """A validated (and, with a token, authenticated) header frame."""
    header = parse_header(head, known_ops, limits)
    if auth_token is not None and not hmac.compare_digest((header.auth or "").encode(), auth_token.encode()):
        raise Unauthenticated("missing or wrong auth token")
    return header


def declared_bytes(header: Header) -> int:
    """What the header's tensors take once received; compressed frames count at their
    decompressed size, which is what gets allocated."""
    return sum(max(s.nbytes, _decoded_bytes(s.dtype, s.shape, s.codec)) for s in header.tensors)


@dataclass(frozen=True)
class Landed:
    """A tensor frame received straight into the memory of `tensor` (`Socket.recv_into`)."""
    tensor: torch.Tensor  # contiguous, already of the spec's dtype and shape
    received: int  # the frame's length: more than the tensor holds when libzmq truncated it

    def __len__(self) -> int:
        return self.received


def decode_message(frames: list, known_ops: Iterable[str], limits: Limits = Limits(),
                   auth_token: str | None = None) -> Message:
    """A validated (and, with a token, authenticated) message.

    Raw-codec tensors wrap the received frames without copying.
    """
    if not frames:
        raise FrameMismatch("empty message")
    head = _buffer(frames[0])
    header = read_header(head, known_ops, limits, auth_token)
    return assemble(header, head, [_buffer(f) for f in frames[1:]], limits)


def assemble(header: Header, head, bodies: list, limits: Limits) -> Message:
    """The message of a read header and its tensor frames (buffers, or `Landed` frames,
    which become their tensors as they are)."""
    if len(bodies) != len(header.tensors):
        raise FrameMismatch(f"header declares {len(header.tensors)} tensor frames, message has {len(bodies)}")
    total = declared_bytes(header)
    if total > limits.max_message_bytes:
        raise TooLarge(f"message declares {total} bytes, over the {limits.max_message_bytes}-byte limit")
    for spec, buf in zip(header.tensors, bodies):
        if len(buf) != spec.nbytes:
            raise FrameMismatch(f"tensor {spec.name!r}: frame holds {len(buf)} bytes, header declares {spec.nbytes}")
    # zmq frames received with copy=False expose writable buffers, so torch.frombuffer does not
    # warn on this path (read-only bytes frames do; pytest.ini filters that); no per-message
    # catch_warnings, which cost ~3 us a message.
    tensors = {spec.name: buf.tensor if isinstance(buf, Landed) else
               codecs.decode(buf, DTYPES[spec.dtype], spec.shape, spec.codec)
               for spec, buf in zip(header.tensors, bodies)}
    payload, framing = frame_byte_counts([head, *bodies])
    return Message(header, tensors, payload, framing)


def _buffer(frame) -> memoryview:
    # zmq.Frame (copy=False receive) exposes .buffer; bytes and memoryviews pass through.
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
