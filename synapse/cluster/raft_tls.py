"""Mutual TLS on the Raft port: connections that run over ``ssl``, in addition to the Fernet
sealing with the cluster secret (cluster/DESIGN.md, "TLS on the Raft port"); the transport
that uses them is ``raft_transport.py``.

PySyncObj drives plain non-blocking sockets from its poller: it calls ``send`` and ``recv``
until they raise ``EAGAIN``, and treats any other error as a dead connection. A non-blocking
``SSLSocket`` says "try later" with ``SSLWantReadError``/``SSLWantWriteError`` instead, so
``TlsSocket`` turns those into ``EAGAIN``. PySyncObj reads until ``EAGAIN``, so bytes that
OpenSSL has decrypted but the poller cannot see are always drained. The handshake needs no
step of its own: OpenSSL performs it inside the first reads and writes.

An outgoing socket is wrapped only once its TCP connection is up (PySyncObj starts the
connection itself, non-blocking): ``ssl`` decides at wrap time whether a socket is
connected, and one wrapped mid-connect would send in clear. Both sides present the node's
certificate and verify the other's against the cluster CA; the client side also checks the
peer's certificate names the address it dialled.
"""

from __future__ import annotations

import errno
import socket
import ssl
from pathlib import Path


class TlsSocket:
    """A socket for PySyncObj's TcpConnection that speaks TLS underneath."""

    def __init__(self, raw: socket.socket, context: ssl.SSLContext, server_side: bool,
                 server_hostname: str | None = None) -> None:
        self._raw: socket.socket | None = raw
        self._tls: ssl.SSLSocket | None = None
        self._context, self._server_side, self._hostname = context, server_side, server_hostname

    def _ssl(self) -> ssl.SSLSocket:
        if self._tls is None:
            # The TCP connection is up by the time PySyncObj sends or reads.
            self._tls = self._context.wrap_socket(self._raw, server_side=self._server_side,
                                                  do_handshake_on_connect=False,
                                                  server_hostname=self._hostname)
            self._raw = None
        return self._tls

    def send(self, data: bytes) -> int:
        try:
            return self._ssl().send(data)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError(errno.EAGAIN, "TLS: try again when the socket is ready") from None

    def recv(self, size: int) -> bytes:
        try:
            return self._ssl().recv(size)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError(errno.EAGAIN, "TLS: try again when the socket is ready") from None

    def __getattr__(self, name: str):
        # fileno, getsockopt, setsockopt, close: the same descriptor before and after wrapping.
        return getattr(self._tls if self._tls is not None else self._raw, name)


def contexts(cert: Path, key: Path, ca: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts for mutual TLS between nodes: each presents ``cert``, each
    requires the other's certificate signed by ``ca``."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the peer and its name
    for ctx in (server, client):
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(cert), str(key))
        ctx.load_verify_locations(str(ca))
    server.verify_mode = ssl.CERT_REQUIRED
    return server, client
