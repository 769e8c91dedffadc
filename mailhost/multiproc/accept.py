"""Accepting on a listening socket the processes of `[server] workers` share: one
connection per wake-up, so that a burst of connections spreads over the processes.

Twisted's listening port accepts every pending connection each time the socket
is readable (tcp.Port.doRead, up to its own adaptive `numberAccepts`). With
several processes waiting on one socket, the first to wake takes the whole
burst: 10 connections arriving together all went to one process in most runs
(issue 15). Here each process takes at most ACCEPTS_PER_WAKEUP connections and
goes back to its reactor; the socket is still readable, so every waiting process
comes back for the next one, and a busy process (a longer reactor turn) takes
fewer: the split follows the load, as with Postfix's smtpd processes. After each
connection taken with more waiting, a process also sits out SHARE_PAUSE_SECONDS,
so that the one whose reactor comes round first does not take the next one too.

Why not SO_REUSEPORT (one listening socket per process, the kernel picking one
by a hash of the addresses)? Its queues are per process: connections hashed to
a process that stalls (a long reactor turn, SIGSTOP) wait there while others
idle, and those queued on the socket of a worker that dies are reset (or wait
for its restart, RESTART_DELAY and more, if the main process keeps the socket).
It does not exist for unix sockets, nor for a socket systemd hands over, and
the main process would have to parse and bind every endpoint itself (interface,
IPv6, backlog) instead of Twisted's endpoints. One shared queue loses nothing
when a process goes: the others take what waits.

How: Twisted's port keeps the socket (it bound it, or adopted it, and it closes
it and removes a unix socket's file at stopListening); it only stops reading it
(`stopReading`, public), and this reader accepts on a copy of the descriptor and
hands each connection to the reactor with IReactorSocket.adoptStreamConnection,
which builds the same transport (tcp.Server, unix.Server) the port would.
"""

from __future__ import annotations

import errno
import select
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IProtocolFactory, IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

log = Logger(namespace="mailhost.accept")

# One per wake-up, as smtpd: more lets the first process awake take a burst again.
ACCEPTS_PER_WAKEUP = 1
# After each connection it takes with more waiting (a burst), a process stops accepting this
# long, so that the others (woken for the same burst, maybe not yet running) take the next
# ones. With one per wake-up alone, the process whose reactor turn came round first took 6
# of 10 connections arriving together in most runs (bench/campaign.py); with this pause, 5
# and 5. During a burst it bounds a process's accepts to a thousand a second; the listen
# backlog holds the rest meanwhile.
SHARE_PAUSE_SECONDS = 0.001
# Out of descriptors or memory: stop accepting here for this long (the others go on).
PAUSE_SECONDS = 0.5
_PAUSE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class _Remember:
    """A factory that passes through, keeping the protocol it built last (adoptStreamConnection
    returns nothing by its interface)."""

    def __init__(self, factory: IProtocolFactory) -> None:
        self.factory = factory
        self.built: Any = None

    def buildProtocol(self, addr: Any) -> Any:
        self.built = self.factory.buildProtocol(addr)
        return self.built


@implementer(IReadDescriptor)
class BalancedAccepts:
    """Accepts on `port`'s socket instead of `port`, ACCEPTS_PER_WAKEUP at a time, for `factory`.
    `adopted` sees each new connection's transport (mailhost.smtp.transport makes it eager)."""

    def __init__(self, port: Any, factory: IProtocolFactory, reactor: Any,
                 adopted: Callable[[Any], None] = lambda transport: None) -> None:
        self.port = port
        self.reactor = reactor
        self._factory = _Remember(factory)
        self._adopted = adopted
        self._socket: socket.socket | None = None
        self._waiting: Any = None
        self._pause: Any = None

    def start(self) -> None:
        fd = self.port.fileno()
        probe = socket.socket(fileno=fd)  # to read its family and type; not ours to close
        try:
            self._socket = probe.dup()
        finally:
            probe.detach()
        self._socket.setblocking(False)
        self._waiting = select.poll()  # are more connections waiting on the socket?
        self._waiting.register(self._socket, select.POLLIN)
        self.port.stopReading()
        self.reactor.addReader(self)

    def stop(self) -> None:
        """Stop accepting and close our copy; the port still owns the socket."""
        if self._pause is not None and self._pause.active():
            self._pause.cancel()
        self._pause = None
        if self._socket is not None:
            self.reactor.removeReader(self)
            self._socket.close()
            self._socket = None

    def fileno(self) -> int:
        return self._socket.fileno() if self._socket is not None else -1

    def logPrefix(self) -> str:
        return "mailhost.accept"

    def connectionLost(self, reason: Any) -> None:
        """The reactor dropped us (it is stopping): our copy goes; the port closes the socket itself."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def doRead(self) -> None:
        taken = False
        for _ in range(ACCEPTS_PER_WAKEUP):
            if self._socket is None:
                return
            try:
                connection, _ = self._socket.accept()
            except (BlockingIOError, InterruptedError):
                break  # another process took it
            except OSError as e:
                if e.errno in _PAUSE_ERRORS:
                    self._rest(e)
                # Else the client gave up before we took it (ECONNABORTED, EPROTO, ...): nothing to do.
                break
            with connection:
                connection.setblocking(False)
                # It copies the descriptor: ours closes at the end of the block. Whatever it
                # raises stays here: an exception out of doRead would make the reactor drop
                # this reader, and this process would accept nothing more.
                try:
                    self.reactor.adoptStreamConnection(connection.fileno(), connection.family, self._factory)
                except OSError:
                    continue  # the client reset it before we took it (getpeername: ENOTCONN)
                except Exception:
                    log.failure("cannot start a session on {where}", where=str(self.port.getHost()))
                    continue
            built, self._factory.built = self._factory.built, None
            if built is not None and built.transport is not None:
                self._adopted(built.transport)
            taken = True
        if taken:
            self._take_turns()

    def _take_turns(self) -> None:
        """More connections waiting (a burst): leave the next ones to the other processes for
        SHARE_PAUSE_SECONDS. None waiting: no pause (mail arriving a connection at a time has
        nobody to share with; a pause after every connection measured 7% slower on inbound.py's
        20 sessions x 1 msg/conn, if within this machine's noise)."""
        if self._socket is not None and self._pause is None and self._waiting.poll(0):
            self.reactor.removeReader(self)
            self._pause = self.reactor.callLater(SHARE_PAUSE_SECONDS, self._resume)

    def _rest(self, error: OSError) -> None:
        log.warn("cannot accept on {where}: {error}; pausing {pause:g}s", where=str(self.port.getHost()),
                 error=error.strerror, pause=PAUSE_SECONDS)
        self.reactor.removeReader(self)
        self._pause = self.reactor.callLater(PAUSE_SECONDS, self._resume)

    def _resume(self) -> None:
        self._pause = None
        if self._socket is not None:
            self.reactor.addReader(self)


def balance(port: Any, factory: IProtocolFactory, reactor: Any,
            adopted: Callable[[Any], None] = lambda transport: None) -> BalancedAccepts:
    """Take over `port`'s accepting (see the module's docstring); stop() before the port stops listening."""
    accepts = BalancedAccepts(port, factory, reactor, adopted)
    accepts.start()
    return accepts
