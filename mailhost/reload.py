"""SIGHUP: read the TLS pair and the users files again, without dropping a session.

New TLS connections get the new pair (tls.ServerTLS hands out its newest
context); sessions already running keep theirs. Users files are re-read at
once, so a new password or a removed user counts from the next AUTH or RCPT.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.application import service
from twisted.logger import Logger

from mailhost.mailbox import LocalDomains
from mailhost.tls import ServerTLS, TLSSetupError

log = Logger(namespace="mailhost.reload")


class ReloadOnHangup(service.Service):
    def __init__(self, tls: ServerTLS, domains: LocalDomains, reactor: Any, signer: Any = None) -> None:
        self._tls = tls
        self._domains = domains
        self._reactor = reactor
        self._signer = signer
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._on_signal)

    def stopService(self) -> None:
        super().stopService()
        signal.signal(signal.SIGHUP, self._previous if self._previous is not None else signal.SIG_DFL)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # A signal handler may interrupt the reactor anywhere: do the work as a reactor call.
        self._reactor.callFromThread(self.reload)

    def reload(self) -> None:
        self._domains.reload_users()
        if self._signer is not None:
            self._signer.reload()
        try:
            self._tls.reload()
        except TLSSetupError as e:
            log.error("reload: {error}; new connections keep the previous TLS pair", error=str(e))
        else:
            log.info("reloaded: TLS pair {cert} and the users files", cert=str(self._tls.cert_path))
