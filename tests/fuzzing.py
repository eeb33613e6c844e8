"""A fuzzer for a live Djinn server: real requests (built with the client's own encoder)
mutated along the protocol's grammar, plus random bytes, each sent and answered in turn.

`Fuzzer.run(n)` sends `n` messages from one DEALER and waits up to `REPLY_TIMEOUT_S` for
each reply; it records what came back (reply or error code), messages without a reply
(hangs), and keeps going. The caller judges: no hang, the server alive, its RSS, a
bystander's tokens. Mutations pick one of the header's fields (or a tensor spec's, or an
op argument's) and give it a value of the wrong type, an edge of its range, or one from
another field; or they break the frames (drop, duplicate, truncate, extend, compress a
bomb). Seeded: a failing run repeats from its seed.
"""
from __future__ import annotations

import collections
import random
from dataclasses import dataclass, field

import msgpack
import torch
import zmq

from djinn import interventions
from djinn.client import config_dict
from djinn.transport import Header, OutgoingTensor, TensorKind, encode_message
from djinn.transport.codecs import Codec
from djinn.transport.security import ClientSecurity
from djinn.transport.sockets import endpoint
from djinn.transport.wire import DTYPES

REPLY_TIMEOUT_S = 5.0  # the acceptance bar: every message answered within it
KEPT_SESSIONS = 8  # sessions the fuzzer holds open at once
# Fingerprints a mutation can produce that are well-formed: registered with a valid
# config they are uploads in progress, which the harness opens before measuring memory.
FAKE_FINGERPRINTS = ("0" * 32, "f" * 32)

# Values that have broken parsers before, or sit on an edge of a field's range.
EDGE_VALUES = [None, True, False, 0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, -2**63, 0.5, float("nan"),
               float("inf"), "", "x", "x" * 5000, "\x00\udcff"[:1], b"", b"\xff" * 64, [], [1], [[]], {}, {"a": 1},
               [0, 2**63], [2**40, 2**40], [-1], list(range(20)), {"model_type": "llama"}]


@dataclass
class Tally:
    sent: int = 0
    replies: int = 0
    hangs: int = 0
    codes: collections.Counter = field(default_factory=collections.Counter)

    def summary(self) -> str:
        top = ", ".join(f"{code} {count}" for code, count in self.codes.most_common(8))
        return f"{self.sent} sent, {self.replies} replies, {self.hangs} hangs ({top})"


