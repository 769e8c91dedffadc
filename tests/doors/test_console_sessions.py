"""The console's server-side sessions and CSRF tokens, on a task.Clock."""

from __future__ import annotations

from twisted.internet.task import Clock

from mailhost.doors.http.console.sessions import LOGIN_FORM_SECONDS, SessionStore


def test_ids_and_tokens_are_random_and_long():
    store = SessionStore(Clock())
    one, two = store.new("alice@example.test"), store.new("alice@example.test")
    assert one.id != two.id and one.csrf != two.csrf and one.id != one.csrf
    assert len(one.id) >= 43 and len(one.csrf) >= 43  # 32 random bytes each
    assert store.get(one.id) is one and store.get(one.id.encode()) is one
    assert store.get("") is None and store.get(None) is None and store.get(one.id + "x") is None


def test_csrf_token_must_match_exactly():
    session = SessionStore(Clock()).new("alice@example.test")
    assert session.csrf_matches(session.csrf) and session.csrf_matches(session.csrf.encode())
    for wrong in (None, "", session.csrf[:-1], session.csrf + "a", "ü" + session.csrf[1:]):
        assert not session.csrf_matches(wrong)


def test_idle_and_absolute_expiry():
    clock = Clock()
    store = SessionStore(clock, idle=100, lifetime=250)
    session = store.new("alice@example.test")
    for _ in range(4):  # used every 60 s: the idle timer restarts each time
        clock.advance(60)
        assert store.get(session.id) is session
    clock.advance(20)  # 260 s after login: past the lifetime however busy
    assert store.get(session.id) is None
    idle = store.new("alice@example.test")
    clock.advance(100)
    assert store.get(idle.id) is None


def test_login_form_sessions_are_short_lived_and_go_first():
    clock = Clock()
    store = SessionStore(clock, max_sessions=3)
    form = store.new()
    clock.advance(LOGIN_FORM_SECONDS)
    assert store.get(form.id) is None
    admin = store.new("alice@example.test")
    forms = [store.new() for _ in range(5)]  # a flood of login forms
    assert len(store) == 3 and store.get(admin.id) is admin and store.get(forms[-1].id) is forms[-1]


def test_drop_ends_a_session():
    store = SessionStore(Clock())
    session = store.new("alice@example.test")
    store.drop(session)
    assert store.get(session.id) is None
