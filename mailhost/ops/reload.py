"""SIGHUP: read the configuration, the TLS pair, the users files and the DKIM keys again,
without dropping a session.

Each component gets its own narrow settings and is rebuilt when they changed (the
`apply` callable the daemon hands in does that, section by section: domains, limits,
inbound, dkim, bounces, relay, throttles, queue, webhooks: their secret files re-read, the
unsubscribe settings); what can only change at a restart (listeners, server.workers,
state_dir, metrics, http.endpoint) is named in one log line. A
configuration with an error (a bad key, an unreadable DKIM key file) is logged and the
running one kept whole: nothing is half-applied. New TLS connections get the new pair
(tls.ServerTLS hands out its newest context); sessions already running keep theirs.
Users files are re-read at once, so a new password or a removed user counts from the
next AUTH or RCPT.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.logger import Logger

from mailhost.config import Config, ConfigError, load
from mailhost.ops.tls import ServerTLS, TLSSetupError

log = Logger(namespace="mailhost.reload")

# Sections a running daemon cannot take over: they wait for the next restart.
RESTART_ONLY = ("listeners", "metrics", "http.endpoint")


class ReloadError(Exception):
    """A new configuration that cannot be applied (a DKIM key that cannot sign, ...)."""


class ReloadOnHangup(service.Service):
    """`apply(new_config)` rebuilds what changed and returns the names of the sections it
    applied; it raises ReloadError (or ConfigError) without changing anything when the new
    configuration cannot be used. `running()` is the configuration in force."""

    def __init__(self, tls: ServerTLS, reactor: Any, running: Callable[[], Config],
                 apply: Callable[[Config], list[str]], reload_users: Callable[[], None]) -> None:
        self._tls = tls
        self._reactor = reactor
        self._running = running
        self._apply = apply
        self._reload_users = reload_users
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
        self._reload_config()
        self._reload_users()
        try:
            self._tls.reload(pem)
        except TLSSetupError as e:
            log.error("reload: {error}; new connections keep the previous TLS pair", error=str(e))
        else:
            log.info("reloaded: TLS pair {cert} and the users files", cert=str(self._tls.cert_path))
        for hook in self.after:
            hook()

    def _reload_config(self) -> None:
        running = self._running()
        try:
            config = load(running.path)
            applied = self._apply(config)
        except (ConfigError, ReloadError) as e:
            log.error("reload: {error}; keeping the running configuration", error=str(e))
            return
        waiting = changed_sections(running, config, RESTART_ONLY)
        if config.server.workers != running.server.workers:
            waiting.append("server.workers")  # the queue's shards follow the count the daemon started with
        if config.server.state_dir != running.server.state_dir:
            waiting.append("server.state_dir")
        if waiting:
            log.warn("reload: {names} changed; those take effect at the next restart", names=", ".join(waiting))
        log.info("reloaded {path}: {applied}", path=str(running.path),
                 applied="changed " + ", ".join(applied) if applied else "no change")


def changed_sections(old: Config, new: Config, names: tuple[str, ...]) -> list[str]:
    """The names among `names` (Config attributes, or "server.x") whose values differ."""
    def value(config: Config, name: str) -> Any:
        section, _, key = name.partition(".")
        found = getattr(config, section)
        return getattr(found, key) if key else found
    return [name for name in names if value(old, name) != value(new, name)]
