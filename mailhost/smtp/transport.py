"""TCP connections that send a write at once when nothing is waiting to be sent.

Twisted's TCP transport buffers every write, registers the socket for
writability (an epoll_ctl), sends on the next reactor turn, and unregisters it
(another epoll_ctl). An SMTP reply is small and the socket almost always has
room, so trying the send first saves two system calls and a reactor turn per
reply; what does not fit (or any error) takes Twisted's usual path, in order.
Measured in bench/README.md ("Where the time goes").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from twisted.internet import tcp

from mailhost.ops.logs import flush_pending


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
        super().write(data)


class EagerServer(EagerWrites, tcp.Server):
    def write(self, data: bytes) -> None:
        flush_pending()  # the log has the line about a reply before the client has the reply
        super().write(data)


class EagerClient(EagerWrites, tcp.Client):
    """For outbound SMTP: each pipelined command group and each message body is one write."""


def make_eager(transport: Any) -> None:
    """Turn a plain outbound TCP transport into an EagerClient (TLS-wrapped or other ones are left alone).

    The connector builds the tcp.Client itself, so the class is switched on the
    instance once connected; EagerClient adds no state of its own."""
    if type(transport) is tcp.Client:
        transport.__class__ = EagerClient


def send_eagerly(port: Any) -> None:
    """Make a listening TCP port's new connections EagerServer ones (other ports are left alone)."""
    if isinstance(port, tcp.Port) and port.transport is tcp.Server:
        port.transport = EagerServer
