"""mailhost.delivery.deliverer.SessionPool: a finished connection is reused for the next message to the same
place, and closed once it has waited IDLE_REUSE_SECONDS."""

from __future__ import annotations

from twisted.internet.task import Clock

from mailhost.delivery.deliverer import IDLE_REUSE_SECONDS, SessionPool
from mailhost.delivery.routing import Hop


class FakeSession:
    def __init__(self) -> None:
        self.usable = True
        self.quitted = False
        self.aborted = False

    def quit(self) -> None:
        self.quitted = True
        self.usable = False

    def abort(self) -> None:
        self.aborted = True
        self.usable = False


HOP = Hop("mx.remote.test", ("127.0.0.5",), 25, 10)


def taken(pool: SessionPool) -> object:
    results: list = []
    pool.take(HOP, "127.0.0.5", "none", None, None).addCallback(results.append)
    return results[0]


def test_a_session_given_back_is_taken_again_then_closed_after_waiting_too_long() -> None:
    clock = Clock()
    pool = SessionPool(clock, "mail.example.test")
    first, second = FakeSession(), FakeSession()
    pool.give_back(HOP, "127.0.0.5", first)
    assert taken(pool) is first
    pool.give_back(HOP, "127.0.0.5", first)
    clock.advance(IDLE_REUSE_SECONDS - 1)
    pool.give_back(HOP, "127.0.0.5", second)
    clock.advance(1.5)  # first has waited longer than allowed, second has not
    assert first.quitted and not second.quitted
    clock.advance(IDLE_REUSE_SECONDS)
    assert second.quitted
    assert not clock.getDelayedCalls()  # nothing idle: no sweep left running


def test_close_all_quits_every_idle_session() -> None:
    clock = Clock()
    pool = SessionPool(clock, "mail.example.test")
    sessions = [FakeSession() for _ in range(3)]
    for session in sessions:
        pool.give_back(HOP, "127.0.0.5", session)
    pool.close_all()
    assert all(s.quitted for s in sessions) and not clock.getDelayedCalls()
