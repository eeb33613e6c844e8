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

import torch

from djinn.errors import BadHeader, FrameMismatch


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


def _unshuffle(flat: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    size = dtype.itemsize
    if size == 1:
        return flat.view(dtype)
    return flat.view(size, -1).t().contiguous().reshape(-1).view(dtype)


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
    expected = numel * wire_itemsize(dtype, codec)
    if codec in (Codec.ZSTD, Codec.LZ4):
        buffer = _decompress(buffer, codec, expected)
    if len(buffer) != expected:
        raise FrameMismatch(f"{codec.value} data holds {len(buffer)} bytes, "
                            f"shape {list(shape)} of {dtype} needs {expected}")
    wire_dtype = _DOWNCAST.get(codec, dtype)
    flat = torch.frombuffer(buffer, dtype=torch.uint8)
    if codec in (Codec.ZSTD, Codec.LZ4):
        return _unshuffle(flat, wire_dtype).view(shape)
    tensor = flat.view(wire_dtype).view(shape)
    return tensor.to(dtype) if codec in _DOWNCAST else tensor


def _decompress(buffer, codec: Codec, expected: int) -> bytearray:
    # The declared size bounds the output, so a zip bomb fails instead of allocating.
    try:
        if codec is Codec.ZSTD:
            reader = _require("zstandard").ZstdDecompressor().stream_reader(bytes(buffer))
            out = reader.read(expected + 1)  # one byte over reveals a frame larger than declared
        else:
            lz4frame = _require("lz4.frame").frame
            with lz4frame.LZ4FrameDecompressor() as dec:
                out = dec.decompress(bytes(buffer), max_length=expected)
                if not dec.eof:  # max_length truncates silently: a frame not ended here is over (or short of) the size
                    raise FrameMismatch(f"lz4 frame decompresses to more than the declared {expected} bytes, "
                                        f"or is truncated")
    except FrameMismatch:
        raise
    except Exception as exc:  # the libraries raise their own error types on corrupt data
        raise FrameMismatch(f"{codec.value} frame does not decompress: {exc}") from exc
    return bytearray(out)
