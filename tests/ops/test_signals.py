"""mailhost.ops.signals: SIGTERM/SIGINT only schedule the stop; the stop happens once."""

from __future__ import annotations

import signal

import pytest
from twisted.internet.error import ReactorNotRunning
from twisted.logger import capturedLogs, formatEvent

from mailhost.ops.signals import StopOnSignal, stop_reactor


class FakeReactor:
    def __init__(self) -> None:
        self.from_thread: list = []
        self.when_running: list = []
        self.stops = 0

    def callFromThread(self, f, *args) -> None:
        self.from_thread.append((f, args))

    def callWhenRunning(self, f, *args) -> None:
        self.when_running.append((f, args))

    def stop(self) -> None:
        self.stops += 1
        if self.stops > 1:
            raise ReactorNotRunning("Can't stop reactor that isn't running.")

    def run_calls(self) -> None:
        calls, self.from_thread = self.from_thread, []
        for f, args in calls:
            f(*args)


@pytest.fixture
def saved_handlers():
    saved = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    yield
    for number, handler in saved.items():
        signal.signal(number, handler)


def test_the_handler_only_schedules_and_the_stop_happens_once(saved_handlers):
    reactor = FakeReactor()
    stopper = StopOnSignal(reactor)
    signal.signal(signal.SIGTERM, lambda *a: None)  # as the reactor's own handler is installed
    stopper.install_when_running()
    [(install, args)] = reactor.when_running
    install(*args)
    handler = signal.getsignal(signal.SIGTERM)
    with capturedLogs() as events:
        handler(signal.SIGTERM, None)  # the process group's SIGTERM
        handler(signal.SIGTERM, None)  # and the main process's, for a worker
        assert events == [] and reactor.stops == 0  # nothing in the signal handler itself
        reactor.run_calls()
    assert reactor.stops == 1
    assert [formatEvent(e) for e in events] == ["Received SIGTERM, shutting down."]


def test_ignored_and_default_signals_are_left_alone(saved_handlers):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a worker: Ctrl-C is for the main process
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    StopOnSignal(FakeReactor()).install()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_stopping_a_reactor_already_stopping_is_quiet():
    reactor = FakeReactor()
    stop_reactor(reactor)
    stop_reactor(reactor)  # e.g. the worker's channel closing while SIGTERM's stop runs
    assert reactor.stops == 2
