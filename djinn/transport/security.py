"""Who may talk to a server: ZeroMQ's handshake mechanisms, checked before any message is read.

Three settings (the README's threat model says who can do what under each):

- open (NULL): anyone who reaches the port is a client.
- shared token (PLAIN): the client presents the token as its PLAIN password in the
  ZeroMQ handshake, checked by the server's ZAP handler. A peer without it never
  completes the handshake, so it can make the server buffer no message at all (an
  unauthenticated 1 GB message had been received whole before its header was refused).
  PLAIN sends the token in clear: for trusted networks. The token also travels in every
  header, checked there first (`wire.check_auth`), for servers driven without a ZAP
  handler (a bare `ServerSocket`).
- CURVE: the connection is encrypted and the server admits only the client public keys
  in its allowed directory; for untrusted networks. A token may be added on top.

Keys are ZeroMQ certificate files (`zmq.auth.create_certificates`): the server's secret
key file holds its public and secret keys; the allowed directory holds one public
`.key` file per client.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

PLAIN_USER = b"djinn"  # PLAIN carries a user name beside the password; the token is the password


@dataclass(frozen=True)
class ServerSecurity:
    token: str | None = None
    curve_secret_key_file: Path | None = None
    curve_client_keys: Path | None = None  # a directory of allowed client public keys

    def __post_init__(self):
        if (self.curve_secret_key_file is None) != (self.curve_client_keys is None):
            raise ValueError("CURVE needs both the server's secret key file and the directory of allowed "
                             "client public keys")
        if self.curve_secret_key_file is not None:
            _public, secret = zmq.auth.load_certificate(self.curve_secret_key_file)
            if secret is None:
                raise ValueError(f"{self.curve_secret_key_file} holds no secret key: pass the server's "
                                 f".key_secret file")
            if not Path(self.curve_client_keys).is_dir():
                raise ValueError(f"allowed client keys: {self.curve_client_keys} is not a directory")

    @property
    def mechanism(self) -> str:
        return "curve" if self.curve_secret_key_file else "plain" if self.token else "null"

    def authenticator(self, context: zmq.Context) -> ThreadAuthenticator | None:
        """The ZAP handler for `context`'s sockets, started; None for an open server."""
        if self.mechanism == "null":
            return None
        auth = _TokenAuthenticator(context, self.token)
        auth.start()
        if self.mechanism == "curve":
            auth.configure_curve(domain="*", location=str(self.curve_client_keys))
        else:
            auth.configure_plain(domain="*", passwords={PLAIN_USER.decode(): self.token})
        return auth

    def apply(self, sock: zmq.Socket) -> None:
        """Make `sock` (before it binds) a server of this mechanism."""
        if self.mechanism == "curve":
            public, secret = zmq.auth.load_certificate(self.curve_secret_key_file)
            sock.curve_publickey, sock.curve_secretkey = public, secret
            sock.curve_server = True
        elif self.mechanism == "plain":
            sock.plain_server = True


@dataclass(frozen=True)
class ClientSecurity:
    token: str | None = None
    curve_server_key: bytes | None = None  # the server's public key (z85)
    curve_public_key: bytes | None = None  # this client's keys (z85)
    curve_secret_key: bytes | None = None

    @classmethod
    def from_files(cls, token: str | None, server_key_file: str | Path | None,
                   client_key_file: str | Path | None) -> "ClientSecurity":
        """Keys from certificate files: the server's public one, this client's secret one."""
        if (server_key_file is None) != (client_key_file is None):
            raise ValueError("CURVE needs both the server's public key file and this client's secret key file")
        if server_key_file is None:
            return cls(token)
        server_public, _ = zmq.auth.load_certificate(server_key_file)
        public, secret = zmq.auth.load_certificate(client_key_file)
        if secret is None:
            raise ValueError(f"{client_key_file} holds no secret key: pass the client's .key_secret file")
        return cls(token, server_public, public, secret)

    def apply(self, sock: zmq.Socket) -> None:
        """Make `sock` (before it connects) a client of this mechanism."""
        if self.curve_server_key is not None:
            sock.curve_serverkey = self.curve_server_key
            sock.curve_publickey, sock.curve_secretkey = self.curve_public_key, self.curve_secret_key
        elif self.token:
            sock.plain_username, sock.plain_password = PLAIN_USER, self.token.encode()


class _TokenAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler, comparing PLAIN passwords in constant time."""

    def __init__(self, context: zmq.Context, token: str | None):
        super().__init__(context)
        self._token = (token or "").encode()

    def _authenticate_plain(self, domain: str, username: str, password: str) -> tuple[bool, bytes]:
        if username == PLAIN_USER.decode() and hmac.compare_digest(password.encode(), self._token):
            return True, b"OK"
        return False, b"wrong user or token"
