"""The fast decode path: a compact forward for Llama and Mistral over a static KV cache.

HF eager decoding of a 7B model is bound by kernel launches (22 ms/token on an H200 for
2.8 ms of weight reads). This is gpt-fast's recipe (pytorch-labs/gpt-fast, model.py and
generate.py): a static KV cache at fixed addresses, the query, key and value projections
fused into one GEMM and the gate and up projections into another, RoPE tables computed once,
RMSNorm, SDPA over the static length under a mask, and the whole decode step recorded as
one CUDA graph (`torch.compile(mode="reduce-overhead", fullgraph=True)`; a hand-captured
`torch.cuda.CUDAGraph` when compiling fails; HF eager when capturing fails too). HF's model
stays the reference and the exact path (`--exact`, a load's `decode="exact"`).

Memory: the fused weights are the model's own. Each layer's q/k/v (and gate/up) weights are
copied once into one tensor and HF's projections then hold row slices of it, so the fast
path adds no weight bytes and HF's modules keep working (bit for bit: the same values in
the same contiguous layout) for the exact path, breakpoints and the fallbacks. Keeping
separate fused copies beside HF's would double a 7B model's 13.5 GB; dropping HF's modules
would leave breakpoints, sessions moved off the fast path and `--exact` without a model.
What the path does add, the slots' static caches and the RoPE tables, is one holder of the
device budget.

A slot (one per model and batch size, lent to one session at a time) holds a session's KV.
A session moves off it cleanly: paged out (its layers leave for host memory from the slot),
parked at a breakpoint, past the slot's length or a failed capture (its KV is copied into
ordinary pairs and the slot goes back); a rolled-back step only shortens the slot's length.
A session decoding eagerly takes a free slot again at its next one-token step.

On a CPU the same forward runs eagerly (no graphs, no compile): tested against HF there.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from djinn import kv

log = logging.getLogger("djinn.server.fast_decode")

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
# RoPE variants whose frequencies are fixed when the model is built (HF's `rotary_emb.inv_freq`
# and `attention_scaling`); the dynamic ones recompute them from the sequence length.
STATIC_ROPE_TYPES = ("default", "linear", "llama3")


# The paths a step can take, as the stats name them.
COMPILED, CAPTURED, FAST_EAGER, HF_EAGER = "fast_compiled", "fast_cuda_graph", "fast_eager", "hf_eager"


def unsupported_reason(model: nn.Module) -> str | None:
    """Why `model` has no compact forward here; None when it has one."""
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"{config.model_type} has no compact forward (only {', '.join(SUPPORTED_MODEL_TYPES)})"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "projections with biases"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act}"
    rope = getattr(model.model.rotary_emb, "rope_type", "default")
    if rope not in STATIC_ROPE_TYPES:
        return f"RoPE type {rope}"
    return None


def _fuse(linears: list[nn.Linear]) -> nn.Parameter:
    """One weight with the rows of `linears` in order; each linear then holds its rows of it."""
    weights = [linear.weight for linear in linears]
    fused = nn.Parameter(torch.cat([w.data for w in weights]), requires_grad=weights[0].requires_grad)
    start = 0
    for linear, weight in zip(linears, weights):
        rows = weight.shape[0]
        # requires_grad as before: CPU kernels take another path for weights that do not require it.
        linear.weight = nn.Parameter(fused.data[start:start + rows], requires_grad=weight.requires_grad)
        start += rows
    return fused


def _fuse_bytes(model: nn.Module) -> int:
    """The transient copy fusing needs: one layer's gate and up weights, the largest fused tensor
    (freed layer by layer as HF's projections move onto it: 0.9 GB for the 70B shape)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers:
        return 0
    mlp = getattr(layers[0], "mlp", None)
    return sum(getattr(mlp, name).weight.nbytes for name in ("gate_proj", "up_proj") if hasattr(mlp, name))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As HF's LlamaRMSNorm: the statistics in fp32, the weight applied in the model's dtype.
    normed = x.float()
    normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class FastLayer(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.wqkv = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        self.wo = attn.o_proj.weight
        self.w13 = _fuse([mlp.gate_proj, mlp.up_proj])
        self.w2 = mlp.down_proj.weight
        self.input_norm = layer.input_layernorm.weight
        self.post_norm = layer.post_attention_layernorm.weight


class FastModel(nn.Module):
    """The compact forward over an HF Llama/Mistral model's own weights (fused in place)."""

    def __init__(self, model: nn.Module, max_len: int):
        super().__init__()
        config = model.config
        inner = model.model
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = inner.layers[0].self_attn.q_proj.weight.shape[0] // self.heads
        self.eps = config.rms_norm_eps
        self.vocab_size = inner.embed_tokens.num_embeddings
        self.layers = nn.ModuleList(FastLayer(layer) for layer in inner.layers)
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm.weight
        self.lm_head = model.lm_head.weight
        dtype, device = self.embed.dtype, self.embed.device
        # RoPE as HF computes it per step (positions x inv_freq in fp32, cos/sin, scaled, cast),
        # once for every position a slot can hold.
        rotary = inner.rotary_emb
        freqs = torch.arange(max_len, device=device, dtype=torch.float32)[:, None] * rotary.inv_freq.float()[None]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", (emb.cos() * rotary.attention_scaling).to(dtype), persistent=False)
        self.register_buffer("sin", (emb.sin() * rotary.attention_scaling).to(dtype), persistent=False)
        self.max_len = max_len

    @property
    def table_bytes(self) -> int:
        return self.cos.nbytes + self.sin.nbytes

    def kv_shape(self, batch: int) -> tuple[int, int, int, int]:
        return batch, self.kv_heads, self.max_len, self.head_dim

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, caches: list[torch.Tensor]) -> torch.Tensor:
        """Logits of the last position [batch, vocab] for `ids` [batch, T] at `positions` [T]
        (device tensors), writing their keys and values into `caches` (k, v per layer)."""
        batch, tokens = ids.shape
        x = F.embedding(ids, self.embed)
        cos, sin = self.cos[positions], self.sin[positions]  # [T, head_dim]
        # Query t attends to every slot up to its own position: the static length under a mask.
        mask = torch.arange(self.max_len, device=ids.device)[None, :] <= positions[:, None]
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for index, layer in enumerate(self.layers):
            k_cache, v_cache = caches[2 * index], caches[2 * index + 1]
            h = _rms_norm(x, layer.input_norm, self.eps)
            q, k, v = F.linear(h, layer.wqkv).split([q_size, kv_size, kv_size], dim=-1)
            q = q.view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)
            k = k.view(batch, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(batch, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            k_cache.index_copy_(2, positions, k)
            v_cache.index_copy_(2, positions, v)
            attn = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask,
                                                  enable_gqa=self.kv_heads != self.heads)
            x = x + F.linear(attn.transpose(1, 2).reshape(batch, tokens, q_size), layer.wo)
            gate, up = F.linear(_rms_norm(x, layer.post_norm, self.eps), layer.w13).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.w2)
        return F.linear(_rms_norm(x[:, -1], self.norm, self.eps), self.lm_head)


