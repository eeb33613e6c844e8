"""One tenant of the multitenant experiment: a client process driven by JSON lines on stdin.

    python -m benchmarks.multitenant_worker ADDRESS MODEL_NAME

It connects, attaches to the server's model (`djinn-server --model NAME`: no weights cross
the wire, and no process holds a copy of a 7B model), says `hello`, then serves commands
from its parent (`benchmarks.multitenant.Tenants`). Each command is prepared, answered
with `ready`, and run when the parent sends `go`, so N tenants start together:
- `generate`: greedy full_djinn decoding of a prompt; the client's per-step wall time and
  the server's queue and compute time of every step and its garbage-collection pauses since
  the step before, the tokens, and when it ran (and, for
  a solo reference, every step's logits saved to a safetensors file);
- `teacher_forced`: the prompt, then the given tokens fed one by one, every step's logits
  saved to a safetensors file (tensors never travel through the JSON or a pickle);
- `upload`: register and upload a seeded model of a catalogue shape (the "upload does
  not stall decode" measurement), with the chunk size given.
Replies are lines that start with MARK; anything else a library prints is not one.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
from safetensors.torch import save_file

import djinn
from djinn import equivalence, models
from djinn.transport.wire import DTYPES

MARK = "MT "  # a reply line; other stdout lines are not the protocol


def say(reply: dict) -> None:
    sys.stdout.write(MARK + json.dumps(reply) + "\n")
    sys.stdout.flush()


def _generate(remote, command: dict):
    prompt = torch.tensor(command["prompt"], dtype=torch.long)

    logits_out = command.get("logits_out")  # the solo reference: its logits too (lossless zstd on the wire)

    def run() -> dict:
        started = time.monotonic()
        sequences = remote.generate(prompt, max_new_tokens=command["new_tokens"], return_logits=bool(logits_out))
        ended = time.monotonic()
        if logits_out:
            save_file({"logits": remote.last_logits.float().contiguous()}, logits_out)
        steps = remote.last_stats.steps
        return {"start": started, "end": ended, "tokens": sequences[:, prompt.shape[1]:].tolist(),
                "wall_ms": [s.wall_ms for s in steps], "queue_ms": [s.queue_ms for s in steps],
                "compute_ms": [s.compute_ms for s in steps], "gc_ms": [s.gc_ms for s in steps]}
    return run


def _teacher_forced(remote, command: dict):
    prompt = torch.tensor(command["prompt"], dtype=torch.long)
    fed = torch.tensor(command["fed"], dtype=torch.long)

    def run() -> dict:
        with equivalence.stepper(remote, prompt) as step:
            logits = equivalence.teacher_forced_logits(step, prompt, fed)
        save_file({"logits": logits.contiguous()}, command["out"])
        return {"out": command["out"]}
    return run


def _upload(client, command: dict):
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # seeding GBs of weights, before `ready`
    model = models.build(command["model"], seed=command.get("seed", 1), dtype=DTYPES[command["dtype"]],
                         num_layers=command.get("num_layers"))
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())

    def run() -> dict:
        started = time.monotonic()
        client.upload(model, chunk_bytes=command["chunk_bytes"])
        return {"start": started, "end": time.monotonic(), "bytes": nbytes}
    return run


def main(argv: list[str]) -> int:
    address, model_name = argv
    torch.set_num_threads(1)  # a tenant computes nothing but its prompt's ids: the cores are the server's
    with djinn.connect(address, timeout_s=900) as client:
        # decode="exact": the fast path replays one session per bs-1 CUDA graph and never joins a
        # batch (djinn.server.batching.unbatched_reason); batched steps run HF's eager forward.
        remote = client.load(model_name, mode="full_djinn", decode="exact")
        say({"hello": remote.fingerprint})
        for line in sys.stdin:
            command = json.loads(line)
            if command["cmd"] == "quit":
                break
            try:
                if command["cmd"] == "upload":
                    run = _upload(client, command)
                else:
                    run = {"generate": _generate, "teacher_forced": _teacher_forced}[command["cmd"]](remote, command)
            except Exception as exc:  # the parent fails loudly with the reason
                say({"error": f"{type(exc).__name__}: {exc}"})
                continue
            say({"ready": True})
            if json.loads(sys.stdin.readline())["cmd"] != "go":
                raise SystemExit("expected 'go' after 'ready'")
            try:
                say(run())
            except Exception as exc:
                say({"error": f"{type(exc).__name__}: {exc}"})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
