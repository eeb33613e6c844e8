"""The server's caps on what clients can make it hold, and the checks of a client's model config.

Each cap bounds a resource that no memory budget sees (threads, Python objects, the
work of one request) or that must be refused before it is allocated. A request past a
cap fails with `LimitExceeded` naming the cap and its setting; nothing is evicted or
half-done to make room. Defaults are sized from the machine (`djinn.host_memory`, the
process limit) where the resource is memory or threads, and from the largest published
architectures where it is a shape.
"""
from __future__ import annotations

import json
import resource
from dataclasses import dataclass

import torch

from djinn import models
from djinn.errors import BadRequest, LimitExceeded, quote
from djinn.transport.wire import Limits

# Llama-3-405B has 126 decoder layers, the catalogue's largest 80. Checking a register
# builds its skeleton on the meta device, ~2.5-8 ms a layer on the shared 2-core CI host,
# inside the request loop: 160 layers (~0.4-1.3 s) covers every published model and
# refuses the 20,000-layer config that had kept the loop busy for 53 s.
MAX_LAYERS = 160
# A HuggingFace config as JSON is 1-3 KB; 64 KiB admits any real one.
MAX_CONFIG_BYTES = 64 << 10
# Each parked forward holds a worker thread and that thread's OpenMP pool (2 threads on
# the 2-core CI host): 147 parked exhausted a 300-process limit. A quarter of the limit
# leaves the rest to libzmq, torch and the loop.
PARKED_SHARE_OF_NPROC = 4
MAX_PARKED = 256
# One message must fit beside what the server already holds: at most this share of the
# host memory available at start (cgroup included), within the static wire limits.
MESSAGE_SHARE_OF_HOST = 0.5


def default_max_parked() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NPROC)
    if soft == resource.RLIM_INFINITY:
        return MAX_PARKED
    return max(1, min(MAX_PARKED, soft // PARKED_SHARE_OF_NPROC))


def host_limits(available_bytes: int, base: Limits = Limits()) -> Limits:
    """The wire limits of a server with `available_bytes` of host memory: a zstd bomb or a
    huge declared tensor is refused by its header instead of allocated."""
    message = min(base.max_message_bytes, int(available_bytes * MESSAGE_SHARE_OF_HOST))
    return Limits(max_header_bytes=base.max_header_bytes, max_tensor_bytes=min(base.max_tensor_bytes, message),
                  max_message_bytes=message, max_tensors=base.max_tensors, max_dims=base.max_dims)


@dataclass(frozen=True)
class ServerLimits:
    max_sessions: int = 4096  # open sessions in all; 50,001 of one client slowed a bystander 8x
    max_sessions_per_peer: int = 1024  # of one connection (ROUTER peer)
    max_parked: int | None = None  # forwards parked at a breakpoint (None: default_max_parked())
    max_uploads: int = 8  # registered models whose upload is still in progress
    upload_ttl_s: float = 300.0  # an upload that sends nothing for this long is abandoned and freed
    max_layers: int = MAX_LAYERS
    max_config_bytes: int = MAX_CONFIG_BYTES
    skeletons: int = 2  # architectures the stateless forward keeps built for shipped weights (LRU)
    queued_replies_per_peer: int = 16  # replies a client has not read yet; a synchronous client has one

    @property
    def parked(self) -> int:
        return default_max_parked() if self.max_parked is None else self.max_parked


def checked_config(values: object, limits: ServerLimits, what: str):
    """A client's model config as a HuggingFace config, refused when malformed or over the caps.

    The layer count is read from the dict before transformers builds anything."""
    if not isinstance(values, dict):
        raise BadRequest(f"{what}: 'config' must be a map, got {type(values).__name__}")
    try:
        size = len(json.dumps(values, default=str))
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"{what}: config is not plain data: {quote(str(exc))}") from None
    if size > limits.max_config_bytes:
        raise LimitExceeded(f"{what}: config of {size} bytes is over the {limits.max_config_bytes}-byte cap")
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        layers = values.get(key)
        if isinstance(layers, int) and not isinstance(layers, bool) and layers > limits.max_layers:
            raise LimitExceeded(f"{what}: {layers} layers are over the cap of {limits.max_layers}")
    try:
        config = models.config_from_dict(values)
        layers = config.num_hidden_layers
    except Exception as exc:  # transformers raises many types on a bad config
        raise BadRequest(f"{what}: config is not a HuggingFace config: {quote(str(exc), 200)}") from None
    if not isinstance(layers, int) or not 0 < layers <= limits.max_layers:
        raise LimitExceeded(f"{what}: {quote(layers)} layers, the cap is 1 to {limits.max_layers}")
    return config


def implied_tensors(config, dtype: torch.dtype, what: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Every tensor (name -> dtype, shape) a model of this config holds, from a skeleton on
    the meta device: no memory, and the same state_dict names the client's model has."""
    try:
        with torch.device("meta"):
            skeleton = models.build_skeleton(config, dtype, "meta")
    except Exception as exc:
        raise BadRequest(f"{what}: no model can be built from this config: {quote(str(exc), 200)}") from None
    return {name: (t.dtype, tuple(t.shape)) for name, t in skeleton.state_dict().items()}
