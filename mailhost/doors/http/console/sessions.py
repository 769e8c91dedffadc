"""Server-side sessions of the web console, each with its CSRF token.

A session id is 32 random bytes (base64url); the browser holds only the id, in a cookie
that is `Secure; HttpOnly; SameSite=Strict; Path=/console`. The server keeps who it is,
its CSRF token (the synchronizer token pattern: every form carries it, every POST must
bring it back) and when it expires: IDLE_SECONDS after its last use, LIFETIME_SECONDS
after login whatever happens. A login form gets a session of its own with no user, so the
login POST is checked like any other; a successful login replaces it with a new id (no
fixation). Sessions live in the daemon's memory only: a restart logs everyone out.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field

from twisted.internet.interfaces import IReactorTime

COOKIE = b"mailhost_console"
IDLE_SECONDS = 30 * 60.0
LIFETIME_SECONDS = 12 * 3600.0
LOGIN_FORM_SECONDS = 10 * 60.0  # a login form's session (no user yet)
MAX_SESSIONS = 1000  # past this, the ones used longest ago go first


@dataclass
class Session:
    id: str
    user: str  # "" while only the login form is open
    csrf: str
    created: float
    last_used: float
    notice: list[str] = field(default_factory=list)  # shown once on the next page (after a POST's redirect)

    def csrf_matches(self, token: str | bytes | None) -> bool:
        """Whether `token` is this session's CSRF token (constant-time)."""
        if token is None:
            return False
        given = token.encode("ascii", "replace") if isinstance(token, str) else token
        return hmac.compare_digest(given, self.csrf.encode("ascii"))


class SessionStore:
    def __init__(self, clock: IReactorTime, idle: float = IDLE_SECONDS, lifetime: float = LIFETIME_SECONDS,
                 max_sessions: int = MAX_SESSIONS) -> None:
        self._clock = clock
        self.idle = idle
        self.lifetime = lifetime
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}

    def new(self, user: str = "") -> Session:
        now = self._clock.seconds()
        session = Session(secrets.token_urlsafe(32), user, secrets.token_urlsafe(32), now, now)
        self._sessions[session.id] = session
        if len(self._sessions) > self.max_sessions:
            self._prune(now)
        return session

    def get(self, session_id: str | bytes | None) -> Session | None:
        """The live session of this id (its idle timer restarted), or None."""
        if not session_id:
            return None
        if isinstance(session_id, bytes):
            session_id = session_id.decode("ascii", "replace")
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self._clock.seconds()
        if self._expired(session, now):
            del self._sessions[session.id]
            return None
        session.last_used = now
        return session

    def drop(self, session: Session) -> None:
        self._sessions.pop(session.id, None)

    def __len__(self) -> int:
        return len(self._sessions)

    def _expired(self, session: Session, now: float) -> bool:
        lifetime = self.lifetime if session.user else min(self.lifetime, LOGIN_FORM_SECONDS)
        return now - session.last_used >= self.idle or now - session.created >= lifetime

    def _prune(self, now: float) -> None:
        self._sessions = {i: s for i, s in self._sessions.items() if not self._expired(s, now)}
        if len(self._sessions) > self.max_sessions:
            # Login forms first (anyone can open those), then the longest unused.
            ranked = sorted(self._sessions.values(), key=lambda s: (bool(s.user), s.last_used))
            for session in ranked[:len(self._sessions) - self.max_sessions]:
                del self._sessions[session.id]
