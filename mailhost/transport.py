"""TCP connections that send a write at once when nothing is waiting to be sent.

Twisted's TCP transport buffers every write, registers the socket for
writability (an epoll_ctl), sends on the next reactor turn, and unregisters it
(another epoll_ctl). An SMTP reply is small and the socket almost always has
room, so trying the send first saves two system calls and a reactor turn per
reply; what does not fit (or any error) takes Twisted's usual path, in order.
Measured in bench/README.md ("Where the time goes").
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


class EagerWrites:
    """Mixed into a tcp.Connection subclass: try the send before buffering."""

    def write(self, data: bytes) -> None:
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
    pass


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
