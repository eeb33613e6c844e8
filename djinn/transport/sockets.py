"""ZeroMQ endpoints: a DEALER client connection and a ROUTER server socket.

Both count every byte they frame. The client waits for each reply with a timeout
and raises `DjinnTimeout` naming the op and the address; a reply to an earlier,
timed-out request is recognised by its id and dropped. The server turns every
protocol violation into an error reply to the sender and goes on serving; it can
land chosen raw tensor frames straight in memory of its own (`Landing`).
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
import zmq
import zmq.utils.monitor

from djinn.errors import (DjinnError, DjinnTimeout, FrameMismatch, ModelNotFound, ServerLost, ServerRestarted,
                          SessionNotFound, Unauthenticated, from_wire, quote, without_tracebacks)
from djinn.transport.codecs import Codec, CodecPolicy
from djinn.transport.counters import ByteCounters
from djinn.transport.security import ClientSecurity, ServerSecurity
from djinn.transport.wire import (DTYPES, ERROR_OP, REPLY_OP, Header, Landed, Limits, Message, OutgoingTensor,
                                  TensorSpec, assemble, decode_message, encode_message, header_from, length_byte_counts,
                                  request_id_of, unpack_header)

log = logging.getLogger("djinn.transport")
_MONITOR_IDS = itertools.count()  # each client socket's monitor endpoint, unique in this process

DEFAULT_TIMEOUT_S = 120.0
HELLO_TIMEOUT_S = 2.0  # `connect` confirms the server this fast; the long timeout is for requests
LINK_CHECK_S = 1.0  # a late reply's wait looks at the connection at least this often (a dead server: ServerLost)
# A reply later than this is waited for beside the connection's events, so that a drop
# (the server exited, or restarted faster than any periodic check) ends the wait at once:
# the reply to a request sent before a drop can never arrive, since the reconnected
# DEALER is a new peer to the ROUTER. Before it, the plain receive: a prompt reply pays
# nothing for the check.
PROMPT_REPLY_S = 0.05
STALLED_WAIT_S = 2.0  # after a timeout, how long a request waits for any sign of life before failing the same way
GONE_CODES = (SessionNotFound.code, ModelNotFound.code)  # what a restarted server says of the old one's state
UNKNOWN_REQUEST_ID = -1  # error replies to a message whose header could not be read
MAX_ERROR_CHARS = 2000  # of an error reply's message
SOCKET_BUFFER_BYTES = 8 << 20  # larger kernel buffers lift loopback throughput for big frames
SPIN_ENV = "DJINN_SPIN_US"  # microseconds a receive polls before it sleeps; overrides the default below
SPIN_US = 200  # about one loopback round trip: a reply later than that is not worth a core
# Polling only pays where a core is free for it: with fewer, the spinning thread takes
# the CPU that libzmq's I/O thread needs to deliver the very message it waits for
# (measured on 2 cores: no gain, and 4x slower round trips when both ends spin).
SPIN_MIN_CORES = 8

# Asked, once a message's header is read, for each of its raw tensor frames: a contiguous
# CPU tensor of exactly `spec.nbytes` bytes to receive the frame into, or None to receive it
# as a frame. The server lands activations in pinned memory so their upload is a plain DMA.
Landing = Callable[[TensorSpec], torch.Tensor | None]


def spin_seconds(environ: Mapping[str, str] = os.environ, cores: int | None = None) -> float:
    """How long a receive busy-polls before blocking: `DJINN_SPIN_US`, else SPIN_US on a
    host of at least SPIN_MIN_CORES usable cores, else 0."""
    if SPIN_ENV in environ:
        try:
            return max(float(environ[SPIN_ENV]), 0.0) / 1e6
        except ValueError:
            raise ValueError(f"{SPIN_ENV}={environ[SPIN_ENV]!r} is not a number of microseconds") from None
    cores = len(os.sched_getaffinity(0)) if cores is None else cores
    return SPIN_US / 1e6 if cores >= SPIN_MIN_CORES else 0.0


def endpoint(address: str) -> str:
    """`host:port` becomes `tcp://host:port`; ZeroMQ endpoints pass through once checked.

    Checked here because libzmq's own answer to a malformed address is an EINVAL without
    the address, or (for "localhost" without a port) a connect that never completes."""
    if not isinstance(address, str) or not address:
        raise ValueError(f"a server address is a non-empty 'host:port' string, got {address!r}")
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "tcp", address
    if scheme in ("ipc", "inproc"):
        if not rest:
            raise ValueError(f"address {address!r} names no {scheme} path")
        return f"{scheme}://{rest}"
    if scheme != "tcp":
        raise ValueError(f"address {address!r}: unsupported transport {scheme!r} (tcp, ipc or inproc)")
    host, colon, port = rest.rpartition(":")
    if not colon or not host:
        raise ValueError(f"address {address!r} needs a host and a port, as in 'localhost:5556'")
    if port != "*" and not (port.isdigit() and 0 <= int(port) <= 65535):
        raise ValueError(f"address {address!r}: port {port!r} is not a number from 0 to 65535")
    return f"tcp://{rest}"


def _tune(sock: zmq.Socket, limits: Limits) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDBUF, SOCKET_BUFFER_BYTES)
    sock.setsockopt(zmq.RCVBUF, SOCKET_BUFFER_BYTES)
    # Below the header checks, libzmq itself drops a peer that sends one frame over
    # the limit, so a hostile frame is never buffered whole.
    sock.setsockopt(zmq.MAXMSGSIZE, max(limits.max_tensor_bytes, limits.max_header_bytes))


def _send_frames(sock: zmq.Socket, frames: list) -> None:
    """`send_multipart(frames, copy=False)` without its per-frame type check, which
    `encode_message`'s bytes and memoryviews pass anyway. Frames under
    `zmq.COPY_THRESHOLD` are copied by pyzmq; larger ones go out zero-copy."""
    for frame in frames[:-1]:
        sock.send(frame, zmq.SNDMORE, copy=False)
    sock.send(frames[-1], copy=False)


class _Receiver:
    """Whole multipart messages from one socket, each within a timeout.

    A receive timeout on the socket instead of poll-then-receive: one system call and
    no Poller object per message. pyzmq's option getters are slow (each builds a
    `SocketOption` enum; `sock.rcvtimeo` adds an attribute lookup: ~3 us in a hot loop,
    more between round trips), so nothing on this path reads one: the timeout last set
    is remembered here, and the frames' own `more` flags replace `recv_multipart`'s
    getsockopt(RCVMORE) per frame.
    """

    def __init__(self, sock: zmq.Socket, spin_s: float):
        self._socket = sock
        self._timeout_ms = sock.getsockopt(zmq.RCVTIMEO)
        self._spin_s = spin_s

    def within(self, timeout_ms: int) -> list | None:
        """One multipart message, or None after `timeout_ms`."""
        frame = self.first(timeout_ms)
        return None if frame is None else [frame, *self.rest(frame)]

    def first(self, timeout_ms: int) -> zmq.Frame | None:
        """The first frame of the next message, or None after `timeout_ms`."""
        timeout_ms = max(timeout_ms, 0)  # 0 would mean "don't wait", -1 "forever": clamp to the former
        frame = self._poll(min(self._spin_s, timeout_ms / 1e3)) if self._spin_s else None
        if frame is None:
            if timeout_ms != self._timeout_ms:
                self._socket.setsockopt(zmq.RCVTIMEO, timeout_ms)
                self._timeout_ms = timeout_ms
            try:
                frame = self._socket.recv(copy=False)
            except zmq.Again:
                return None
        return frame

    def rest(self, frame: zmq.Frame) -> list:
        """The frames of `frame`'s message after it."""
        frames = []
        while frame.more:  # a multipart message arrives whole: the rest is already here
            frame = self._socket.recv(copy=False)
            frames.append(frame)
        return frames

    def _poll(self, spin_s: float) -> zmq.Frame | None:
        """The first frame if one arrives within `spin_s`; saves the wake-up of a thread
        asleep in libzmq, the largest part of a small round trip on an idle host."""
        give_up = time.perf_counter() + spin_s
        while True:
            try:
                return self._socket.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                if time.perf_counter() > give_up:
                    return None


