"""What experiment 3 runs on this machine: model, breakpoint layers, prompt lengths, sessions, budget.

The `--exp3-*` options (benchmarks/conftest.py) override each default. On a GPU the
defaults are seed 004's: the llama-2-13b shape, breakpoints [1, 10, 20, 30, 40] of its
40 layers (0-based: [1, 10, 20, 30, 39]), prompts up to 2048 tokens, sessions of ~1.3 GB
of KV each; as many sessions as make the demand (weights + every session's KV) 1.2x the
device's memory, whatever the card (the seed's 50 fit a 141 GB H200 without paging), and
the server's own default budget (what the device has free). On a CPU: the tiny model and
sizes that finish in seconds, with a budget small enough that paging really happens.
"""
from __future__ import annotations

import math

import torch
from transformers import AutoConfig

from djinn import models

GPU_MODEL = "llama-2-13b"
SEED_DEPTH_FRACTIONS = (1 / 40, 10 / 40, 20 / 40, 30 / 40, 40 / 40)  # the seed's layers [1, 10, 20, 30, 40] of 40
GPU_SEQ_LENS, CPU_SEQ_LENS = (512, 2048), (64, 256)
GPU_ROUNDS, CPU_ROUNDS = 9, 3  # a shallow point restores in ~0.5 ms; with 5 rounds its ratio moved by +-10% run to run
# How long each parked session sits idle before its timed restore, the same in every baseline:
# the user reads and steers the activation. A GPU's first copy call after an idle spell takes
# longer the longer the spell, whether the CPU sleeps or spins (H100: 0.02 ms with none, 0.03
# after 1 ms, 0.08 after 20, 0.15 after 50: results/exp3/idle_first_copy_h100.jsonl). djinn's
# server always idles a round trip before a resume; a manual restore right after its own sync
# would compare the GPU's idle state, not the restores.
IDLE_AT_BREAKPOINT_MS = 20.0
CPU_SESSIONS = 6
GPU_SESSION_KV_BYTES = 1.3e9  # the seed: 50 x 1.3 GB of KV beside 26 GB of weights, on an 80 GB H100
# Demand over the device's memory that the oversubscription run sizes itself to (issue 12:
# >= 1.2x; at 1.0x a run could pass without the device ever being full).
DEFAULT_DEMAND_FACTOR = 1.2
CPU_CONTEXT_TOKENS = 96
CPU_RESIDENT_KV_FRACTION = 0.4  # on a CPU the budget holds the weights and 40% of the sessions' KV


def device(config) -> str:
    choice = config.getoption("--djinn-device")
    return ("cuda:0" if torch.cuda.is_available() else "cpu") if choice == "auto" else choice


def on_cpu(config) -> bool:
    return device(config) == "cpu"


def model_name(config) -> str:
    name = config.getoption("--exp3-model")
    if name == "auto":
        return models.TINY_MODEL if on_cpu(config) else GPU_MODEL
    return name


def model_config(name: str):
    if name in models.CATALOGUE:
        return models.CATALOGUE[name].config()
    return AutoConfig.from_pretrained(name, local_files_only=True)


def spread_layers(num_layers: int) -> list[int]:
    """The seed's breakpoints as 0-based layer indices for any depth: [1, 10, 20, 30, 39] for 40 layers."""
    return sorted({min(num_layers - 1, max(0, round(f * num_layers))) for f in SEED_DEPTH_FRACTIONS})


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def layers(config) -> list[int]:
    if config.getoption("--exp3-layers"):
        return _int_list(config.getoption("--exp3-layers"))
    return spread_layers(model_config(model_name(config)).num_hidden_layers)


def seq_lens(config) -> list[int]:
    if config.getoption("--exp3-seq-lens"):
        return _int_list(config.getoption("--exp3-seq-lens"))
    return list(CPU_SEQ_LENS if on_cpu(config) else GPU_SEQ_LENS)


def rounds(config) -> int:
    return config.getoption("--exp3-rounds") or (CPU_ROUNDS if on_cpu(config) else GPU_ROUNDS)


def idle_s(config) -> float:
    idle_ms = config.getoption("--exp3-idle-ms")
    return (IDLE_AT_BREAKPOINT_MS if idle_ms is None else idle_ms) / 1e3


def demand_factor(config) -> float:
    return config.getoption("--exp3-demand-factor") or DEFAULT_DEMAND_FACTOR


def device_capacity_bytes(config) -> int | None:
    """The device's memory (None on a CPU, which has no device to fill)."""
    if on_cpu(config):
        return None
    _free, total = torch.cuda.mem_get_info(torch.device(device(config)))
    return total


def sessions(config, weight_bytes: int, session_kv_bytes: int) -> int:
    """Sessions of the oversubscription run: given, or on a GPU as many as make the demand
    `demand_factor` x the device's memory."""
    if config.getoption("--exp3-sessions"):
        return config.getoption("--exp3-sessions")
    if on_cpu(config):
        return CPU_SESSIONS
    target = demand_factor(config) * device_capacity_bytes(config)
    return max(1, math.ceil((target - weight_bytes) / session_kv_bytes))


def context_tokens(config, model_config_, dtype: torch.dtype) -> int:
    if config.getoption("--exp3-context-tokens"):
        return config.getoption("--exp3-context-tokens")
    if on_cpu(config):
        return CPU_CONTEXT_TOKENS
    return round(GPU_SESSION_KV_BYTES / models.kv_bytes_per_token(model_config_, dtype))


def budget_bytes(config, weight_bytes: int, total_kv_bytes: int) -> int | None:
    """The oversubscription server's --vram-budget-gb in bytes; None on a GPU: the server's own default
    (what the device has free when it starts), so the run tests the budget a user gets."""
    if config.getoption("--exp3-budget-gb"):
        return int(config.getoption("--exp3-budget-gb") * (1 << 30))
    if on_cpu(config):
        return weight_bytes + int(CPU_RESIDENT_KV_FRACTION * total_kv_bytes)
    return None
