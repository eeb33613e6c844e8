"""Tensor codecs: how a tensor's bytes look on the wire, chosen per semantic kind.

`raw` sends the tensor's own memory (zero copy). `zstd` and `lz4` are lossless and
bit-exact; for floating types they byte-shuffle first (all first bytes of the
elements, then all second bytes...), which groups the low-entropy exponent bytes
and is what makes float data compress at all. `fp16` and `bf16` are lossy downcasts
and are only used when a caller asks for them by name.
"""
from __future__ import annotations

import math

from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import torch

from djinn.errors import BadHeader, FrameMismatch, quote


class TensorKind(str, Enum):
    WEIGHT = "weight"
    KV = "kv"
    ACTIVATION = "activation"
    LOGITS = "logits"
    TOKEN_IDS = "token_ids"
    OTHER = "other"


class Codec(str, Enum):
    RAW = "raw"
    ZSTD = "zstd"
    LZ4 = "lz4"
    FP16 = "fp16"
    BF16 = "bf16"


LOSSLESS = (Codec.RAW, Codec.ZSTD, Codec.LZ4)
_DOWNCAST = {Codec.FP16: torch.float16, Codec.BF16: torch.bfloat16}
ZSTD_LEVEL = 3  # level 3 compresses logits ~1.2-1.5x at >500 MB/s; higher levels cost more than they save on loopback


@dataclass(frozen=True)
class CodecPolicy:
    """Which codec each semantic kind travels with. Default: everything raw."""
    by_kind: dict[TensorKind, Codec] = field(default_factory=dict)

    def codec_for(self, kind: TensorKind) -> Codec:
        return self.by_kind.get(kind, Codec.RAW)


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as exc:  # the codecs are an optional extra
        raise BadHeader(f"codec needs the '{module}' package, which is not installed "
                        f"(pip install 'djinn[codecs]')") from exc


def _shuffle(data: torch.Tensor) -> torch.Tensor:
    size = data.element_size()
    flat = data.reshape(-1).view(torch.uint8)
    if size == 1:
        return flat
    return flat.view(-1, size).t().contiguous().reshape(-1)


def encode(tensor: torch.Tensor, codec: Codec) -> memoryview:
    """The bytes of a contiguous CPU tensor as they go on the wire."""
    if codec in _DOWNCAST:
        if not tensor.is_floating_point():
            raise ValueError(f"lossy codec {codec.value} applies to floating tensors, not {tensor.dtype}")
        tensor = tensor.to(_DOWNCAST[codec]).contiguous()
    if codec in (Codec.RAW, *_DOWNCAST):
        return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    shuffled = memoryview(_shuffle(tensor).numpy())
    if codec is Codec.ZSTD:
        return memoryview(_require("zstandard").ZstdCompressor(level=ZSTD_LEVEL).compress(shuffled))
    return memoryview(_require("lz4.frame").frame.compress(shuffled, store_size=True))


def wire_itemsize(dtype: torch.dtype, codec: Codec) -> int:
    """Element size of the uncompressed wire form."""
    return _DOWNCAST.get(codec, dtype).itemsize  # not torch.empty(...).element_size(): ~3 us a call


def decode(buffer, dtype: torch.dtype, shape: tuple[int, ...], codec: Codec) -> torch.Tensor:
    """A tensor over the received buffer; raw frames are wrapped without a copy."""
    numel = math.prod(shape)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    wire_dtype = _DOWNCAST.get(codec, dtype)
    expected = numel * wire_dtype.itemsize
    if codec in (Codec.ZSTD, Codec.LZ4):
        return _decompress(buffer, codec, numel, wire_dtype).view(shape)
    if len(buffer) != expected:
        raise FrameMismatch(f"{codec.value} data holds {len(buffer)} bytes, "
                            f"shape {list(shape)} of {dtype} needs {expected}")
    tensor = torch.frombuffer(buffer, dtype=torch.uint8).view(wire_dtype).view(shape)
    return tensor.to(dtype) if codec in _DOWNCAST else tensor


# Decompressed bytes go through a chunk this size on their way into the tensor: the
# output is the only full-size allocation (a 197 KB frame declaring 2 GiB had been held
# twice, decompressed and then unshuffled).
CHUNK_BYTES = 4 << 20


def _decompress(buffer, codec: Codec, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """The frame decompressed and unshuffled straight into a new flat tensor of `numel` elements.

    The declared size bounds the output, so a zip bomb fails instead of allocating. The
    strided writes go through numpy: torch's uint8 transposing copy ran ~10x slower."""
    size = dtype.itemsize
    expected = numel * size
    out = torch.empty(expected, dtype=torch.uint8)  # untouched pages cost nothing until written
    planes = out.numpy().reshape(numel, size)  # the shuffled stream is plane b (every element's byte b) after b-1
    filled = 0
    try:
        chunks = _chunks(buffer, codec, expected)
        if expected <= CHUNK_BYTES:  # small (logits): one transposing copy beats per-chunk writes
            chunks = [b"".join(chunks)]
        for chunk in chunks:
            data = np.frombuffer(chunk, dtype=np.uint8)
            while len(data):
                plane, start = divmod(filled, numel)
                if plane >= size:
                    raise FrameMismatch(f"{codec.value} frame decompresses to more than the declared {expected} bytes")
                if start == 0 and len(data) >= expected - filled:  # every plane left, at once
                    np.copyto(planes[:, plane:], data[:expected - filled].reshape(size - plane, numel).T)
                    data, filled = data[expected - filled:], expected
                    continue
                take = min(len(data), numel - start)
                np.copyto(planes[start:start + take, plane], data[:take])
                data, filled = data[take:], filled + take
    except FrameMismatch:
        raise
    except Exception as exc:  # the libraries raise their own error types on corrupt data
        raise FrameMismatch(f"{codec.value} frame does not decompress: {quote(str(exc))}") from exc
    if filled != expected:
        raise FrameMismatch(f"{codec.value} frame decompresses to {filled} bytes, not the declared {expected}")
    return out.view(dtype)


def _chunks(buffer, codec: Codec, expected: int):
    """The decompressed stream in chunks; FrameMismatch once it runs past `expected` bytes."""
    total = 0
    if codec is Codec.ZSTD:
        chunk = bytearray(min(CHUNK_BYTES, expected))
        with _require("zstandard").ZstdDecompressor().stream_reader(buffer, read_across_frames=True) as reader:
            while True:
                got = reader.readinto(chunk)
                if not got:
                    return
                total += got
                if total > expected:
                    raise FrameMismatch(f"zstd frame decompresses to more than the declared {expected} bytes")
                yield memoryview(chunk)[:got]
    # Input fed in slices: the decompressor keeps (and copies) whatever input a bounded
    # output leaves unconsumed, which for a whole frame was 100x slower.
    dec = _require("lz4.frame").frame.LZ4FrameDecompressor(return_bytearray=True)
    data = memoryview(buffer)
    for start in range(0, max(len(data), 1), CHUNK_BYTES):
        piece = data[start:start + CHUNK_BYTES]
        while not dec.eof:
            out = dec.decompress(piece, max_length=CHUNK_BYTES)
            piece = b""
            total += len(out)
            if total > expected:
                raise FrameMismatch(f"lz4 frame decompresses to more than the declared {expected} bytes")
            yield out
            if dec.needs_input:
                break
        if dec.eof:
            if start + CHUNK_BYTES < len(data) or dec.unused_data:
                raise FrameMismatch("lz4 data continues after its frame")
            return
    raise FrameMismatch("lz4 frame is truncated")