def _decode_step(model: FastModel, caches: list[torch.Tensor], ids: torch.Tensor, position: torch.Tensor):
    return model(ids, position, caches)


_compiled_step = None  # one compiled step for every slot: dynamo keys it by model and shapes


def _compiled():
    global _compiled_step
    if _compiled_step is None:
        _compiled_step = torch.compile(_decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)
    return _compiled_step


class SlotFailed(Exception):  # not a RuntimeError: the executor maps those to BadRequest
    """Neither a compiled nor a captured graph could run this slot's step: decode with HF."""


class FastSlot:
    """One batch of sequences on the fast path: its static caches and its decode step."""

    def __init__(self, fast: "FastDecode", batch: int):
        self.fast = fast
        self.model = fast.model
        self.batch = batch
        device = self.model.embed.device
        shape = self.model.kv_shape(batch)
        self.caches = [torch.zeros(shape, dtype=self.model.embed.dtype, device=device)
                       for _ in range(2 * len(self.model.layers))]
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.length = 0
        self.on_cuda = device.type == "cuda"
        self.path = fast.graph_path if self.on_cuda else FAST_EAGER
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_out: torch.Tensor | None = None
        if self.path == COMPILED:
            # Every tensor the graph reads is a static input read in place at a fixed address;
            # unmarked, cudagraph trees would copy them into their pool on every replay.
            for tensor in (*self.caches, self.ids, self.position):
                torch._dynamo.mark_static_address(tensor)

    @property
    def max_len(self) -> int:
        return self.model.max_len

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches)

    @torch.no_grad()
    def extend(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed `ids` [batch, T] after the slot's tokens (a prompt, or several tokens): eagerly."""
        if self.length + ids.shape[1] > self.max_len:
            raise ValueError(f"{self.length} + {ids.shape[1]} tokens do not fit a slot of {self.max_len}")
        positions = torch.arange(self.length, self.length + ids.shape[1], device=ids.device)
        logits = self.model(ids, positions, self.caches)
        self.length += ids.shape[1]
        return logits

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """One token [batch, 1] through the graph (on a CPU, eagerly); the logits [batch, vocab]."""
        if not self.on_cuda:
            return self.extend(token)
        self.ids.copy_(token)
        self.position.fill_(self.length)
        logits = self._replay()
        self.length += 1
        return logits

    def _replay(self) -> torch.Tensor:
        # A failed first replay wrote at most this position's keys and values, which the
        # next path writes again: each fallback re-runs the same step.
        if self.path == COMPILED:
            try:
                torch.compiler.cudagraph_mark_step_begin()
                # The graph's output buffer is overwritten by the next replay: hand out a copy.
                return _compiled()(self.model, self.caches, self.ids, self.position).clone()
            except torch.OutOfMemoryError:  # the session store's to retry, not a failed compile
                raise
            except Exception as exc:  # compile errors come in many types; the capture is the fallback
                log.warning("compiling the fast decode step failed, capturing a CUDA graph by hand: %s",
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                self.fast.graph_path = self.path = CAPTURED
                self.fast.failures[f"compile: {type(exc).__name__}"] += 1
        if self._graph is None:
            try:
                self._capture()
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:
                self.fast.graph_path = HF_EAGER
                self.fast.failures[f"capture: {type(exc).__name__}"] += 1
                raise SlotFailed(f"capturing the fast decode step failed: {exc}") from exc
        self._graph.replay()
        return self._graph_out.clone()

    def _capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture (cuBLAS handles, workspaces)
            for _ in range(2):
                _decode_step(self.model, self.caches, self.ids, self.position)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._graph_out = _decode_step(self.model, self.caches, self.ids, self.position)
        self._graph = graph

    def pairs(self) -> kv.KVPairs:
        """The slot's tokens as ordinary KV pairs: views of the static caches."""
        return [(self.caches[2 * i][:, :, :self.length], self.caches[2 * i + 1][:, :, :self.length])
                for i in range(len(self.model.layers))]

    @torch.no_grad()
    def load(self, pairs: kv.KVPairs) -> None:
        """Take over a session's ordinary KV pairs (all resident)."""
        length = pairs[0][0].shape[-2]
        for i, (k, v) in enumerate(pairs):
            self.caches[2 * i][:, :, :length].copy_(k)
            self.caches[2 * i + 1][:, :, :length].copy_(v)
        self.length = length


@dataclass
class FastDecode:
    """A cached model's fast path: its compact forward (or why it has none) and its slots."""
    model: FastModel | None
    reason: str | None  # why the model decodes with HF; None when it has a fast path
    graph_path: str = COMPILED  # the CUDA path its slots take; demoted by a failure
    slots: dict[int, FastSlot] = field(default_factory=dict)  # by batch size
    lent: set[int] = field(default_factory=set)  # id() of the slots a session holds
    failures: Counter = field(default_factory=Counter)

    @property
    def nbytes(self) -> int:
        tables = self.model.table_bytes if self.model is not None else 0
        return tables + sum(slot.nbytes for slot in self.slots.values())


class FastPath:
    """The server's fast decode path: which session takes it, the slots, what each step took.

    `default_on`: whether a load's `auto` means fast (on CUDA, unless `--exact`); a load's
    `fast` takes it on any device (a CPU runs the same forward eagerly), `exact` never does."""

    def __init__(self, budget, weights, max_len: int, default_on: bool):
        self.budget = budget  # djinn.server.device_budget.DeviceBudget: a new slot needs room in it
        self.weights = weights  # djinn.server.weight_cache.WeightCache: each model's FastDecode lives on it
        self.max_len = max_len
        self.default_on = default_on
        self.steps: Counter = Counter()  # session steps by path
        self.fallbacks: Counter = Counter()  # sessions that started on HF eager, by reason
        budget.hold("fast_decode", self.held_bytes)

    def held_bytes(self) -> int:
        return sum(m.fast.nbytes for m in self.weights.models.values() if m.fast is not None)

    def wanted(self, decode: str) -> bool:
        return decode == "fast" or (decode == "auto" and self.default_on)

    def of(self, cached) -> FastDecode:
        """The model's fast path, built (and its weights fused) at its first use."""
        if cached.fast is None:
            reason = "streamed through the ring buffer" if cached.streamed else unsupported_reason(cached.model)
            model = None
            if reason is None:
                limit = getattr(cached.config, "sliding_window", None) or cached.max_positions
                # A Mistral window longer than the slot never slides: the mask is causal.
                model = FastModel(cached.model, min(self.max_len, limit, cached.max_positions))
            cached.fast = FastDecode(model, reason)
        return cached.fast

    def acquire(self, cached, batch: int, tokens: int) -> tuple[FastSlot | None, str | None]:
        """A slot for a session about to hold `tokens` tokens, or None and why not."""
        if cached.fast is None and not cached.streamed and self.budget.shortfall(_fuse_bytes(cached.model)):
            return None, "no room in the device budget to fuse its weights"
        fast = self.of(cached)
        if fast.reason is not None:
            return None, fast.reason
        if fast.graph_path == HF_EAGER and self.budget.device.type == "cuda":
            return None, "the step's CUDA graph could not be captured"
        if tokens > fast.model.max_len:
            return None, f"longer than a slot ({fast.model.max_len} tokens)"
        slot = fast.slots.get(batch)
        if slot is None:
            nbytes = 2 * len(fast.model.layers) * torch.Size(fast.model.kv_shape(batch)).numel() * \
                fast.model.embed.element_size()
            if self.budget.shortfall(nbytes):
                return None, "no room for a slot in the device budget"
            slot = fast.slots[batch] = FastSlot(fast, batch)
        if id(slot) in fast.lent:
            return None, "its slot is busy"
        fast.lent.add(id(slot))
        return slot, None

    def release(self, slot: FastSlot) -> None:
        slot.fast.lent.discard(id(slot))

    def drop(self, slot: FastSlot) -> int:
        """Release the slot and free its caches (views of them held elsewhere keep their own layers)."""
        self.release(slot)
        fast = slot.fast
        if fast.slots.get(slot.batch) is slot:
            del fast.slots[slot.batch]
        return slot.nbytes

    def drop_idle(self) -> int:
        """Free every slot no session holds (under memory pressure); the bytes."""
        freed = 0
        for cached in self.weights.models.values():
            if cached.fast is not None:
                for slot in [s for s in cached.fast.slots.values() if id(s) not in cached.fast.lent]:
                    freed += self.drop(slot)
        return freed

    def summary(self) -> dict:
        failures = Counter()
        for cached in self.weights.models.values():
            if cached.fast is not None:
                failures.update(cached.fast.failures)
        return {"default": "fast" if self.default_on else "exact", "max_len": self.max_len,
                "steps": dict(self.steps), "fallbacks": dict(self.fallbacks), "graph_failures": dict(failures),
                "held_bytes": self.held_bytes()}
