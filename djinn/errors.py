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


class DjinnTimeout(DjinnError, TimeoutError):
    code = "timeout"


_BY_CODE = {cls.code: cls for cls in (
    DjinnError, ProtocolError, BadHeader, UnsupportedVersion, UnknownOp, FrameMismatch,
    TooLarge, Unauthenticated, BadRequest, UnsupportedArgument, ModelNotFound, SessionNotFound,
    UploadIncomplete, OutOfMemory, DjinnTimeout)}


def from_wire(code: str, message: str) -> DjinnError:
    """The exception a client raises for an error reply; unknown codes stay readable."""
    cls = _BY_CODE.get(code, DjinnError)
    err = cls(message)
    if cls is DjinnError and code != DjinnError.code:
        err = DjinnError(f"[{code}] {message}")
    return err
