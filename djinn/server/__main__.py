"""`python -m djinn.server` / `djinn-server`: start a Djinn server.

Prints `djinn server listening on tcp://HOST:PORT` once it accepts requests (the
benchmark fixtures wait for that line) and exits cleanly on SIGINT/SIGTERM. Unless
told `--no-malloc-tuning`, it first re-executes itself with the allocator tunables
of `djinn.transport.tuning`. A failure to start is one line on stderr and exit 1.
"""
from __future__ import annotations

import logging
import os
import signal
import sys

import djinn
from djinn.server.server import ServerConfig
from djinn.transport.tuning import is_tuned, tuned_environment

READY_LINE = "djinn server listening on {address}"
# KV caches grow a token per step and move in and out in layer pages: without expandable
# segments the caching allocator fragments, and the device runs out before the budget does.
# Set before CUDA starts (the allocator reads it then); a user's setting wins.
ALLOC_CONF = ("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
PROG = "djinn-server"


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    parser = ServerConfig.parser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"{PROG} {djinn.__version__}")
    return ServerConfig.from_args(parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    os.environ.setdefault(*ALLOC_CONF)  # before the re-exec, so the tuned process starts with it
    if config.malloc_tuning and not is_tuned(os.environ):
        argv = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, "-m", "djinn.server", *argv], tuned_environment(os.environ))
    from djinn.reproducibility import use_deterministic_kernels
    from djinn.server.gc_pauses import freeze_startup_heap
    from djinn.server.server import Server

    logging.basicConfig(level=config.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("djinn.server")
    try:
        if config.deterministic:
            use_deterministic_kernels()  # before the server touches the device
        server = Server(config)
    except Exception as exc:  # a bad device, a port in use, a model that does not build: one line, not a traceback
        log.debug("start-up failed", exc_info=True)
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{PROG}: cannot start: {message}", file=sys.stderr)
        return 1
    if config.gc_freeze:
        log.info("froze %d start-up objects out of the garbage collector's full collections", freeze_startup_heap())
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: server.stop())
    print(READY_LINE.format(address=server.address), flush=True)
    server.serve_forever()
    log.info("stopped after %d requests", server.requests_served)
    return 0


if __name__ == "__main__":
    sys.exit(main())
