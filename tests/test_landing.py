"""Which frames the server lands in pinned memory: activations a parked step waits for,
and only on a CUDA device. (The landing mechanism itself: test_transport.py.)

In-process; on a CPU-only torch, asking for pinned memory raises, which is the answer
to "did it try to land this".
"""
from __future__ import annotations

import pytest
import torch

from djinn import models
from djinn.client import config_dict
from djinn.server.device_budget import DeviceBudget
from djinn.server.executor import Executor
from djinn.server.server import Server, ServerConfig
from djinn.server.session_store import SessionStore
from djinn.server.weight_cache import TensorEntry, WeightCache
from djinn.transport import Codec, TensorKind, TensorSpec
from djinn.transport.wire import DTYPE_NAMES

CPU = torch.device("cpu")
PARKED_LAYER = 2


@pytest.fixture
def parked(tiny_model, make_prompt):
    """An executor holding one session parked after PARKED_LAYER, and that session."""
    state = tiny_model.state_dict()
    fingerprint = models.fingerprint(state)
    budget = 1 << 34
    device_budget = DeviceBudget(CPU, budget)
    sessions = SessionStore(600.0, "test", device_budget, swap=False, host_limit_bytes=0)
    weights = WeightCache(device_budget)
    weights.register(fingerprint, config_dict(tiny_model), torch.float32,
                     [TensorEntry(n, t.dtype, tuple(t.shape)) for n, t in state.items()])
    executor = Executor(device_budget, weights, sessions)
    session = sessions.open(weights.receive(fingerprint, state), b"peer")
    executor.run_to_layer(session, make_prompt(tiny_model, 8), PARKED_LAYER)
    return executor, session


def lands(executor: Executor, spec: TensorSpec) -> bool:
    try:
        target = executor.landing(spec)
    except RuntimeError as exc:  # no pinned allocator without CUDA: the attempt is the answer
        assert "pin_memory" in str(exc)
        return True
    assert target is None or (target.is_pinned() and target.nbytes == spec.nbytes)
    return target is not None


def spec_like(tensor: torch.Tensor, kind: TensorKind = TensorKind.ACTIVATION, nbytes: int | None = None) -> TensorSpec:
    return TensorSpec("activation", DTYPE_NAMES[tensor.dtype], tuple(tensor.shape), Codec.RAW,
                      tensor.nbytes if nbytes is None else nbytes, kind)


def test_only_an_activation_a_parked_step_waits_for_lands(parked):
    executor, session = parked
    activation = session.breakpoint.forward.activation
    assert lands(executor, spec_like(activation))
    assert not lands(executor, spec_like(activation, TensorKind.OTHER))
    assert not lands(executor, spec_like(activation, nbytes=activation.nbytes * 2))  # a header alone pins nothing
    executor.cancel(session)
    assert not lands(executor, spec_like(activation))


def test_a_cpu_server_lands_nothing():
    server = Server(ServerConfig(port=0))
    try:
        assert [sock.landing for sock in server.sockets] == [None]
    finally:
        for sock in server.sockets:
            sock.close()