class Seeds:
    """Valid requests of every op, against state the fuzzer owns: its model's fingerprint,
    its own sessions (opened as it goes), a token if the server wants one."""

    def __init__(self, model: torch.nn.Module, fingerprint: str, sessions: list[str], token: str | None):
        self.model = model
        self.fingerprint = fingerprint
        self.sessions = sessions
        self.token = token
        self.state = model.state_dict()
        self.config = config_dict(model)
        smallest = sorted(self.state, key=lambda n: self.state[n].numel())[:2]  # norms: an upload stays cheap
        self.small = {n: self.state[n] for n in smallest}

    def ids(self, rng: random.Random, tokens: int = 3) -> torch.Tensor:
        return torch.tensor([[rng.randrange(self.model.config.vocab_size) for _ in range(tokens)]])

    def interventions(self, rng: random.Random, tokens: int) -> tuple[dict, dict]:
        """A valid `interventions` argument (and its tensors) of one to three ops at random sites."""
        hidden, layers = self.model.config.hidden_size, self.model.config.num_hidden_layers
        given = []
        for i in range(rng.randrange(1, 4)):
            site = rng.choice(interventions.SITES)
            layer = rng.randrange(layers) if site in interventions.LAYER_SITES else None
            op = rng.choice(interventions.OPS)
            if op == "save":
                given.append(interventions.save(site, layer, positions=rng.choice([None, [-1]]),
                                                lens=rng.random() < 0.3, name=f"s{i}"))
            elif op == "scale":
                given.append(interventions.scale(site, layer, rng.choice([0.5, 2.0])))
            elif op == "add":
                given.append(interventions.add(site, layer, torch.ones(hidden)))
            elif op == "replace":
                given.append(interventions.replace(site, layer, torch.zeros(1, tokens, hidden)))
            else:
                given.append(interventions.ablate(site, layer, rng.choice(interventions.ABLATIONS)))
        wire, tensors = interventions.to_wire(given)
        return {"interventions": wire}, {n: OutgoingTensor(t, TensorKind.ACTIVATION) for n, t in tensors.items()}

    def request(self, rng: random.Random, request_id: int) -> tuple[dict, dict]:
        """One valid request: (header args and op as a dict, tensors)."""
        session = rng.choice(self.sessions) if self.sessions else "0" * 32
        fp = self.fingerprint
        traced, traced_tensors = self.interventions(rng, 3)
        ops = {
            "hello": ({}, {}),
            "stats": ({}, {}),
            "open_session": ({"model": fp}, {}),
            "register_model": ({"model": fp, "config": dict(self.config), "dtype": "float32",
                                "tensors": [[n, "float32", list(t.shape)] for n, t in self.state.items()]}, {}),
            "upload_weights": ({"model": fp}, {n: OutgoingTensor(t, TensorKind.WEIGHT) for n, t in self.small.items()}),
            "forward": ({"model": fp}, {"input_ids": OutgoingTensor(self.ids(rng), TensorKind.TOKEN_IDS)}),
            "prefill": ({"model": fp, "session": session, "returns": rng.choice(["token", "logits"])},
                        {"input_ids": OutgoingTensor(self.ids(rng), TensorKind.TOKEN_IDS)}),
            "decode": ({"model": fp, "session": session, "returns": "token"},
                       {"input_ids": OutgoingTensor(self.ids(rng, 1), TensorKind.TOKEN_IDS)}),
            "run_to_layer": ({"model": fp, "session": session, "layer": rng.randrange(8)},
                             {"input_ids": OutgoingTensor(self.ids(rng), TensorKind.TOKEN_IDS)}),
            "resume": ({"model": fp, "session": session, "returns": "logits"},
                       {"activation": OutgoingTensor(torch.zeros(1, 3, self.model.config.hidden_size),
                                                     TensorKind.ACTIVATION)}),
            "cancel": ({"model": fp, "session": session}, {}),
            # Interventions (issue 18): on a prefill, a stateless forward and a server-side generate.
            "traced_prefill": ({"model": fp, "session": session, "logits": rng.choice(["last", "all"]), **traced},
                               {"input_ids": OutgoingTensor(self.ids(rng), TensorKind.TOKEN_IDS), **traced_tensors}),
            "traced_forward": ({"model": fp, "kv": False, **traced},
                               {"input_ids": OutgoingTensor(self.ids(rng), TensorKind.TOKEN_IDS), **traced_tensors}),
            "generate": ({"model": fp, "session": session, "max_new_tokens": rng.randrange(1, 6), **traced},
                         {"input_ids": OutgoingTensor(self.ids(rng), TensorKind.TOKEN_IDS), **traced_tensors}),
            "offload": ({"model": fp, "session": session}, {}),
            "session_stats": ({"model": fp, "session": session}, {}),
            "close_session": ({"session": session}, {}),
        }
        name = rng.choice(list(ops))
        args, tensors = ops[name]
        op = name.removeprefix("traced_")  # a traced prefill or forward is that op with interventions
        return {"op": op, "id": request_id, "args": args, "auth": self.token}, tensors


def _frames(head: dict, tensors: dict) -> list:
    frames, _, _ = encode_message(Header(head["op"], head["id"], args=head["args"], auth=head["auth"]), tensors)
    return [bytes(f) for f in frames]


