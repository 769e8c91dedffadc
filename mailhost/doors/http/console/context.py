"""What the console's pages work with (the daemon's parts, passed in) and what a page returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred

from mailhost.doors.http.console.sessions import SessionStore
from mailhost.feedback.complaints import ComplaintRate
from mailhost.feedback.events import EventLog
from mailhost.feedback.suppression import SuppressionList
from mailhost.feedback.traffic import Traffic
from mailhost.local.auth import AuthSlowdown
from mailhost.local.mailbox import LocalDomains
from mailhost.queue.operations import PaceReport, QueueOperations
from mailhost.queue.spool import Spool


@dataclass
class ConsoleContext:
    portal: Portal  # checks passwords as SMTP AUTH does (mailhost.local.auth)
    domains: LocalDomains  # whose users-file entry says admin
    slowdown: AuthSlowdown  # failed logins per client address, as AUTH's
    spool: Spool
    queue: QueueOperations  # what `mailhost queue hold|release|flush|delete` reaches over the control socket
    paces: PaceReport
    suppression: SuppressionList
    events: EventLog | None  # the attempts of a message
    traffic: Traffic
    complaints: ComplaintRate | None
    run: Callable[..., Deferred[Any]]  # blocking work on the daemon's disk threads
    reactor: Any
    sessions: SessionStore


@dataclass
class Response:
    body: bytes = b""
    code: int = 200
    content_type: bytes = b"text/html; charset=utf-8"
    headers: dict[bytes, bytes] = field(default_factory=dict)


def redirect(location: str) -> Response:
    """303 See Other: after a POST, the browser GETs the page (a reload does not repeat the POST)."""
    return Response(b"", 303, headers={b"Location": location.encode("ascii")})


class Refused(Exception):
    """A request the console will not serve: its code and one line for the page."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text
