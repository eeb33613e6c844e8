"""Does decoding repeat bit for bit on this GPU, resident and streamed, with and without
`djinn.reproducibility`'s deterministic kernels? One JSON object on stdout.

Each entry lists, per decode step, whether two runs' logits are equal (torch.equal):
the same model twice, with the allocator shifted, a second build of the same seeded
weights, HF `generate` against Djinn's loop, and the model streamed through a ring of
2.5 layers against the resident one.

python -m benchmarks.probes.determinism_check [--deterministic] [--layers 6] [--steps 8]
"""
from __future__ import annotations

import argparse
import json

import torch

from djinn import kv, models
from djinn.decoding import forward_last, greedy
from djinn.reproducibility import use_deterministic_kernels
from djinn.server.streamer import find_decoder_layers, stream_model

PROMPT_TOKENS = 512


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-2-13b")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--deterministic", action="store_true")
    args = parser.parse_args()
    if args.deterministic:
        use_deterministic_kernels()
    prompt = torch.randint(0, 32000, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(3)).cuda()

    @torch.no_grad()
    def djinn_loop(model, shift_mb=0):
        shift = torch.empty(shift_mb << 20, dtype=torch.uint8, device="cuda") if shift_mb else None  # noqa: F841
        cache, ids, logits = kv.from_pairs([]), prompt, []
        for _ in range(args.steps):
            step = forward_last(model, ids, cache)
            logits.append(step.float().cpu())
            ids = greedy(step)
        return torch.stack(logits)

    @torch.no_grad()
    def hf_loop(model):
        out = model.generate(prompt, max_new_tokens=args.steps, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        return torch.stack([step.float().cpu() for step in out.logits])

    def equal_steps(a, b):
        return [bool(torch.equal(a[i], b[i])) for i in range(a.shape[0])]

    first = models.build(args.model, seed=0, device="cuda", num_layers=args.layers)
    reference, hf_reference = djinn_loop(first), hf_loop(first)
    result = {"deterministic_kernels": args.deterministic, "device": torch.cuda.get_device_name(0),
              "torch": torch.__version__,
              "repeat": equal_steps(reference, djinn_loop(first)),
              "allocator_shifted": equal_steps(reference, djinn_loop(first, shift_mb=777)),
              "hf_generate_vs_djinn_loop": equal_steps(reference, hf_reference)}
    second = models.build(args.model, seed=0, device="cuda", num_layers=args.layers)
    result["second_build"] = equal_steps(reference, djinn_loop(second))
    layer_bytes = max(sum(p.nbytes for p in layer.parameters()) for layer in find_decoder_layers(second))
    with stream_model(second, device="cuda", capacity_bytes=int(layer_bytes * 2.5)):
        result["streamed_vs_resident"] = equal_steps(reference, djinn_loop(second))
        result["streamed_hf_vs_resident_hf"] = equal_steps(hf_reference, hf_loop(second))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