def _mutate_value(rng: random.Random, value):
    roll = rng.random()
    if roll < 0.5:
        return rng.choice(EDGE_VALUES)
    if isinstance(value, int) and not isinstance(value, bool):
        return rng.choice([value + 1, value - 1, -value, value * 2**32, 0])
    if isinstance(value, str):
        return rng.choice([value[: len(value) // 2], value + "x", value.upper(), value * 3, *FAKE_FINGERPRINTS])
    if isinstance(value, list):
        return rng.choice([value[:-1], value + value[-1:], list(reversed(value)), [value]])
    if isinstance(value, dict) and value:
        key = rng.choice(list(value))
        return {**value, key: _mutate_value(rng, value[key])}
    return rng.choice(EDGE_VALUES)


def _mutate_header(rng: random.Random, raw: dict) -> dict:
    """One grammar-aware change to a decoded header: a field, a tensor spec entry, an op argument."""
    raw = dict(raw)
    target = rng.choice(["field", "field", "spec", "spec", "arg", "arg", "arg", "config", "drop", "extra"])
    if target == "field":
        key = rng.choice(["v", "op", "id", "args", "auth", "tensors"])
        raw[key] = _mutate_value(rng, raw.get(key))
    elif target == "spec" and raw.get("tensors"):
        specs = [list(s) for s in raw["tensors"]]
        spec = rng.choice(specs)
        slot = rng.randrange(6)
        if slot == 1:
            spec[1] = rng.choice([*DTYPES, "float7", ["float32"], {"d": 1}, 5])
        elif slot == 2:
            spec[2] = rng.choice([[0, 2**63], [2**62], [-1, 3], [1] * 9, ["2"], _mutate_value(rng, spec[2])])
        elif slot == 3:
            spec[3] = rng.choice([*(c.value for c in Codec), "gzip", [], {"c": "raw"}])
        elif slot == 4:
            spec[4] = rng.choice([spec[4] + 1, spec[4] - 1, 0, 2**63, -1, "24"])
        else:
            spec[slot] = _mutate_value(rng, spec[slot])
        raw["tensors"] = specs
    elif target in ("arg", "config") and isinstance(raw.get("args"), dict) and raw["args"]:
        args = dict(raw["args"])
        if target == "config" and isinstance(args.get("config"), dict):
            config = dict(args["config"])
            key = rng.choice(["num_hidden_layers", "vocab_size", "hidden_size", "num_attention_heads",
                              "model_type", "max_position_embeddings", "intermediate_size", "auto_map"])
            config[key] = rng.choice([0, -1, 3, 2**31, 100000, 20000, "gpt2", "nope", None, {"x": "y"}])
            args["config"] = config
        else:
            key = rng.choice(list(args) + ["layer", "returns", "logits_codec", "with_logits", "dtype", "interventions",
                                           "max_new_tokens", "logits", "saves_codec", "per_step"])
            args[key] = _mutate_value(rng, args.get(key))
        raw["args"] = args
    elif target == "drop":
        raw.pop(rng.choice(list(raw)), None)
    else:
        raw[rng.choice(["extra", "v2", "", "op\x00"])] = _mutate_value(rng, None)
    return raw


def _mutate_frames(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    frames = list(frames)
    roll = rng.randrange(7)
    if roll == 0 and len(frames) > 1:
        frames.pop(rng.randrange(1, len(frames)))
    elif roll == 1:
        frames.append(rng.choice(frames))
    elif roll == 2 and len(frames) > 1:
        i = rng.randrange(1, len(frames))
        frames[i] = frames[i][: rng.randrange(len(frames[i]) + 1)]
    elif roll == 3:
        i = rng.randrange(len(frames))
        frames[i] = frames[i] + bytes(rng.randrange(1, 64))
    elif roll == 4:
        i = rng.randrange(len(frames))
        data = bytearray(frames[i])
        for _ in range(rng.randrange(1, 8)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        frames[i] = bytes(data)
    elif roll == 5:
        frames = [rng.randbytes(rng.randrange(0, 200)) for _ in range(rng.randrange(1, 4))]
    else:  # a bomb: a small zstd frame of zeros declaring its large decompressed size
        import zstandard
        size = rng.choice([1 << 20, 64 << 20, 1 << 30])
        bomb = zstandard.ZstdCompressor().compress(bytes(min(size, 1 << 20)))
        head = msgpack.unpackb(frames[0])
        head["tensors"] = [["input_ids", "int64", [1, size // 8], "zstd", len(bomb), "token_ids"]]
        frames = [msgpack.packb(head), bomb]
    return frames


class Fuzzer:
    """Sends mutated and random messages from one DEALER, each awaited in turn."""

    def __init__(self, address: str, seeds: Seeds, seed: int, *, security: ClientSecurity | None = None,
                 authenticated: bool = True):
        self.rng = random.Random(seed)
        self.seeds = seeds
        self.authenticated = authenticated  # False: every header carries no token or a wrong one
        self.tally = Tally()
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        (security or ClientSecurity(seeds.token)).apply(self._socket)
        self._socket.connect(endpoint(address))
        self._ids = 0

    def message(self) -> list[bytes]:
        self._ids += 1
        head, tensors = self.seeds.request(self.rng, self._ids)
        if not self.authenticated:
            head["auth"] = self.rng.choice([None, "", "wrong", (self.seeds.token or "t")[:-1], 7])
        roll = self.rng.random()
        if roll < 0.05:
            return [self.rng.randbytes(self.rng.randrange(1, 300)) for _ in range(self.rng.randrange(1, 3))]
        try:
            frames = _frames(head, tensors)
        except TypeError:  # a mutation the encoder itself refuses; send the header bytes raw instead
            frames = [msgpack.packb(head)]
        if roll < 0.15:
            return frames  # some valid requests, so the fuzz reaches handlers' deeper states
        if roll < 0.75:
            raw = _mutate_header(self.rng, msgpack.unpackb(frames[0], strict_map_key=False))
            try:
                frames[0] = msgpack.packb(raw)
            except (TypeError, ValueError, OverflowError):
                pass
            return frames
        return _mutate_frames(self.rng, frames)

    def hold_fake_uploads(self) -> None:
        """Register the fake fingerprints (uploads in progress the fuzz would open anyway)."""
        for fingerprint in FAKE_FINGERPRINTS:
            state = self.seeds.state
            self.call("register_model", {"model": fingerprint, "config": dict(self.seeds.config), "dtype": "float32",
                                         "tensors": [[n, "float32", list(t.shape)] for n, t in state.items()]})

    def run(self, count: int, between=None) -> Tally:
        """Send `count` messages; `between(i)` runs after every message (the bystander's turn)."""
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        for i in range(count):
            self._socket.send_multipart(self.message())
            self.tally.sent += 1
            if not poller.poll(REPLY_TIMEOUT_S * 1000):
                self.tally.hangs += 1
            else:
                reply = self._socket.recv_multipart()
                self.tally.replies += 1
                head = msgpack.unpackb(reply[0])
                code = head["args"].get("code", "ok") if head["op"] == "error" else "ok"
                self.tally.codes[code] += 1
                if head["op"] == "reply" and "session" in head["args"]:
                    self._opened(head["args"]["session"])
            if between is not None:
                between(i)
        return self.tally

    def _opened(self, handle: str) -> None:
        """Keep the session to fuzz with; close one of the others past KEPT_SESSIONS, so the
        server's memory reflects what the fuzz leaks, not how many sessions it holds."""
        sessions = self.seeds.sessions
        sessions.append(handle)
        if len(sessions) > KEPT_SESSIONS:
            self.call("close_session", {"session": sessions.pop(self.rng.randrange(len(sessions)))})

    def call(self, op: str, args: dict, tensors: dict | None = None) -> dict:
        """A valid request outside the fuzz's count (its own housekeeping); the reply's header."""
        self._ids += 1
        self._socket.send_multipart(_frames({"op": op, "id": self._ids, "args": args, "auth": self.seeds.token},
                                            tensors or {}))
        if not self._socket.poll(REPLY_TIMEOUT_S * 1000):
            raise TimeoutError(f"no reply to the fuzzer's own '{op}'")
        return msgpack.unpackb(self._socket.recv_multipart()[0])

    def close(self) -> None:
        self._socket.close(linger=0)
        self._context.term()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no VmRSS for process {pid}")
