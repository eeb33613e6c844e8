"""Codecs and the message format without sockets: every dtype, shape and layout
round-trips through `encode_message` / `decode_message`; lossless codecs are
bit-exact, lossy ones stay within their format's precision and refuse integers;
raw frames are views of the tensors on both sides (no copies)."""
from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from djinn.errors import BadHeader, FrameMismatch, TooLarge
from djinn.transport import (Codec, CodecPolicy, Header, Limits, OutgoingTensor, TensorKind, decode_message,
                             encode_message)
from djinn.transport.codecs import LOSSLESS
from djinn.transport.wire import DTYPES, PROTOCOL_VERSION, parse_header

OPS = ("echo",)
LAYOUTS = ("contiguous", "transposed", "strided", "offset")
HYPOTHESIS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int, layout: str = "contiguous",
                specials: bool = True) -> torch.Tensor:
    """A seeded tensor of `shape`, laid out as asked: a transposed view, a strided
    slice, or a contiguous slice with a storage offset. Floats include NaN, ±inf and
    -0.0 when `specials`, so bit-exactness is checked where `==` would not."""
    g = torch.Generator().manual_seed(seed)
    base_shape = list(reversed(shape)) if layout == "transposed" else list(shape)
    if layout == "strided":
        base_shape = [shape[0] * 2, *shape[1:]] if shape else [3]  # a 0-d tensor is taken out of a 1-d one
    elif layout == "offset":
        base_shape = [shape[0] + 1, *shape[1:]] if shape else [3]
    if dtype is torch.bool:
        base = torch.randint(0, 2, base_shape, generator=g).bool()
    elif dtype.is_floating_point:
        base = (torch.randn(base_shape, generator=g, dtype=torch.float64) * 100).to(dtype)
        if specials and base.numel() >= 4:
            flat = base.view(-1)
            flat[:4] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0], dtype=dtype)
    else:
        info = torch.iinfo(dtype)
        base = torch.randint(info.min, info.max, base_shape, generator=g, dtype=dtype)
    if layout == "transposed":
        return base.permute(tuple(reversed(range(base.dim()))))
    if layout == "strided":
        return base[::2] if shape else base[1]
    if layout == "offset":
        return base[1:] if shape else base[1]
    return base


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8)


