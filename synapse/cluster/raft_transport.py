"""The Raft port's transport: PySyncObj's TCP transport with every connection's socket wrapped
— in TLS when the node has certificates (``raft_tls.py``), and always in a ``FrameGuard``.

PySyncObj frames each message as a 4-byte length and the bytes, and buffers a frame until all
of it has arrived: a peer (or anyone who reaches the port, before the secret is checked) that
announces a 2 GiB frame has the node hold whatever it sends for it. The guard reads the
lengths as the bytes go by and drops the connection at the first one past ``MAX_FRAME_BYTES``
or below zero, before its bytes are buffered.
"""

from __future__ import annotations

import errno
import ssl
import struct

from pysyncobj.transport import TCPTransport

from synapse.cluster.raft_tls import TlsSocket

# The largest frame a node sends is one AppendEntries batch — entries of up to 4 MiB (group
# commit) over an HTTP body of at most ~1.1 MiB each, msgpack'd, pickled and Fernet-sealed
# (base64: x4/3) — or one 64 KiB chunk of a dump. 64 MiB leaves room to spare.
MAX_FRAME_BYTES = 64 << 20
_LENGTH = struct.Struct("i")  # PySyncObj's: native byte order, signed


class FrameGuard:
    """A socket for PySyncObj's TcpConnection that refuses frames announcing an absurd length."""

    def __init__(self, sock, limit: int = MAX_FRAME_BYTES) -> None:
        self._sock, self._limit = sock, limit
        self._header = b""  # the part of the next frame's length received so far
        self._left = 0  # bytes of the current frame still to come

    def recv(self, size: int) -> bytes:
        data = self._sock.recv(size)
        at, end = 0, len(data)
        while at < end:
            if self._left:
                step = min(self._left, end - at)
                self._left -= step
                at += step
                continue
            take = min(_LENGTH.size - len(self._header), end - at)
            self._header += data[at:at + take]
            at += take
            if len(self._header) == _LENGTH.size:
                (length,) = _LENGTH.unpack(self._header)
                self._header = b""
                if not 0 <= length <= self._limit:
                    # PySyncObj treats any socket error but EAGAIN as a dead connection.
                    raise OSError(errno.EMSGSIZE, f"Raft frame of {length} bytes refused (the limit is {self._limit})")
                self._left = length
        return data

    def __getattr__(self, name: str):
        # send, fileno, getsockopt, setsockopt, close: the wrapped socket's.
        return getattr(self._sock, name)


def transport_class(tls: tuple[ssl.SSLContext, ssl.SSLContext] | None = None) -> type[TCPTransport]:
    """PySyncObj's TCP transport with each connection, incoming and outgoing, behind a
    ``FrameGuard`` — over TLS when ``tls`` holds the (server, client) contexts."""

    class GuardedTransport(TCPTransport):
        def _onNewIncomingConnection(self, conn):
            sock = conn._TcpConnection__socket
            if tls is not None:
                sock = TlsSocket(sock, tls[0], server_side=True)
            conn._TcpConnection__socket = FrameGuard(sock)
            super()._onNewIncomingConnection(conn)

        def _connectIfNecessarySingle(self, node):
            connecting = super()._connectIfNecessarySingle(node)
            conn = self._connections.get(node)
            sock = conn._TcpConnection__socket if conn is not None else None
            # A reconnect makes a new socket: wrap each new one once.
            if connecting and sock is not None and not isinstance(sock, FrameGuard):
                if tls is not None:
                    sock = TlsSocket(sock, tls[1], server_side=False, server_hostname=node.host)
                conn._TcpConnection__socket = FrameGuard(sock)
            return connecting

    return GuardedTransport
