"""Accepting on a listening socket the processes of `[server] workers` share: one
connection per wake-up, so that a burst of connections spreads over the processes.

Twisted's listening port accepts every pending connection each time the socket
is readable (tcp.Port.doRead, up to its own adaptive `numberAccepts`). With
several processes waiting on one socket, the first to wake takes the whole
burst: 10 connections arriving together all went to one process in most runs
(issue 15). Here each process takes at most ACCEPTS_PER_WAKEUP connections and
goes back to its reactor; the socket is still readable, so every waiting process
comes back for the next one, and a busy process (a longer reactor turn) takes
fewer: the split follows the load, as with Postfix's smtpd processes. And a
process with more sessions open than another (mailhost.multiproc.loads) leaves
the connection to that one for YIELD_SECONDS, taking it only if it is still
waiting then: the process whose reactor comes round first does not take the
next connection too, whether the connections come in a burst or one by one.

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

from mailhost.multiproc.loads import SessionLoads

log = Logger(namespace="mailhost.accept")

# One per wake-up, as smtpd: more lets the first process awake take a burst again.
ACCEPTS_PER_WAKEUP = 1
# A process with more sessions open than another leaves it a new connection this long (the
# other woke for it too, maybe not yet running), then takes it if nobody has. bench/campaign.py's
# ten connections: with one per wake-up and a pause after each one taken while more waited,
# 5/5 in 6 of 10 runs (6/4 in two, all ten to one process in two); with this, 5/5 in 10 of 10.
YIELD_SECONDS = 0.001
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
    `adopted` sees each new connection's transport (mailhost.smtp.transport makes it eager).
    `loads` has every process's count of open sessions; `sessions()` is this process's."""

    def __init__(self, port: Any, factory: IProtocolFactory, reactor: Any, loads: SessionLoads,
                 sessions: Callable[[], int], adopted: Callable[[Any], None] = lambda transport: None) -> None:
        self.port = port
        self.reactor = reactor
        self._factory = _Remember(factory)
        self._adopted = adopted
        self._loads = loads
        self._sessions = sessions
        self._socket: socket.socket | None = None
        self._waiting: Any = None
        self._pause: Any = None
        self._yielded = False  # the connection waiting now was left to another process once: take it

    def start(self) -> None:
        fd = self.port.fileno()
        probe = socket.socket(fileno=fd)  # to read its family and type; not ours to close
        try:
            self._socket = probe.dup()
        finally:
            probe.detach()
        self._socket.setblocking(False)
        self._waiting = select.poll()  # is a connection still waiting on the socket?
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
        if self._leave_to_another():
            return
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
        self._loads.publish(self._sessions())

    def _leave_to_another(self) -> bool:
        """Another accepting process has fewer sessions open: the waiting connection is its to
        take (it woke for it too). This one stops reading for YIELD_SECONDS and takes it then
        if it is still waiting (the other busy or stopped): a connection waits a millisecond
        at most for the balance, and only when the processes are out of balance."""
        if self._yielded:
            self._yielded = False
            return False
        fewest = self._loads.fewest_elsewhere()
        mine = self._sessions()
        if fewest is None or mine <= fewest or self._socket is None or self._pause is not None:
            return False
        self.reactor.removeReader(self)
        self._pause = self.reactor.callLater(YIELD_SECONDS, self._take_if_left)
        return True

    def _take_if_left(self) -> None:
        self._pause = None
        if self._socket is None:
            return
        self._yielded = bool(self._waiting.poll(0))  # still waiting: nobody else took it
        self.reactor.addReader(self)

    def _rest(self, error: OSError) -> None:
        log.warn("cannot accept on {where}: {error}; pausing {pause:g}s", where=str(self.port.getHost()),
                 error=error.strerror, pause=PAUSE_SECONDS)
        self.reactor.removeReader(self)
        self._pause = self.reactor.callLater(PAUSE_SECONDS, self._resume)

    def _resume(self) -> None:
        self._pause = None
        if self._socket is not None:
            self.reactor.addReader(self)


def balance(port: Any, factory: IProtocolFactory, reactor: Any, loads: SessionLoads, sessions: Callable[[], int],
            adopted: Callable[[Any], None] = lambda transport: None) -> BalancedAccepts:
    """Take over `port`'s accepting (see the module's docstring); stop() before the port stops listening."""
    accepts = BalancedAccepts(port, factory, reactor, loads, sessions, adopted)
    accepts.start()
    return accepts
