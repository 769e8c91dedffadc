"""TCP connections that send a write at once when nothing is waiting to be sent.

Twisted's TCP transport buffers every write, registers the socket for
writability (an epoll_ctl), sends on the next reactor turn, and unregisters it
(another epoll_ctl). An SMTP reply is small and the socket almost always has
room, so trying the send first saves two system calls and a reactor turn per
reply; what does not fit (or any error) takes Twisted's usual path, in order.
Measured in bench/README.md ("Where the time goes").

This module is mailhost's one seam into Twisted's TCP internals: no other module
reads a private attribute of a Twisted transport or port. What it relies on
(twisted.internet.abstract.FileDescriptor and twisted.internet.tcp, checked with
Twisted 24.3 to 26.x; `internals_present()` checks them at import):

- `FileDescriptor.dataBuffer` and `.offset`: the bytes doWrite is sending and how
  far it got. `offset == len(dataBuffer)` means nothing is half sent.
- `FileDescriptor._tempDataBuffer`: writes buffered since the last doWrite. Empty,
  with the above, means nothing waits, so a send now keeps the order.
- `FileDescriptor._writeDisconnected`: loseWriteConnection() was called; the
  bytes must not go out.
- `tcp.Connection.socket`, `.TLS`, `.connected`, `.disconnecting`: the socket to
  send on, and whether writes go through the TLS layer (then never straight to
  the socket) or the connection is closing.
- `tcp.Port.transport`: the class a listening port builds each accepted connection
  with (tcp.Server); send_eagerly() sets it to EagerServer.
- A tcp.Server's class: a connection handed over with the reactor's
  adoptStreamConnection (mailhost.multiproc.accept) is a plain tcp.Server;
  make_eager_server() switches `__class__` on it, as make_eager() does for a client.
- A tcp.Client's class: the connector builds a plain tcp.Client with no way to
  choose the class, so make_eager() switches `__class__` on the instance once it
  is connected (EagerClient adds no state of its own, only methods).

The plain reference is Twisted's own tcp.Server and tcp.Client, unchanged: with
MAILHOST_PLAIN_TCP=1 in the environment (read once, at import), after
`use_plain_transport()`, or when `internals_present()` finds Twisted changed,
send_eagerly() and make_eager() leave every port and transport as Twisted made
it. tests/smtp/test_transport.py runs one exchange through both and checks
they deliver the same bytes in the same order.

The server's `before_write` hook (mailhost.service passes the log's
flush_pending) runs before each eager write, so the log has the line about a
reply before the client has the reply. Twisted's plain transport needs no hook:
it sends on the next reactor turn, after the log's end-of-turn write. This module
imports nothing of mailhost's.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from twisted.internet import abstract, tcp


def internals_present() -> bool:
    """Whether the Twisted in use still has what EagerWrites reads (listed above)."""
    probe = abstract.FileDescriptor(reactor=object())  # type: ignore[arg-type]
    return (all(hasattr(abstract.FileDescriptor, name) for name in ("dataBuffer", "offset", "_writeDisconnected"))
            and isinstance(getattr(probe, "_tempDataBuffer", None), list)
            and all(hasattr(tcp.Connection, name) for name in ("TLS", "connected", "disconnecting"))
            and getattr(tcp.Port, "transport", None) is tcp.Server)


_plain = os.environ.get("MAILHOST_PLAIN_TCP", "") not in ("", "0") or not internals_present()


def use_plain_transport(plain: bool = True) -> None:
    """From now on, Twisted's own transports (True) or the eager ones (False) for new
    ports and connections; ports switched already keep their class."""
    global _plain
    _plain = plain


def plain_transport() -> bool:
    return _plain


class EagerWrites:
    """Mixed into a tcp.Connection subclass: try the send before buffering."""

    _cork: list[bytes] | None = None

    @contextmanager
    def corked(self) -> Iterator[None]:
        """Hold the writes made inside the block and send them together at its end:
        a message's body and the next message's pipelined commands in one send."""
        if self._cork is not None:
            yield
            return
        self._cork = []
        try:
            yield
        finally:
            held, self._cork = self._cork, None
            if held:
                self.write(b"".join(held))

    def write(self, data: bytes) -> None:
        if self._cork is not None:
            self._cork.append(data)
            return
        if (data and self.connected and not self.disconnecting and not self._writeDisconnected and not self.TLS
                and self.offset == len(self.dataBuffer) and not self._tempDataBuffer
                and isinstance(data, bytes)):
            try:
                sent = self.socket.send(data)
            except OSError:
                sent = 0  # EAGAIN, or an error doWrite will meet and report the usual way
            if sent == len(data):
                return
            data = data[sent:]
        super().write(data)  # type: ignore[misc]

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        """Through write(), so that a sequence keeps its place among corked and eager writes."""
        self.write(b"".join(iovec))

    # What EagerWrites reads of the tcp.Connection it is mixed into (see the module's docstring).
    connected: int
    disconnecting: int
    _writeDisconnected: bool
    TLS: bool
    offset: int
    dataBuffer: bytes
    _tempDataBuffer: list[bytes]
    socket: Any


class EagerServer(EagerWrites, tcp.Server):
    """For inbound SMTP: each reply goes out at once when the socket has room."""

    before_write: Callable[[], None] | None = None  # set on a subclass by server_class()

    def write(self, data: bytes) -> None:
        if self.before_write is not None:
            self.before_write()
        super().write(data)


class EagerClient(EagerWrites, tcp.Client):
    """For outbound SMTP: each pipelined command group and each message body is one write."""


@functools.lru_cache(maxsize=None)
def server_class(before_write: Callable[[], None] | None = None) -> type[EagerServer]:
    """EagerServer, calling `before_write` (with no arguments) before each write."""
    if before_write is None:
        return EagerServer
    return type("EagerServer", (EagerServer,), {"before_write": staticmethod(before_write)})


def make_eager(transport: Any) -> None:
    """Turn a plain outbound TCP transport into an EagerClient (TLS-wrapped or other ones are
    left alone, and all of them with the plain transport). Called once connected."""
    if not _plain and type(transport) is tcp.Client:
        transport.__class__ = EagerClient


def make_eager_server(transport: Any, before_write: Callable[[], None] | None = None) -> None:
    """Turn a plain accepted TCP transport into an EagerServer calling `before_write` (TLS-wrapped,
    unix or other ones are left alone, and all of them with the plain transport)."""
    if not _plain and type(transport) is tcp.Server:
        transport.__class__ = server_class(before_write)


def send_eagerly(port: Any, before_write: Callable[[], None] | None = None) -> None:
    """Make a listening TCP port's new connections EagerServer ones, calling `before_write` before
    each write (other ports are left alone, and all of them with the plain transport)."""
    if not _plain and isinstance(port, tcp.Port) and port.transport is tcp.Server:
        port.transport = server_class(before_write)