class _Link:
    """What the client socket's monitor said about its connection: up or down, and why a
    handshake failed. Read only when a reply is late, so a prompt round trip pays nothing."""

    FAILED = {getattr(zmq, "EVENT_HANDSHAKE_FAILED_NO_DETAIL", 0): "handshake failed",
              getattr(zmq, "EVENT_HANDSHAKE_FAILED_PROTOCOL", 0): "protocol or mechanism mismatch",
              getattr(zmq, "EVENT_HANDSHAKE_FAILED_AUTH", 0): "credentials refused"}

    def __init__(self, sock: zmq.Socket):
        events = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
        for event in self.FAILED:
            events |= event
        # libzmq's I/O thread sends each event with a blocking send: once the monitor pipe is
        # full (1000 events at the default high-water mark) that thread stops for good, and
        # with it every socket of the context (the process's shared one: no connection of
        # any client in this process completes again). Events are read only when a reply is
        # late, and a connection that keeps dropping (a peer refusing the handshake, or
        # accepting and closing) makes one per reconnect, so the pipe has no high-water mark.
        address = f"inproc://djinn-link-monitor-{next(_MONITOR_IDS)}"
        sock.monitor(address, events)
        self._socket = sock
        self._monitor = sock.context.socket(zmq.PAIR, socket_class=zmq.Socket)  # plain, whatever the context makes
        self._monitor.setsockopt(zmq.RCVHWM, 0)  # with either end's at 0, an inproc pipe is unbounded
        self._monitor.connect(address)
        self._poller = zmq.Poller()  # the reply socket and the monitor, for a late reply's wait
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self.up = False
        self.drops = 0  # disconnections after a completed handshake
        self.refused: str | None = None  # why the last handshake failed, until one succeeds

    def wait_up(self, timeout_s: float) -> bool:
        """Whether a handshake completes within `timeout_s` (False: refused, or none yet)."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.update()
            remaining_ms = math.ceil((deadline - time.monotonic()) * 1000)
            if self.up or self.refused or remaining_ms <= 0:
                return self.up
            self._monitor.poll(remaining_ms)

    def wait(self, timeout_s: float) -> None:
        """Until a message or a connection event arrives, or `timeout_s` passes."""
        self._poller.poll(math.ceil(timeout_s * 1000))

    def update(self) -> None:
        while True:
            try:
                event = zmq.utils.monitor.recv_monitor_message(self._monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.up, self.refused = True, None
            elif event == zmq.EVENT_DISCONNECTED:
                self.drops += self.up
                self.up = False
            elif event in self.FAILED:
                self.up, self.refused = False, self.FAILED[event]

    def close(self) -> None:
        # Monitoring stops before its socket closes: an event sent to a monitor whose reader
        # is gone would block the I/O thread the same way (libzmq issue 3575).
        self._socket.disable_monitor()
        self._monitor.close(linger=0)


class ClientConnection:
    """One client's connection to a server: request → reply, with counters.

    A server that stops answering is reported once: a request whose connection drops
    (the process exited) fails within about `LINK_CHECK_S` with `ServerLost`, one that
    gets no reply within its timeout with `DjinnTimeout`; either names the request. Until
    the server answers again, later requests (a `close_session` on the way out) raise that
    same error at once (`ServerLost`: while the connection is down) or after
    `STALLED_WAIT_S` (`DjinnTimeout`), instead of waiting a second full timeout.
    """

    def __init__(self, address: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, auth_token: str | None = None,
                 limits: Limits = Limits(), policy: CodecPolicy = CodecPolicy(), context: zmq.Context | None = None,
                 security: ClientSecurity | None = None, counters: ByteCounters | None = None):
        self.address = endpoint(address)
        self.timeout_s = timeout_s
        self.auth_token = auth_token
        self.limits = limits
        self.policy = policy
        self.counters = counters if counters is not None else ByteCounters()  # a pool's members share one
        self.server_instance: str | None = None  # from `hello`: which server process answered
        self._ids = itertools.count(1)
        self._failed: DjinnError | None = None  # the error that said the server stopped answering
        self._last_reply_at = 0.0  # monotonic time of the last reply
        self._socket = (context or zmq.Context.instance()).socket(zmq.DEALER)
        _tune(self._socket, limits)
        if security is not None:  # the handshake's credentials; `auth_token` alone goes in headers only
            security.apply(self._socket)
        self._link = _Link(self._socket)
        self._socket.connect(self.address)
        self._receiver = _Receiver(self._socket, spin_seconds())

    def request(self, op: str, args: Mapping[str, Any] | None = None,
                tensors: Mapping[str, Any] | None = None, *, timeout_s: float | None = None,
                policy: CodecPolicy | None = None) -> Message:
        """Send one request and wait for its reply; error replies raise their `DjinnError`."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        failed = self._failed
        if isinstance(failed, ServerLost) or time.monotonic() - self._last_reply_at > LINK_CHECK_S:
            # Events of the time between requests belong to none: read them before this one goes
            # out (a hot loop of requests skips this: its events are read when a reply is late).
            self._link.update()
        if isinstance(failed, ServerLost) and not self._link.up:
            raise failed  # the same report, naming the request that found the server gone
        drops = self._link.drops
        request_id = next(self._ids)
        header = Header(op, request_id, args=dict(args or {}), auth=self.auth_token)
        frames, payload, framing = encode_message(header, tensors, policy or self.policy)
        _send_frames(self._socket, frames)
        self.counters.count_sent(payload, framing)
        reply = self._receive(op, request_id, timeout_s, drops,
                              stalled=failed if isinstance(failed, DjinnTimeout) else None)
        self._failed = None
        self._last_reply_at = time.monotonic()
        if reply.op == ERROR_OP:
            error = from_wire(str(reply.args.get("code")), str(reply.args.get("message")))
            if error.code in GONE_CODES and op != "hello":
                self._check_restart(error)
            raise error
        return reply

    def _receive(self, op: str, request_id: int, timeout_s: float, drops: int,
                 stalled: DjinnError | None = None) -> Message:
        """The reply to `request_id` within `timeout_s`; while `stalled` (an earlier request's
        timeout), within STALLED_WAIT_S of any message arriving, else `stalled` again. `drops`:
        the connection's drops when the request went out; one more, and its reply is lost."""
        sent_at = time.monotonic()
        deadline = sent_at + (min(timeout_s, STALLED_WAIT_S) if stalled is not None else timeout_s)
        frames = self._receiver.within(math.ceil(min(timeout_s, PROMPT_REPLY_S) * 1000))
        while True:
            if frames is None:
                self._link.update()
                if self._link.refused:
                    raise Unauthenticated(f"{self.address} refused this client in the ZeroMQ handshake "
                                          f"({self._link.refused}): wrong or missing token, or a CURVE key "
                                          f"it does not allow")
                # A drop since the request went out; or a link that was down before it and stayed
                # down for a link check (a reconnection after a restart takes ~0.1 s).
                if self._link.drops > drops or (self._link.drops and not self._link.up
                                                and time.monotonic() - sent_at >= LINK_CHECK_S):
                    self._failed = ServerLost(f"the connection to {self.address} dropped while '{op}' waited for "
                                              f"its reply: the server exited or restarted, and its sessions and "
                                              f"cached models with it")
                    raise self._failed
                remaining_s = deadline - time.monotonic()
                if remaining_s > 0:
                    # the reply, or any event of the connection, ends this wait; at the latest
                    # LINK_CHECK_S, for the events a poll does not wake on
                    self._link.wait(min(remaining_s, LINK_CHECK_S))
                    frames = self._receiver.within(0)
                    continue
                if stalled is not None:
                    self._failed = stalled
                    raise stalled  # the server has not answered since: the first report stands
                self._failed = DjinnTimeout(f"no reply to '{op}' from {self.address} within {timeout_s:.1f} s")
                raise self._failed
            if stalled is not None:  # a reply, late or not: the server answers again, the full timeout applies
                deadline, stalled = time.monotonic() + timeout_s, None
            reply = decode_message(frames, (REPLY_OP, ERROR_OP), self.limits)
            self.counters.count_received(reply.payload_bytes, reply.framing_bytes)
            if reply.header.request_id in (request_id, UNKNOWN_REQUEST_ID):
                return reply
            frames = None  # a late reply to a request that already timed out: not ours to return

    def confirm(self, handshake_timeout_s: float) -> dict:
        """The server's `hello`, once a ZeroMQ handshake with it completed within
        `handshake_timeout_s`. The handshake is libzmq's, answered by the server's I/O
        thread however busy its request loop is: no server, or refused credentials, fail
        fast here, while a server busy with another client's long request gets the
        request timeout to answer."""
        if not self._link.wait_up(handshake_timeout_s):
            if self._link.refused:
                raise Unauthenticated(f"{self.address} refused this client in the ZeroMQ handshake "
                                      f"({self._link.refused}): wrong or missing token, or a CURVE key it does "
                                      f"not allow")
            raise DjinnTimeout(f"no djinn server answered at {self.address} within {handshake_timeout_s:.1f} s: "
                               f"is one running there (python -m djinn.server), and reachable?")
        return self.hello(self.timeout_s)

    def hello(self, timeout_s: float) -> dict:
        """The server's `hello`, within `timeout_s`; remembers which server process answered."""
        args = dict(self.request("hello", timeout_s=timeout_s).args)
        self.server_instance = args.get("instance")
        return args

    def reconnect(self, timeout_s: float) -> dict:
        """`hello` again after the server stopped answering: the failure that made later
        requests fail at once is forgotten, and the server gets `timeout_s` to answer."""
        self._failed = None
        return self.hello(timeout_s)

    def _check_restart(self, error: DjinnError) -> None:
        """A session or model unknown to a server that restarted since `hello`: say so."""
        before = self.server_instance
        if before is None:
            return
        try:
            now = self.hello(HELLO_TIMEOUT_S).get("instance")
        except DjinnError:
            return
        if now != before:
            raise ServerRestarted(f"the server at {self.address} restarted (instance {before} is now {now}): "
                                  f"its sessions and cached models are gone ({error}); load the model again "
                                  f"to register and upload it") from error

    def close(self) -> None:
        self._link.close()
        self._socket.close(linger=0)

    def __enter__(self) -> "ClientConnection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class Incoming:
    """A request as the server received it: a message, or the error it raised."""
    peer: bytes
    received_at: float
    message: Message | None = None
    error: DjinnError | None = None
    request_id: int = UNKNOWN_REQUEST_ID


