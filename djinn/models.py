"""The catalogue of model shapes Djinn ships, and how to build them.

Every shape is a HuggingFace config with the published hyperparameters; weights are
seeded random values (same bytes and FLOPs as trained ones), reproducible bit for
bit for a given (name, seed, dtype, device). Nothing is downloaded: a local
checkpoint directory is the only other source. `fingerprint` is the weight-cache
key the server uses.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

TINY_MODEL = "tiny-llama"
GPU_DEFAULT_MODEL = "llama-2-7b"
INIT_STD = 0.02  # the std HF uses for Llama/GPT-2 initialisation


@dataclass(frozen=True)
class ModelShape:
    name: str
    model_type: str
    hyperparameters: dict = field(default_factory=dict)

    def config(self, num_layers: int | None = None) -> PretrainedConfig:
        params = dict(self.hyperparameters)
        if num_layers is not None:
            params[_layer_key(self.model_type)] = num_layers
        return AutoConfig.for_model(self.model_type, **params)


def _llama(hidden, intermediate, layers, heads, kv_heads, max_pos=4096, **extra) -> dict:
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=32000,
                max_position_embeddings=max_pos, rms_norm_eps=1e-5, rope_theta=10000.0,
                tie_word_embeddings=False, **extra)


CATALOGUE: dict[str, ModelShape] = {
    # Small enough that every experiment finishes on a 2-core CPU in minutes, deep
    # enough (8 layers) for breakpoints in the middle, GQA like Llama-2-70B/Mistral.
    TINY_MODEL: ModelShape(TINY_MODEL, "llama", dict(
        hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=8192, max_position_embeddings=2048,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)),
    "gpt2": ModelShape("gpt2", "gpt2", dict(
        n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257)),
    "llama-2-7b": ModelShape("llama-2-7b", "llama", _llama(4096, 11008, 32, 32, 32)),
    "llama-2-13b": ModelShape("llama-2-13b", "llama", _llama(5120, 13824, 40, 40, 40)),
    "llama-2-70b": ModelShape("llama-2-70b", "llama", _llama(8192, 28672, 80, 64, 8)),
    "mistral-7b": ModelShape("mistral-7b", "mistral", _llama(
        4096, 14336, 32, 32, 8, max_pos=32768, sliding_window=4096)),
}


def _layer_key(model_type: str) -> str:
    return "n_layer" if model_type == "gpt2" else "num_hidden_layers"


def default_model_name(device: str | torch.device) -> str:
    return TINY_MODEL if torch.device(device).type == "cpu" else GPU_DEFAULT_MODEL


def default_dtype(device: str | torch.device) -> torch.dtype:
    return torch.float32 if torch.device(device).type == "cpu" else torch.float16


def build(name: str, seed: int = 0, dtype: torch.dtype | None = None,
          device: str | torch.device = "cpu", num_layers: int | None = None) -> torch.nn.Module:
    """A causal LM in eval mode: a catalogue shape with seeded weights, or a local checkpoint.

    Weights are created directly on `device` so a 13B shape builds in seconds on a GPU.
    """
    dtype = dtype or default_dtype(device)
    if name not in CATALOGUE:
        if os.path.isdir(name):
            return AutoModelForCausalLM.from_pretrained(
                name, dtype=dtype, local_files_only=True).to(device).eval()
        raise KeyError(f"unknown model {name!r}: not in the catalogue "
                       f"({', '.join(CATALOGUE)}) and not a local checkpoint directory")
    model = build_skeleton(CATALOGUE[name].config(num_layers), dtype, device)
    _seed_parameters(model, seed)
    return model


@torch.no_grad()
def _seed_parameters(model: torch.nn.Module, seed: int) -> None:
    # One generator per parameter, seeded by its position: the values depend only on
    # (seed, name order, shape, device), never on HF's init code, which changes across
    # releases. Norm scales start at 1 as in a trained model's neighbourhood.
    for index, (name, param) in enumerate(model.named_parameters()):
        if param.dim() == 1 and ("norm" in name or name.endswith("ln_f.weight") or ".ln_" in name):
            param.fill_(1.0)
        elif param.dim() == 1:
            param.zero_()
        else:
            gen = torch.Generator(device=param.device).manual_seed(seed * 1_000_003 + index)
            param.normal_(0.0, INIT_STD, generator=gen)


def to_host(model: torch.nn.Module) -> torch.nn.Module:
    """A CPU copy of a model built on a GPU: what a GPU-less client holds and uploads.

    Parameters are created empty (accelerate) and assigned the copied tensors, so a
    7B copy costs one device-to-host transfer, not a CPU initialisation.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        host = AutoModelForCausalLM.from_config(model.config, dtype=next(model.parameters()).dtype)
    host.load_state_dict({name: t.to("cpu") for name, t in model.state_dict().items()}, assign=True)
    return host.eval()


