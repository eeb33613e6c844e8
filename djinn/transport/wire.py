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

from djinn.errors import BadHeader, FrameMismatch, TooLarge, Unauthenticated, UnknownOp, UnsupportedVersion, quote
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
# Header bounds beside `Limits`: no legitimate header holds a string or byte field over
# 64 KiB (a config's longest value is a few hundred bytes), a map of more than 4096
# entries, or a tensor name longer than a module path.
MAX_STR_BYTES = 64 << 10
MAX_MAP_LEN = 4096
MAX_NAME_CHARS = 512


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
    return length_byte_counts([len(f) for f in frames])


def length_byte_counts(lengths: list[int]) -> tuple[int, int]:
    """`frame_byte_counts` of frames of these lengths, header frame first."""
    return sum(lengths[1:]), sum(lengths[:1]) + sum(zmtp_prefix_bytes(n) for n in lengths)


def _field(raw: Mapping, key: str, types, what: str):
    if key not in raw:
        raise BadHeader(f"header has no '{key}' ({what})")
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, types):
        raise BadHeader(f"header field '{key}' must be {what}, got {type(value).__name__}")
    return value


def _enum(cls, value, what: str):
    # A list or dict is unhashable: `cls(value)` would raise TypeError, not ValueError.
    if not isinstance(value, str) or value not in cls._value2member_map_:
        raise BadHeader(f"unknown {what} {quote(value)}; known: {', '.join(m.value for m in cls)}")
    return cls(value)


def unpack_header(frame, limits: Limits) -> dict:
    """The header frame as a map, unpacked within the limits and nothing else looked at."""
    if len(frame) > limits.max_header_bytes:
        raise TooLarge(f"header of {len(frame)} bytes exceeds the {limits.max_header_bytes}-byte limit")
    try:
        raw = msgpack.unpackb(frame, raw=False, strict_map_key=True, max_array_len=limits.max_tensors * 8,
                              max_map_len=MAX_MAP_LEN, max_str_len=MAX_STR_BYTES, max_bin_len=MAX_STR_BYTES,
                              max_ext_len=0)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise BadHeader(f"header frame is not valid msgpack: {quote(str(exc))}") from None
    if not isinstance(raw, dict):
        raise BadHeader(f"header must be a map, got {type(raw).__name__}")
    return raw


def request_id_of(raw: Mapping) -> int | None:
    """The header's request id when it is a valid one: error replies carry it so the client can match them."""
    value = raw.get("id")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def check_auth(raw: Mapping, auth_token: str | None) -> None:
    """With a token, the header must carry it: checked before any other field is read."""
    if auth_token is None:
        return
    auth = raw.get("auth")
    given = auth.encode() if isinstance(auth, str) else b""
    if not hmac.compare_digest(given, auth_token.encode()):
        raise Unauthenticated("missing or wrong auth token")


def parse_header(frame, known_ops: Iterable[str], limits: Limits, auth_token: str | None = None) -> Header:
    """A validated (and, with a token, authenticated) header frame; nothing of an
    unauthenticated one is parsed beyond the map that carries its token."""
    return header_from(unpack_header(frame, limits), known_ops, limits, auth_token)


def header_from(raw: Mapping, known_ops: Iterable[str], limits: Limits, auth_token: str | None = None) -> Header:
    check_auth(raw, auth_token)
    version = _field(raw, "v", int, "the protocol version")
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"protocol version {quote(version)} is not supported "
                                 f"(this side speaks {PROTOCOL_VERSION})")
    op = _field(raw, "op", str, "the op name")
    if op not in known_ops:
        raise UnknownOp(f"unknown op {quote(op)}")
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
    # Compressed frames count at their decompressed size, which is what gets allocated;
    # checked here, before a receiver lands any frame.
    total = sum(max(s.nbytes, _decoded_bytes(s.dtype, s.shape, s.codec)) for s in specs)
    if total > limits.max_message_bytes:
        raise TooLarge(f"message declares {total} bytes, over the {limits.max_message_bytes}-byte limit")
    return Header(op, request_id, specs, args, auth, version)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_spec(entry, limits: Limits) -> TensorSpec:
    if not isinstance(entry, list) or len(entry) != 6:
        raise BadHeader(f"tensor spec must be [name, dtype, shape, codec, nbytes, kind], got {quote(entry)}")
    name, dtype, shape, codec, nbytes, kind = entry
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
        raise BadHeader(f"tensor name must be a string of 1 to {MAX_NAME_CHARS} characters, got {quote(name)}")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise BadHeader(f"tensor {quote(name)}: unknown dtype {quote(dtype)}")
    if (not isinstance(shape, list) or len(shape) > limits.max_dims
            or not all(_is_int(d) and d >= 0 for d in shape)):
        raise BadHeader(f"tensor {quote(name)}: shape must be at most {limits.max_dims} non-negative ints, "
                        f"got {quote(shape)}")
    if not _is_int(nbytes) or nbytes < 0:
        raise BadHeader(f"tensor {quote(name)}: byte length must be a non-negative int")
    codec = _enum(Codec, codec, f"codec of tensor {quote(name)}")
    kind = _enum(TensorKind, kind, f"semantic kind of tensor {quote(name)}")
    if codec not in codecs.LOSSLESS and not DTYPES[dtype].is_floating_point:
        raise BadHeader(f"tensor {quote(name)}: lossy codec {codec.value} applies to floating tensors, not {dtype}")
    # Each dimension alone within the limit: with a zero beside it, [0, 2**63] has 0
    # elements and passes a size check, then torch.empty refuses the dimension.
    itemsize = codecs.wire_itemsize(DTYPES[dtype], codec)
    if any(d * itemsize > limits.max_tensor_bytes for d in shape):
        raise TooLarge(f"tensor {quote(name)}: a dimension of {quote(shape)} exceeds the "
                       f"{limits.max_tensor_bytes}-byte tensor limit")
    decoded = _decoded_bytes(dtype, shape, codec)
    if max(decoded, nbytes) > limits.max_tensor_bytes:
        raise TooLarge(f"tensor {quote(name)} declares {max(decoded, nbytes)} bytes, over the "
                       f"{limits.max_tensor_bytes}-byte limit")
    if codec not in (Codec.ZSTD, Codec.LZ4) and nbytes != decoded:
        raise FrameMismatch(f"tensor {quote(name)}: {dtype} {shape} is {decoded} bytes as {codec.value}, "
                            f"header declares {nbytes}")
    return TensorSpec(name, dtype, tuple(shape), codec, nbytes, kind)


def _decoded_bytes(dtype: str, shape, codec: Codec) -> int:
    """Bytes of the frame once decompressed: what the receiver allocates."""
    return math.prod(shape) * codecs.wire_itemsize(DTYPES[dtype], codec)


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
    header = parse_header(head, known_ops, limits, auth_token)
    return assemble(header, head, [_buffer(f) for f in frames[1:]])


def assemble(header: Header, head, bodies: list) -> Message:
    """The message of a read header and its tensor frames (buffers, or `Landed` frames,
    which become their tensors as they are)."""
    if len(bodies) != len(header.tensors):
        raise FrameMismatch(f"header declares {len(header.tensors)} tensor frames, message has {len(bodies)}")
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