class _Reading:
    """The frames of the message being received: their lengths (for the counters) and
    whether more follow, so that a rejected or failed message is consumed to its end."""

    def __init__(self, routing_frame: zmq.Frame):
        self.last = routing_frame
        self.frames: list[int] = []  # lengths of the frames after the routing id
        self.request_id: int | None = None

    def next(self, sock: zmq.Socket) -> zmq.Frame:
        self.last = sock.recv(copy=False)
        self.frames.append(len(self.last))
        return self.last

    def landed(self, received: int, more: bool) -> None:
        self.frames.append(received)
        self.last = _LandedFrame(bool(more))


@dataclass(frozen=True)
class _LandedFrame:
    more: bool


class ServerSocket:
    """The server's ROUTER socket: validated requests in, replies out, counters per peer.

    With a `landing`, a message that carries tensors is received in two steps: its header
    frame, read and validated first, then each tensor frame, those the landing answers for
    received into its tensor (`Socket.recv_into`: the one copy out of libzmq's buffer that
    any receive makes). Landed frames are checked as every frame is, by `assemble`.
    """

    def __init__(self, address: str, known_ops: Iterable[str], *, limits: Limits = Limits(),
                 auth_token: str | None = None, context: zmq.Context | None = None, landing: Landing | None = None,
                 security: ServerSecurity | None = None, queued_replies: int | None = None):
        self.known_ops = frozenset(known_ops)
        self.limits = limits
        self.auth_token = auth_token
        self.landing = landing
        self.counters: defaultdict[bytes, ByteCounters] = defaultdict(ByteCounters)  # setdefault built a spare per message
        self._socket = (context or zmq.Context.instance()).socket(zmq.ROUTER)
        _tune(self._socket, limits)
        if queued_replies is not None:
            # Replies queued for a peer that does not read them: past this many, ROUTER drops
            # the next ones instead of holding them (+1.5 GB for a client that never read).
            self._socket.setsockopt(zmq.SNDHWM, queued_replies)
        if security is not None:
            security.apply(self._socket)
        self._socket.bind(endpoint(address))
        self.address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._receiver = _Receiver(self._socket, spin_seconds())

    @property
    def zmq_socket(self) -> zmq.Socket:
        """The ROUTER socket, for a poller that waits on several servers' sockets at once."""
        return self._socket

    def receive(self, timeout_ms: int) -> Incoming | None:
        """The next request, or None when none came within the timeout.

        Never raises for what a peer sent: a malformed or unauthenticated message becomes
        an `Incoming` with its error, and a failure of this code itself one with an
        `internal` error (logged with its traceback); either way every frame of the
        message is consumed, so the next one starts clean.
        """
        first = self._receiver.first(timeout_ms)
        if first is None:
            return None
        reading = _Reading(first)
        try:
            return self._receive_message(first.bytes, reading)
        except Exception as exc:  # a bug here must not end the request loop
            log.exception("receiving a request failed")
            self._discard_rest(reading)
            error = DjinnError(f"the server failed reading this request: {type(exc).__name__} {quote(str(exc), 200)}")
            return self._rejected(first.bytes, time.perf_counter(), reading.frames, error, reading.request_id)

    def _receive_message(self, peer_id: bytes, reading: "_Reading") -> Incoming:
        if not reading.last.more:  # a DEALER never sends an empty message; a raw peer might
            return self._rejected(peer_id, time.perf_counter(), [], FrameMismatch("empty message"), UNKNOWN_REQUEST_ID)
        head = reading.next(self._socket)
        try:
            raw = unpack_header(head.buffer, self.limits)
            reading.request_id = request_id_of(raw)
            # The token first: nothing else of an unauthenticated header is read or answered.
            header = header_from(raw, self.known_ops, self.limits, self.auth_token)
            targets = self._landing_targets(header) if self.landing is not None and head.more else []
        except DjinnError as err:
            self._discard_rest(reading)
            return self._rejected(peer_id, time.perf_counter(), reading.frames, err, reading.request_id)
        bodies = []
        while reading.last.more:  # every frame is received, however many the header declared
            target = targets[len(bodies)] if len(bodies) < len(targets) else None
            if target is None:
                bodies.append(reading.next(self._socket).buffer)
            else:
                # A frame of another length is truncated or short here; `assemble` rejects it by its length.
                received = self._socket.recv_into(target.view(-1).view(torch.uint8).numpy())
                reading.landed(received, self._socket.getsockopt(zmq.RCVMORE))
                bodies.append(Landed(target, received))
        now = time.perf_counter()
        try:
            message = assemble(header, head.buffer, bodies)
        except DjinnError as err:
            return self._rejected(peer_id, now, reading.frames, err, reading.request_id)
        return self._accepted(peer_id, now, message)

    def _discard_rest(self, reading: "_Reading") -> None:
        while reading.last.more:
            reading.next(self._socket)

    def _landing_targets(self, header: Header) -> list[torch.Tensor | None]:
        """Per tensor frame, the tensor of its dtype and shape to receive it into, or None.

        Compressed frames are decoded from their frame, so only raw ones land.
        """
        try:
            return [self._land(spec) if spec.codec is Codec.RAW else None for spec in header.tensors]
        except Exception as exc:  # the landing is the server's code: its failure fails the request, not the server
            raise DjinnError(f"no landing buffer for a tensor of '{header.op}': {exc!r}") from exc

    def _land(self, spec: TensorSpec) -> torch.Tensor | None:
        target = self.landing(spec)
        if target is None:
            return None
        if target.device.type != "cpu" or not target.is_contiguous() or target.nbytes != spec.nbytes:
            raise ValueError(f"tensor {spec.name!r} of {spec.nbytes} bytes needs a contiguous CPU tensor of that "
                             f"size to land in, got {target.dtype} {list(target.shape)} on {target.device}")
        # A view, not torch.frombuffer: the tensor keeps its storage, so a pinned block stays
        # known to torch's caching host allocator, which records the async copies from it.
        return target.view(-1).view(torch.uint8).view(DTYPES[spec.dtype]).view(spec.shape)

    def _accepted(self, peer_id: bytes, received_at: float, message: Message) -> Incoming:
        self.counters[peer_id].count_received(message.payload_bytes, message.framing_bytes)
        return Incoming(peer_id, received_at, message=message, request_id=message.header.request_id)

    def _rejected(self, peer_id: bytes, received_at: float, frame_lengths: list[int], error: DjinnError,
                  request_id: int | None) -> Incoming:
        payload, framing = length_byte_counts(frame_lengths)
        self.counters[peer_id].count_received(payload, framing)
        # Only the code and message are answered: the traceback would tie the Incoming to
        # the receiving frames, which hold it (`without_tracebacks`).
        return Incoming(peer_id, received_at, error=without_tracebacks(error),
                        request_id=UNKNOWN_REQUEST_ID if request_id is None else request_id)

    def reply(self, peer: bytes, request_id: int, args: Mapping[str, Any] | None = None,
              tensors: Mapping[str, Any] | None = None, policy: CodecPolicy = CodecPolicy()) -> tuple[int, int]:
        frames, payload, framing = encode_message(Header(REPLY_OP, request_id, args=dict(args or {})), tensors, policy)
        self._send(peer, frames, payload, framing)
        return payload, framing

    def reply_error(self, peer: bytes, request_id: int, error: DjinnError) -> None:
        # Messages quote what a peer sent only briefly; this bounds one that slipped through.
        header = Header(ERROR_OP, request_id, args={"code": error.code, "message": str(error)[:MAX_ERROR_CHARS]})
        frames, payload, framing = encode_message(header)
        self._send(peer, frames, payload, framing)

    def _send(self, peer: bytes, frames: list, payload: int, framing: int) -> None:
        self._socket.send(peer, zmq.SNDMORE)
        _send_frames(self._socket, frames)
        self.counters[peer].count_sent(payload, framing)

    def close(self) -> None:
        self._socket.close(linger=0)


__all__ = ["ClientConnection", "ServerSocket", "Incoming", "OutgoingTensor", "endpoint", "DEFAULT_TIMEOUT_S"]
