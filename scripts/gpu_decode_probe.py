"""Where a 7B decode step's time goes on the GPU: HF generate, Djinn's eager loop, the graph step.

python scripts/gpu_decode_probe.py [--model llama-2-7b] [--tokens 50]  → JSON on stdout.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from djinn import kv, models
from djinn.decoding import forward_last, greedy
from djinn.server.graphs import GraphDecoder


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-2-7b")
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = models.build(args.model, device="cuda")
    ids = torch.randint(0, 8192, (1, 72), generator=torch.Generator().manual_seed(1)).cuda()
    n = args.tokens
    out = {"model": args.model, "device": torch.cuda.get_device_name(), "torch": torch.__version__}

    ref = model.generate(ids, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=0)
    hf = timed(lambda: model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0), args.repeats)
    out["hf_generate_ms_per_token"] = min(hf) / n * 1e3

    def eager_loop():
        cache = kv.from_pairs([])
        token = greedy(forward_last(model, ids, cache))
        tokens = [token]
        for _ in range(n - 1):
            token = greedy(forward_last(model, token, cache))
            tokens.append(token.cpu())
        return tokens
    eager = timed(eager_loop, args.repeats)
    out["eager_loop_ms_per_token"] = min(eager) / n * 1e3
    # Does sampling NVML while decoding slow the decode down?
    from djinn.telemetry.nvml import NvmlSampler
    for interval in (0.02, 0.05):
        with NvmlSampler(0, interval):
            sampled = timed(eager_loop, args.repeats)
        out[f"eager_loop_ms_per_token_nvml_{int(interval * 1e3)}ms"] = min(sampled) / n * 1e3

    def graph_loop():
        logits = [decoder.prefill(ids)]
        token = greedy(logits[-1])
        tokens = [token.cpu()]
        for _ in range(n - 1):
            logits.append(decoder.step(token).clone())
            token = greedy(logits[-1])
            tokens.append(token.cpu())
        return torch.cat(tokens, 1), torch.stack(logits, 1)
    decoder = GraphDecoder(model, 1, 1024, torch.device("cuda"), compiled=False)
    static_tokens, static_logits = graph_loop()
    out["static_eager_tokens_equal_hf"] = bool(torch.equal(static_tokens.cuda(), ref.sequences[:, ids.shape[1]:]))
    out["static_eager_logits_max_abs_diff"] = (static_logits.float() - torch.stack(ref.logits, 1).float()).abs().max().item()
    decoder = GraphDecoder(model, 1, 1024, torch.device("cuda"))
    started = time.perf_counter()
    graph_tokens, graph_logits = graph_loop()
    out["graph_first_run_s_incl_compile"] = time.perf_counter() - started
    out["graph_vs_static_logits_max_abs_diff"] = (graph_logits.float() - static_logits.float()).abs().max().item()
    second_tokens, _ = graph_loop()
    out["graph_second_run_tokens_equal_first"] = bool(torch.equal(second_tokens, graph_tokens))
    graph = timed(graph_loop, args.repeats)
    out["graph_loop_ms_per_token"] = min(graph) / n * 1e3
    ref_logits = torch.stack(ref.logits, 1)
    out["graph_tokens_equal_hf"] = bool(torch.equal(graph_tokens.cuda(), ref.sequences[:, ids.shape[1]:]))
    out["graph_first_token_mismatch"] = next((i for i in range(n) if graph_tokens[0, i] != ref.sequences[0, 72 + i]), None)
    out["graph_logits_max_abs_diff"] = (graph_logits.float() - ref_logits.float()).abs().max().item()
    out["hf_logits_max_abs"] = ref_logits.float().abs().max().item()
    # How close greedy decisions are: the smallest gap between the top two logits of the reference.
    top2 = ref_logits.float().topk(2, dim=-1).values
    out["ref_min_top2_gap"] = (top2[..., 0] - top2[..., 1]).min().item()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
