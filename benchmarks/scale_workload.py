"""The multitenant workload of the scale experiment: client processes decoding full_djinn sessions
on a pool of servers, in rounds that start together.

Each client is a process of its own (a tenant: its own connection, its own Python), attaches to
a model every server loaded (`djinn-server --model NAME`: no weights cross the wire), opens one
session through the pool (`djinn.connect(addresses)`: least-loaded placement, then sticky),
prefills its own seeded prompt and then, in every round, decodes `new_tokens` tokens one
request each. A round starts for every client at once (a barrier) and ends when the last one
finishes; its aggregate tokens/s is all the clients' tokens over that wall time. Sessions are
opened one at a time (a lock), as tenants arriving one after another: the placement sees each
open session before it places the next. Nothing here is specific to a pool: a one-address
target is one server, so another experiment can drive its own servers with it.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import queue
import time
import traceback
from dataclasses import dataclass
from typing import Sequence

import numpy as np

# Long enough for a 7B shape's clients to import torch, attach and prefill on a busy host.
START_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Workload:
    target: tuple[str, ...]  # the pool's addresses (one: a single server)
    model: str  # a name every server loaded
    clients: int
    prompt_tokens: int
    new_tokens: int  # per client and round
    rounds: int  # measured
    warmup_rounds: int
    client_threads: int  # torch intra-op threads of each client process
    round_timeout_s: float = 300.0


@dataclass(frozen=True)
class ClientRun:
    client: int
    server: str  # where its session was placed
    rounds: tuple[tuple[float, float], ...]  # (start, end) of each measured round, time.monotonic()
    step_ms: tuple[float, ...]  # every measured decode step
    token_digest: str  # of every token it decoded, warm-up rounds included


@dataclass(frozen=True)
class WorkloadRun:
    clients: tuple[ClientRun, ...]
    new_tokens: int

    def tokens_per_s(self) -> tuple[float, ...]:
        """Each measured round's aggregate: every client's tokens over the round's wall time."""
        return round_rates([c.rounds for c in self.clients], self.new_tokens)

    def p99_token_ms(self) -> float:
        return float(np.percentile([ms for c in self.clients for ms in c.step_ms], 99))

    def sessions_per_server(self, servers: Sequence[str]) -> tuple[int, ...]:
        return tuple(sum(1 for c in self.clients if c.server == s) for s in servers)


def round_rates(per_client_rounds: Sequence[Sequence[tuple[float, float]]], new_tokens: int) -> tuple[float, ...]:
    """Round r's tokens/s: clients x new_tokens over (last end - first start) of round r."""
    if not per_client_rounds:
        raise ValueError("no client ran")
    rates = []
    for spans in zip(*per_client_rounds):
        wall = max(end for _, end in spans) - min(start for start, _ in spans)
        rates.append(len(spans) * new_tokens / wall)
    return tuple(rates)


def _prompt(vocab: int, tokens: int, client: int):
    import torch
    return torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(1000 + client))


def _client(index: int, workload: Workload, opening, barrier, results) -> None:
    """One tenant, in its own process: its result (or its traceback) goes on `results`."""
    try:
        import torch

        import djinn
        torch.set_num_threads(workload.client_threads)
        timeout = workload.round_timeout_s
        with djinn.connect(list(workload.target)) as client:
            remote = client.load(workload.model, mode="full_djinn")
            with opening:  # one open at a time: each placement sees the sessions before it
                session = remote.session()
            server = client.connection.session_address(session.handle)  # a list of one is a pool too
            vocab = remote.model.config.vocab_size
            session.prefill(_prompt(vocab, workload.prompt_tokens, index))
            tokens = [session.generate(1)]  # the prefill's token: no request
            barrier.wait(timeout)
            spans, steps = [], []
            for round_index in range(workload.warmup_rounds + workload.rounds):
                barrier.wait(timeout)
                start = time.monotonic()
                step_ms = []
                for _ in range(workload.new_tokens):
                    before = time.perf_counter()
                    tokens.append(session.generate(1))  # one decode request, the token back
                    step_ms.append((time.perf_counter() - before) * 1e3)
                end = time.monotonic()
                if round_index >= workload.warmup_rounds:
                    spans.append((start, end))
                    steps.extend(step_ms)
            session.close()
        digest = hashlib.blake2b(torch.cat(tokens, dim=1).numpy().tobytes(), digest_size=8).hexdigest()
        results.put(("ok", index, ClientRun(index, server, tuple(spans), tuple(steps), digest)))
    except BaseException:
        barrier.abort()  # the others fail at the next barrier instead of waiting out its timeout
        results.put(("error", index, traceback.format_exc()))


def run_workload(workload: Workload) -> WorkloadRun:
    """Every client's run; a client that fails fails the whole workload with its traceback."""
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds torch's threads
    opening, barrier, results = ctx.Lock(), ctx.Barrier(workload.clients), ctx.Queue()
    processes = [ctx.Process(target=_client, args=(i, workload, opening, barrier, results), daemon=True,
                             name=f"djinn-scale-client-{i}") for i in range(workload.clients)]
    for process in processes:
        process.start()
    allowed_s = START_TIMEOUT_S + (workload.rounds + workload.warmup_rounds) * workload.round_timeout_s
    deadline = time.monotonic() + allowed_s
    runs, errors = {}, {}
    try:
        while len(runs) + len(errors) < workload.clients:
            try:
                status, index, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"{workload.clients - len(runs) - len(errors)} scale clients had not finished "
                                   f"within {allowed_s:.0f} s") from None
            (runs if status == "ok" else errors)[index] = value
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    if errors:
        first = min(errors)
        raise RuntimeError(f"{len(errors)} of {workload.clients} scale clients failed; client {first}:\n"
                           f"{errors[first]}")
    return WorkloadRun(tuple(runs[i] for i in range(workload.clients)), workload.new_tokens)


def pool_sizes(requested: str, gpus: int) -> tuple[int, ...]:
    """The pool sizes to run: `auto` is 1, 2, 4 servers up to the GPUs (1, 2 on a CPU host),
    else a comma list, refused past the GPUs (one GPU per server)."""
    if requested == "auto":
        return tuple(n for n in (1, 2, 4) if n <= gpus) if gpus else (1, 2)
    try:
        sizes = tuple(sorted({int(n) for n in requested.split(",")}))
    except ValueError:
        raise ValueError(f"--djinn-scale-servers: expected auto or a comma list of counts, got {requested!r}") from None
    if not sizes or sizes[0] < 1:
        raise ValueError(f"--djinn-scale-servers: counts must be positive, got {requested!r}")
    if gpus and sizes[-1] > gpus:
        raise ValueError(f"--djinn-scale-servers {requested}: one GPU per server, and this host has {gpus}")
    return sizes
