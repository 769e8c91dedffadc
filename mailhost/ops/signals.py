"""SIGTERM and SIGINT that stop the reactor without doing anything in the signal handler.

Twisted's own handlers log "Received SIGTERM, shutting down." from inside the Python signal
handler, which runs between two bytecodes of whatever the main thread was doing. When that
was writing a log line (mailhost.ops.logs.BatchedStream holds a lock while it writes), the
handler's log line waited for that lock forever: the process hung until SIGKILL (seen in
about one stop in 26 of a busy daemon, main process or worker). And a second SIGTERM (systemd's
KillMode=control-group signals the whole group, then the main process signals its workers
again) made Twisted call reactor.stop() twice: a critical ReactorNotRunning traceback.

Here the handler only schedules a reactor call (as ReloadOnHangup does for SIGHUP); the line
is logged and the reactor stopped from the reactor thread, once. The process then exits with
status 0 (Twisted's handlers made twistd end by re-raising the signal, status -15).
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger

log = Logger(namespace="mailhost.service")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stop_reactor(reactor: Any) -> None:
    """reactor.stop(), unless a stop is already under way: `reactor.running` stays true while
    the shutdown triggers run, so it cannot tell; the exception can."""
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass


class StopOnSignal:
    """Replaces the reactor's SIGTERM/SIGINT handlers once it runs (`install_when_running`)."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._stopping = False

    def install_when_running(self) -> None:
        # After the reactor's own handlers, which it installs as it starts running.
        self._reactor.callWhenRunning(self.install)

    def install(self) -> None:
        for number in STOP_SIGNALS:
            # A signal left to the default action or ignored stays so (a worker ignores SIGINT:
            # Ctrl-C is for the main process, which stops the workers itself).
            if callable(signal.getsignal(number)):
                signal.signal(number, self._on_signal)

    def _on_signal(self, number: int, frame: Any) -> None:
        # Nothing else here: see the module's docstring.
        self._reactor.callFromThread(self._stop, number)

    def _stop(self, number: int) -> None:
        if self._stopping:
            return  # the group's SIGTERM and the main process's, or a second Ctrl-C
        self._stopping = True
        log.info("Received {signal}, shutting down.", signal=signal.Signals(number).name)
        stop_reactor(self._reactor)
