"""One client process of tests/test_many_clients.py: `python tests/many_clients.py ADDRESS INDEX
SESSIONS NEW_TOKENS`. It attaches to the server's `tiny-llama` (no upload), opens SESSIONS
sessions at once, prefills each with its own seeded prompt, decodes them in turn (so all
stay open together), checks one session more is refused at the per-client cap, and compares
every session's tokens with HF greedy on a local copy of the same seeded model. Prints one
JSON line: sessions opened, sessions that matched HF, the cap's error code, seconds spent."""
from __future__ import annotations

import json
import sys
import time

import torch

import djinn
from djinn import models
from djinn.errors import DjinnError

PROMPT_TOKENS = 8


def prompt(index: int, session: int, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(index * 1000 + session)
    return torch.randint(0, vocab, (1, PROMPT_TOKENS), generator=generator)


def main(address: str, index: int, sessions: int, new_tokens: int) -> dict:
    torch.set_num_threads(1)
    local = models.build(models.TINY_MODEL, seed=0)  # the server's --model tiny-llama, for HF's tokens
    vocab = local.config.vocab_size
    started = time.monotonic()
    with djinn.connect(address, timeout_s=600) as client:
        remote = client.load(models.TINY_MODEL, mode="full_djinn")
        opened = [remote.session() for _ in range(sessions)]
        try:
            remote.session().close()
            cap = "none"
        except DjinnError as exc:
            cap = exc.code
        for i, s in enumerate(opened):
            s.prefill(prompt(index, i, vocab))
        tokens = [[] for _ in opened]
        for _ in range(new_tokens):  # one token of every session in turn: all of them open together
            for i, s in enumerate(opened):
                tokens[i].append(s.generate(1))
        served_s = time.monotonic() - started
        matched = 0
        for i, got in enumerate(tokens):
            ids = prompt(index, i, vocab)
            reference = local.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            matched += torch.equal(torch.cat(got, dim=1), reference[:, PROMPT_TOKENS:])
        for s in opened:
            s.close()
    return {"index": index, "opened": len(opened), "matched": matched, "cap": cap, "served_s": served_s}


if __name__ == "__main__":
    address, index, sessions, new_tokens = sys.argv[1], *map(int, sys.argv[2:5])
    print(json.dumps(main(address, index, sessions, new_tokens)), flush=True)
