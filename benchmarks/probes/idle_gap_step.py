"""A decode step after an idle gap, with no link: does the host alone make it slower?

    python -m benchmarks.probes.idle_gap_step [--gaps-ms 0,1,5] [--rounds 6] [--steps 40]

One full_djinn server on loopback; for each gap, sessions whose client sleeps `gap` before every
decode (as it would wait on a link's round trip), rounds interleaved gap by gap. Prints one JSON
line per gap: the median (and quartiles) of the server's compute of a step and of the step's time
off the server (the client's wall less the server's queue and compute). It asks whether the host
alone explained why full_djinn's steps over the link computed longer than the same server's steps
over loopback; on the 2-core VM the answer moved with the host's other load, run to run. The
sweep's lockstep pairing later showed no such difference (results/README.md, the emulated link).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import djinn
from djinn import models

from benchmarks.launcher import ServerLauncher, ServerSpec
from benchmarks.threads import pin_client, plan_threads, usable_cores

PROMPT_FILE = Path(__file__).resolve().parents[1] / "data" / "prompt.json"


def _spread(samples: list[float], what: str) -> dict:
    q1, median, q3 = statistics.quantiles(samples, n=4)
    return {f"{what}_ms_median": median, f"{what}_ms_q1": q1, f"{what}_ms_q3": q3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gaps-ms", default="0,1,5")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--model", default="tiny-llama")
    args = parser.parse_args(argv)
    gaps = [float(g) / 1e3 for g in args.gaps_ms.split(",")]
    plan = plan_threads(usable_cores())
    pin_client(plan)
    launcher = ServerLauncher(Path(tempfile.mkdtemp(prefix="idle-gap-")), plan)
    model = models.build(args.model, seed=0)
    prompt = torch.tensor([json.loads(PROMPT_FILE.read_text())["token_ids"]])
    compute: dict[float, list[float]] = {gap: [] for gap in gaps}
    off_server: dict[float, list[float]] = {gap: [] for gap in gaps}
    try:
        server = launcher.start("idle-gap", ServerSpec("cpu"))
        with djinn.connect(server.host_port, timeout_s=300) as client:
            remote = client.load(model, mode="full_djinn")
            for _ in range(args.rounds):
                for gap in gaps:
                    with remote.session() as session:
                        session.prefill(prompt)
                        session.generate(1)  # the prefill's token: no request
                        for _ in range(args.steps):
                            if gap:
                                time.sleep(gap)
                            started = time.perf_counter()
                            session.generate(1)
                            wall = (time.perf_counter() - started) * 1e3
                            timings = session.last_reply["server"]
                            compute[gap].append(timings["compute_ms"])
                            off_server[gap].append(wall - timings["compute_ms"] - timings["queue_ms"])
    finally:
        launcher.stop_all()
    for gap in gaps:
        print(json.dumps({"gap_ms": gap * 1e3, "n": len(compute[gap]), **_spread(compute[gap], "compute"),
                          **_spread(off_server[gap], "off_server")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