def parameter_bytes(name: str, dtype: torch.dtype = torch.float16, num_layers: int | None = None) -> int:
    """Weight bytes of a catalogue shape, computed without allocating it."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(CATALOGUE[name].config(num_layers), dtype=dtype)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """KV-cache bytes one token adds over all layers (keys and values)."""
    layers = config.num_hidden_layers
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * layers * heads * head_dim * dtype.itemsize


def max_positions(config: PretrainedConfig) -> int:
    """The model's context length, under the name its config family uses."""
    return getattr(config, "max_position_embeddings", None) or config.n_positions


def unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each tied tensor once, under its first name (GPT-2's lm_head is its wte).

    A forward with these weights (`torch.func.functional_call`, tie_weights) gives the
    tied names the same tensor; passing both names is an error there.
    """
    seen, unique = set(), {}
    for name, tensor in model.state_dict().items():
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            unique[name] = tensor
    return unique


def config_dict(model: torch.nn.Module) -> dict:
    # The JSON form is the one transformers itself writes to disk: plain types only.
    return json.loads(model.config.to_json_string(use_diff=False))


def tensor_digester(name: str, dtype: torch.dtype, shape: tuple[int, ...]):
    """The hash of one tensor's share of a fingerprint, before its bytes: fed them in
    order (all at once, or row slices as a server receives them), `digest()` is
    `tensor_digest`."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{name}|{dtype}|{tuple(shape)}|".encode())
    return h


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


def tensor_digest(name: str, tensor: torch.Tensor) -> bytes:
    """One tensor's share of a fingerprint; the server digests uploads as they arrive."""
    h = tensor_digester(name, tensor.dtype, tuple(tensor.shape))
    h.update(tensor_bytes(tensor))
    return h.digest()


def fingerprint(state: torch.nn.Module | dict[str, torch.Tensor]) -> str:
    """Content hash of a model's weights: the server's weight-cache key.

    Tensors are hashed in parallel (hashlib releases the GIL), so a 13 GB state dict
    takes about a second on a 16-core host.
    """
    tensors = state.state_dict() if isinstance(state, torch.nn.Module) else state
    names = sorted(tensors)
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(tensor_digest, names, (tensors[n] for n in names)))
    return combine_digests(dict(zip(names, digests)))


def combine_digests(digests: dict[str, bytes]) -> str:
    return hashlib.blake2b(b"".join(digests[n] for n in sorted(digests)), digest_size=16).hexdigest()


def config_from_dict(values: dict) -> PretrainedConfig:
    """The inverse of `config.to_dict()`, as shipped in a register request."""
    values = dict(values)
    model_type = values.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ValueError("model config has no model_type")
    return AutoConfig.for_model(model_type, **values)


def build_skeleton(config: PretrainedConfig, dtype: torch.dtype, device: str | torch.device,
                   weights_device: str | torch.device | None = None) -> torch.nn.Module:
    """A model of the config's shape on `device`, its weights uninitialised on `weights_device`
    (default: `device`) for the caller to fill.

    Every caller overwrites every weight (an upload, a seeded build, a stateless forward's shipped
    weights), so HF's initialisation is skipped: it wrote each weight once more, and on the server,
    whose loop it held, that stalled every decoding session (registering a gpt2 shape on the 2-core
    CPU: a decode step of 944 ms beside it). Buffers (rotary frequencies) are computed on `device`
    as HF computes them: inv_freq computed on the CPU differs from the GPU's in the last bits
    (3.7e-9, measured on the H100), and so would the logits."""
    from accelerate import init_empty_weights

    with torch.device(device), init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    target = torch.device(device if weights_device is None else weights_device)
    if target.type != "meta":
        materialised: dict[int, torch.nn.Parameter] = {}  # one tensor for a parameter two modules share
        for module in model.modules():
            for name, param in module._parameters.items():
                if param is not None and param.is_meta:
                    if id(param) not in materialised:
                        materialised[id(param)] = torch.nn.Parameter(
                            torch.empty(param.shape, dtype=param.dtype, device=target),
                            requires_grad=param.requires_grad)
                    module._parameters[name] = materialised[id(param)]
    model.tie_weights()  # accelerate's empty parameters untied them
    return model.eval()
