"""Djinn's one exception hierarchy, and its mapping to and from the wire's error codes.

A server turns any `DjinnError` into an error reply (`code`, `message`); the client
turns the reply back into the same class with `from_wire`. Codes are stable strings.
"""
from __future__ import annotations


class DjinnError(Exception):
    code = "internal"


class ProtocolError(DjinnError):
    """A message that breaks the framing rules (header, frames, sizes)."""
    code = "protocol"


class BadHeader(ProtocolError):
    code = "bad_header"


class UnsupportedVersion(ProtocolError):
    code = "unsupported_version"


class UnknownOp(ProtocolError):
    code = "unknown_op"


class FrameMismatch(ProtocolError):
    code = "frame_mismatch"


class TooLarge(ProtocolError):
    code = "too_large"


class Unauthenticated(DjinnError):
    code = "unauthenticated"


class BadRequest(DjinnError):
    """Well-framed, but the op's arguments are wrong (shape, dtype, range, state)."""
    code = "bad_request"


class UnsupportedArgument(BadRequest, TypeError):
    """An argument HF's `generate` takes that Djinn does not (yet): named, never ignored.

    A `TypeError` too, as Python raises for an unknown keyword argument."""
    code = "unsupported_argument"


class ModelNotFound(DjinnError):
    code = "model_not_found"


class SessionNotFound(DjinnError):
    code = "session_not_found"


class UploadIncomplete(DjinnError):
    code = "upload_incomplete"


class OutOfMemory(DjinnError):
    code = "out_of_memory"


class LimitExceeded(DjinnError):
    """A configured cap on a server resource (sessions, parked breakpoints, uploads in
    progress, model size) is reached: the request is refused before it allocates."""
    code = "limit_exceeded"


class DjinnTimeout(DjinnError, TimeoutError):
    code = "timeout"


class ServerLost(DjinnError, ConnectionError):
    """The client's connection to the server dropped while a request waited (the process
    exited or restarted): its sessions and cached models are gone with it."""
    code = "server_lost"


class SessionLost(ServerLost):
    """A session of a pool whose server is gone (it exited, was killed, or restarted): its KV
    cache went with it. The pool's other servers and their sessions go on; a new session is
    placed on a live server."""
    code = "session_lost"


class ServerRestarted(DjinnError):
    """The server answering now is another process than the one this client connected to."""
    code = "server_restarted"


_BY_CODE = {cls.code: cls for cls in (
    DjinnError, ProtocolError, BadHeader, UnsupportedVersion, UnknownOp, FrameMismatch,
    TooLarge, Unauthenticated, BadRequest, UnsupportedArgument, ModelNotFound, SessionNotFound,
    UploadIncomplete, OutOfMemory, LimitExceeded, DjinnTimeout, ServerLost, SessionLost, ServerRestarted)}

# What an error message may quote of a value a peer sent: enough to recognise it, never
# enough to turn a 1 MB field into a 1 MB reply and log line.
QUOTE_CHARS = 48


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """A short, escaped prefix of a peer-supplied value, for error messages and logs.

    Strings and bytes are cut before `repr` (whose cost and length follow the input);
    containers are named by type and length, not printed."""
    if isinstance(value, (str, bytes, bytearray)):
        shown = repr(value[:limit])
        return shown + (f"... ({len(value)} long)" if len(value) > limit else "")
    if isinstance(value, (bool, int, float)) or value is None:
        shown = repr(value)
        return shown if len(shown) <= limit else shown[:limit] + "..."
    try:
        size = f" of {len(value)}"
    except TypeError:
        size = ""
    return f"<{type(value).__name__}{size}>"


def without_tracebacks(error: BaseException) -> BaseException:
    """`error`, once answered and logged, with its own traceback and its causes' dropped.

    A traceback holds the frames it passed through, and since Python 3.11 a finished frame
    keeps its caller's frame too, with their locals: in the request loop, the request and
    its tensors. Where the error is itself reachable from one of those frames (an
    `Incoming` holding its rejection, a worker's outcome) that is a cycle, which only
    the cyclic collector frees, late, native buffers and all: the RSS growth of the
    long fuzz run (issue 13), up to two 1 GiB zstd-bomb outputs alive at once."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.__traceback__ = None
        pending += [current.__cause__, current.__context__]
    return error


def from_wire(code: str, message: str) -> DjinnError:
    """The exception a client raises for an error reply; unknown codes stay readable."""
    cls = _BY_CODE.get(code, DjinnError)
    err = cls(message)
    if cls is DjinnError and code != DjinnError.code:
        err = DjinnError(f"[{code}] {message}")
    return err
