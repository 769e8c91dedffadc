"""SIGHUP: read the configuration, the TLS pair, the users files and the DKIM
keys again, without dropping a session.

Domains, aliases, catch-alls, limits and the certificate paths take effect
for new sessions; a configuration with an error is logged and the running
one kept. Listeners, relay and queue settings need a restart (logged when
they changed). New TLS connections get the new pair (tls.ServerTLS hands out
its newest context); sessions already running keep theirs. Users files are
re-read at once, so a new password or a removed user counts from the next
AUTH or RCPT.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.logger import Logger

from mailhost.config import ConfigError, load
from mailhost.local.mailbox import LocalDomains
from mailhost.ops.tls import ServerTLS, TLSSetupError, tls_pair_paths

log = Logger(namespace="mailhost.reload")


class ReloadOnHangup(service.Service):
    def __init__(self, tls: ServerTLS, domains: LocalDomains, reactor: Any, signer: Any = None,
                 context: Any = None) -> None:
        self._tls = tls
        self._domains = domains
        self._reactor = reactor
        self._signer = signer
        self._context = context  # smtp.server.ServerContext: new sessions read its config
        self._previous: Any = None
        self.after: list[Callable[[], object]] = []  # called after each reload (the worker processes)

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._on_signal)

    def stopService(self) -> None:
        super().stopService()
        signal.signal(signal.SIGHUP, self._previous if self._previous is not None else signal.SIG_DFL)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # A signal handler may interrupt the reactor anywhere: do the work as a reactor call.
        self._reactor.callFromThread(self.reload)

    def reload(self, pem: tuple[bytes, bytes] | None = None) -> None:
        """`pem`: the TLS pair's bytes instead of the files (a worker gets them from the main process)."""
        if self._context is not None:
            self._reload_config()
        self._domains.reload_users()
        if self._signer is not None:
            self._signer.reload()
        try:
            self._tls.reload(pem)
        except TLSSetupError as e:
            log.error("reload: {error}; new connections keep the previous TLS pair", error=str(e))
        else:
            log.info("reloaded: TLS pair {cert} and the users files", cert=str(self._tls.cert_path))
        for hook in self.after:
            hook()

    def _reload_config(self) -> None:
        running = self._context.config
        try:
            config = load(running.path)
        except ConfigError as e:
            log.error("reload: {error}; keeping the running configuration", error=str(e))
            return
        self._domains.replace(config)
        self._context.config = config
        self._tls.cert_path, self._tls.key_path = tls_pair_paths(config)
        changed = [name for name in ("listeners", "relay", "queue", "metrics", "throttles")
                   if getattr(config, name) != getattr(running, name)]
        if config.server.workers != running.server.workers:
            changed.append("server.workers")  # the queue's shards follow the count the daemon started with
        if changed:
            log.warn("reload: {names} changed; those take effect at the next restart", names=", ".join(changed))
        log.info("reloaded {path}: domains {domains}", path=str(running.path),
                 domains=",".join(d.name for d in config.domains))