def assert_bit_exact(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(bits(got), bits(want))


def address(buffer) -> int:
    return np.frombuffer(buffer, dtype=np.uint8).ctypes.data


def round_trip(tensors, policy=CodecPolicy(), limits=Limits()):
    frames, payload, framing = encode_message(Header("echo", 1), tensors, policy)
    return decode_message(frames, OPS, limits), frames, payload, framing


shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


@HYPOTHESIS
@given(dtype=st.sampled_from(list(DTYPES.values())), shape=shapes, layout=st.sampled_from(LAYOUTS),
       codec=st.sampled_from(LOSSLESS), seed=st.integers(0, 2**31))
@example(dtype=torch.bfloat16, shape=(), layout="contiguous", codec=Codec.ZSTD, seed=0)
@example(dtype=torch.bool, shape=(3, 0, 2), layout="transposed", codec=Codec.LZ4, seed=0)
@example(dtype=torch.int64, shape=(4, 3), layout="strided", codec=Codec.RAW, seed=0)
@example(dtype=torch.float32, shape=(1,), layout="strided", codec=Codec.ZSTD, seed=0)
def test_lossless_round_trip_is_bit_exact(dtype, shape, layout, codec, seed):
    source = make_tensor(dtype, shape, seed, layout)
    message, *_ = round_trip({"t": OutgoingTensor(source, codec=codec)})
    assert message.header.tensors[0].codec is codec
    assert_bit_exact(message.tensors["t"], source)


@pytest.mark.parametrize("codec, rtol", [(Codec.FP16, 1e-3), (Codec.BF16, 8e-3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_lossy_round_trip_within_precision_and_keeps_dtype(dtype, codec, rtol):
    source = make_tensor(dtype, (64, 33), seed=1, layout="transposed", specials=False)
    message, frames, payload, _ = round_trip({"t": OutgoingTensor(source, codec=codec)})
    got = message.tensors["t"]
    assert got.dtype == dtype and got.shape == source.shape
    assert payload == source.numel() * 2  # the wire form is 16-bit whatever the source type
    torch.testing.assert_close(got.double(), source.double(), rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("codec", [Codec.FP16, Codec.BF16])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_lossy_codec_on_integer_tensor_is_an_error(dtype, codec):
    with pytest.raises(ValueError, match=codec.value):
        encode_message(Header("echo", 1), {"t": OutgoingTensor(torch.zeros(4, dtype=dtype), codec=codec)})


def test_lossy_codec_declared_for_integer_dtype_is_rejected_by_the_receiver():
    head = msgpack.packb({"v": PROTOCOL_VERSION, "op": "echo", "id": 1, "args": {},
                          "tensors": [["t", "int64", [4], "fp16", 8, "other"]]})
    with pytest.raises(BadHeader, match="lossy"):
        parse_header(head, OPS, Limits())


@pytest.mark.parametrize("codec", [Codec.ZSTD, Codec.LZ4])
def test_compressed_codecs_shrink_compressible_data_and_declare_the_sent_size(codec):
    source = torch.zeros(1 << 18, dtype=torch.float32)  # 1 MB
    message, frames, payload, _ = round_trip({"t": OutgoingTensor(source, codec=codec)})
    assert payload == len(frames[1]) == message.header.tensors[0].nbytes < source.nbytes // 50
    assert_bit_exact(message.tensors["t"], source)


def test_policy_picks_the_codec_by_semantic_kind_and_a_tensor_may_override_it():
    policy = CodecPolicy({TensorKind.LOGITS: Codec.ZSTD, TensorKind.KV: Codec.LZ4})
    tensors = {"logits": OutgoingTensor(torch.zeros(8), TensorKind.LOGITS),
               "kv": OutgoingTensor(torch.zeros(8), TensorKind.KV),
               "ids": OutgoingTensor(torch.zeros(8, dtype=torch.int64), TensorKind.TOKEN_IDS),
               "forced": OutgoingTensor(torch.zeros(8), TensorKind.LOGITS, codec=Codec.RAW),
               "plain": torch.zeros(8)}
    message, *_ = round_trip(tensors, policy)
    got = {s.name: (s.codec, s.kind) for s in message.header.tensors}
    assert got == {"logits": (Codec.ZSTD, TensorKind.LOGITS), "kv": (Codec.LZ4, TensorKind.KV),
                   "ids": (Codec.RAW, TensorKind.TOKEN_IDS), "forced": (Codec.RAW, TensorKind.LOGITS),
                   "plain": (Codec.RAW, TensorKind.OTHER)}


def _compressed_frame(codec: Codec, data: bytes) -> bytes:
    if codec is Codec.ZSTD:
        import zstandard
        return zstandard.ZstdCompressor().compress(data)
    import lz4.frame
    return lz4.frame.compress(data, store_size=True)


@pytest.mark.parametrize("codec", [Codec.ZSTD, Codec.LZ4])
@pytest.mark.parametrize("actual_bytes", [32, 8], ids=["more", "less"])
def test_compressed_frame_must_decompress_to_the_declared_size(codec, actual_bytes):
    frame = _compressed_frame(codec, bytes(range(actual_bytes)))
    head = msgpack.packb({"v": PROTOCOL_VERSION, "op": "echo", "id": 1, "args": {},
                          "tensors": [["t", "float32", [4], codec.value, len(frame), "other"]]})
    with pytest.raises(FrameMismatch):
        decode_message([head, frame], OPS)


@pytest.mark.parametrize("codec", [Codec.ZSTD, Codec.LZ4])
def test_corrupt_compressed_frame_is_a_frame_mismatch(codec):
    frame = bytearray(_compressed_frame(codec, bytes(64)))
    frame[len(frame) // 2:] = b"\xff" * (len(frame) - len(frame) // 2)
    head = msgpack.packb({"v": PROTOCOL_VERSION, "op": "echo", "id": 1, "args": {},
                          "tensors": [["t", "float32", [16], codec.value, len(frame), "other"]]})
    with pytest.raises(FrameMismatch):
        decode_message([head, bytes(frame)], OPS)


def test_decompressed_sizes_count_against_the_message_limit():
    # Two small frames that each inflate to 1 MB: within the per-tensor limit, over the message limit.
    frame = _compressed_frame(Codec.ZSTD, bytes(1 << 20))
    spec = ["float32", [1 << 18], "zstd", len(frame), "other"]
    head = msgpack.packb({"v": PROTOCOL_VERSION, "op": "echo", "id": 1, "args": {},
                          "tensors": [["a", *spec], ["b", *spec]]})
    with pytest.raises(TooLarge, match="message"):
        decode_message([head, frame, frame], OPS, Limits(max_tensor_bytes=1 << 20, max_message_bytes=3 << 19))


def test_duplicate_tensor_names_are_rejected():
    head = msgpack.packb({"v": PROTOCOL_VERSION, "op": "echo", "id": 1, "args": {},
                          "tensors": [["t", "uint8", [1], "raw", 1, "other"]] * 2})
    with pytest.raises(BadHeader, match="unique"):
        decode_message([head, b"a", b"b"], OPS)


def test_many_tensors_go_as_one_frame_each_sharing_memory_with_the_sources():
    # The 13.5 GB weight upload in miniature: one frame per tensor, no concatenated buffer.
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool, torch.uint8]
    base = torch.arange(4096, dtype=torch.float32)
    tensors = {f"w{i}": make_tensor(dtypes[i % len(dtypes)], (i % 7 + 1, 3), seed=i) for i in range(300)}
    tensors["slice_with_offset"] = base[1000:1100]
    frames, payload, framing = encode_message(Header("echo", 1), tensors)
    assert len(frames) == 1 + len(tensors)
    assert payload == sum(t.nbytes for t in tensors.values())
    for frame, tensor in zip(frames[1:], tensors.values()):
        assert len(frame) == tensor.nbytes
        assert address(frame) == tensor.data_ptr()
    base[1000] = 12345.0  # a view, not a copy: the frame sees later writes to the source
    assert np.frombuffer(frames[-1], dtype=np.float32)[0] == 12345.0


def test_a_non_contiguous_tensor_is_made_contiguous_once():
    source = make_tensor(torch.float32, (5, 7), seed=3, layout="transposed")
    frames, *_ = encode_message(Header("echo", 1), {"t": source})
    assert address(frames[1]) != source.data_ptr()
    assert_bit_exact(torch.frombuffer(bytearray(frames[1]), dtype=torch.float32).view(5, 7), source)


def test_a_one_element_slice_with_a_wide_stride_travels():
    # ids[:, -1] of a batch of one: torch calls it contiguous, yet its stride is the sequence length.
    ids = torch.arange(12).view(1, 12)[:, -1]
    message, *_ = round_trip({"next_id": ids})
    assert_bit_exact(message.tensors["next_id"], ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_decoding_a_raw_frame_wraps_it_without_copying(dtype):
    source = make_tensor(dtype, (16, 16), seed=4)
    frames, *_ = encode_message(Header("echo", 1), {"t": source})
    received = bytearray(frames[1])  # stands in for the receive buffer
    message = decode_message([bytes(frames[0]), received], OPS)
    tensor = message.tensors["t"]
    assert tensor.untyped_storage().data_ptr() == address(received)
    assert_bit_exact(tensor, source)
