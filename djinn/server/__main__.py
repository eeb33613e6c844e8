"""`python -m djinn.server` / `djinn-server`: start a Djinn server.

Prints `djinn server listening on tcp://HOST:PORT` once it accepts requests (the
benchmark fixtures wait for that line) and exits cleanly on SIGINT/SIGTERM. Unless
told `--no-malloc-tuning`, it first re-executes itself with the allocator tunables
of `djinn.transport.tuning`, before torch is imported.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from djinn.transport.tuning import is_tuned, tuned_environment

READY_LINE = "djinn server listening on {address}"
# KV caches grow a token per step and move in and out in layer pages: without expandable
# segments the caching allocator fragments, and the device runs out before the budget does.
# Set before torch is imported (it is read when the allocator starts); a user's setting wins.
ALLOC_CONF = ("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="djinn-server", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5556, help="TCP port (0: any free port)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N")
    parser.add_argument("--vram-budget-gb", type=float, default=None,
                        help="device memory the server may use for weights, KV, graph slots and the ring, in GiB "
                             "(default: what the device has free at start; on a CPU, half the host memory the "
                             "process may use)")
    parser.add_argument("--ring-buffer-gb", type=float, default=None,
                        help="ring through which a model larger than the budget streams its layers, counted in the "
                             "budget, in GiB (default: 2 GiB on a GPU, 16 MiB on a CPU)")
    parser.add_argument("--disable-kv-swap", action="store_true",
                        help="never page KV caches to host memory (isolates weight streaming from KV paging)")
    parser.add_argument("--host-swap-gb", type=float, default=None,
                        help="cap on host memory for KV paged out of the budget, in GiB; past it, or past what the "
                             "host (its cgroup included) can still give less a floor, a request fails with "
                             "out_of_memory (default: no cap beyond the host's own)")
    parser.add_argument("--auth-token-file", type=Path, default=None,
                        help="file holding a shared token that every request must carry")
    parser.add_argument("--curve-secret-key-file", default=None, metavar="PATH",
                        help="encrypt with ZeroMQ CURVE: this server's certificate with its secret key "
                             "(zmq.auth.create_certificates); needs --curve-client-keys")
    parser.add_argument("--curve-client-keys", default=None, metavar="DIR",
                        help="CURVE: directory of the public key files of the clients allowed to connect")
    # Caps default to `djinn.server.limits.ServerLimits` (imported after the re-exec: it imports torch).
    parser.add_argument("--max-sessions", type=int, default=None,
                        help="open sessions in all; past it open_session fails with limit_exceeded")
    parser.add_argument("--max-sessions-per-client", type=int, default=None,
                        help="open sessions of one client connection")
    parser.add_argument("--max-parked", type=int, default=None,
                        help="forwards parked at breakpoints at once, each a thread (default: a quarter of the "
                             "process limit, at most 256)")
    parser.add_argument("--max-uploads", type=int, default=None, help="models whose upload is in progress at once")
    parser.add_argument("--upload-ttl-s", type=float, default=None,
                        help="idle seconds after which a partial upload is abandoned and freed")
    parser.add_argument("--session-ttl-s", type=float, default=600.0,
                        help="idle seconds after which a session of a vanished client is closed")
    parser.add_argument("--ipc", default=None, metavar="PATH", help="also listen on ipc://PATH (same host)")
    parser.add_argument("--decode-graphs", action="store_true",
                        help="decode through CUDA-graph slots over a static KV cache (faster; logits then differ "
                             "from eager HF in the last bits)")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic kernels only (djinn.reproducibility): runs repeat bit for bit; the "
                             "default decode attention kernel of a GPU does not")
    parser.add_argument("--graph-max-len", type=int, default=1024, help="tokens one graph slot holds")
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="keep glibc's default allocator settings (large receives then page-fault "
                             "fresh buffers: ~5x slower on a VM)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser.parse_args(argv)


def _caps(args: argparse.Namespace):
    from djinn.server.limits import ServerLimits

    given = {"max_sessions": args.max_sessions, "max_sessions_per_peer": args.max_sessions_per_client,
             "max_parked": args.max_parked, "max_uploads": args.max_uploads, "upload_ttl_s": args.upload_ttl_s}
    return ServerLimits(**{name: value for name, value in given.items() if value is not None})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.no_malloc_tuning and not is_tuned(os.environ):
        argv = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, "-m", "djinn.server", *argv], tuned_environment(os.environ))
    os.environ.setdefault(*ALLOC_CONF)
    # Imported after the re-exec decision: torch is large, and the tuned process imports it once.
    from djinn.reproducibility import use_deterministic_kernels
    from djinn.server.server import Server, ServerConfig

    if args.deterministic:
        use_deterministic_kernels()  # before the server touches the device

    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = args.auth_token_file.read_text().strip() if args.auth_token_file else None
    if args.auth_token_file and not token:
        sys.exit(f"djinn-server: auth token file {args.auth_token_file} is empty")
    server = Server(ServerConfig(host=args.host, port=args.port, device=args.device,
                                 vram_budget_gb=args.vram_budget_gb, ring_buffer_gb=args.ring_buffer_gb,
                                 disable_kv_swap=args.disable_kv_swap, host_swap_gb=args.host_swap_gb,
                                 auth_token=token, session_ttl_s=args.session_ttl_s, ipc_path=args.ipc,
                                 decode_graphs=args.decode_graphs, graph_max_len=args.graph_max_len,
                                 curve_secret_key_file=args.curve_secret_key_file,
                                 curve_client_keys=args.curve_client_keys,
                                 caps=_caps(args)))
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: server.stop())
    print(READY_LINE.format(address=server.address), flush=True)
    server.serve_forever()
    logging.getLogger("djinn.server").info("stopped after %d requests", server.requests_served)
    return 0


if __name__ == "__main__":
    sys.exit(main())
