"""Run a program inside a named network namespace: `python -m djinn.netns_exec NAME -- ARGV...`.

The emulated link's server lives in its own namespace (djinn.link.emulated). This joins the
namespace with setns(2) (pyroute2.netns.setns, no `ip` binary) and then execs ARGV in place, so
the PID a launcher waits on, signals and reads the ready line of is the program's own.
Launchers run it by its path (`python .../djinn/netns_exec.py NAME -- ...`, `SCRIPT`): `-m`
imports the djinn package and torch with it, seconds of start-up before the exec that the
program then spends again. It imports nothing of djinn for that reason.
"""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")

SCRIPT = str(Path(__file__).resolve())
USAGE = "usage: python -m djinn.netns_exec NAME -- PROGRAM [ARGS...]"


def enter(name: str) -> None:
    """Move this process (its calling thread, and every thread and child it starts after) into `name`."""
    from pyroute2 import netns

    # flags=0: never create a namespace that is not there; a typo must fail, not make an empty one.
    netns.setns(name, flags=0)


def call_in(name: str, make: Callable[[], T]) -> T:
    """`make()` on a thread that entered network namespace `name` first, its result (or its error)
    returned here. A namespace is per thread, and what the call made stays in it: a socket (and
    the threads a library starts for it, such as libzmq's I/O threads) belongs to the namespace of
    the thread that made it, wherever it is used from later."""
    outcome: list = []

    def run() -> None:
        try:
            enter(name)
            outcome.append((True, make()))
        except BaseException as exc:  # re-raised in the caller's thread
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name=f"netns:{name}")
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3 or argv[1] != "--":
        print(USAGE, file=sys.stderr)
        return 2
    name, program = argv[0], argv[2:]
    try:
        enter(name)
    except OSError as exc:
        print(f"djinn.netns_exec: cannot enter network namespace {name!r}: {exc}", file=sys.stderr)
        return 1
    try:
        os.execvp(program[0], program)
    except OSError as exc:
        print(f"djinn.netns_exec: cannot run {program[0]!r}: {exc}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
