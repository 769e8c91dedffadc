"""mailhost.ops.logs: the daemon's text lines go out once per reactor turn, and only when twistd was not told otherwise."""

from __future__ import annotations

import io
import threading

from twisted.internet.task import Clock
from twisted.logger import Logger, formatEventAsClassicLogText

from mailhost.ops.logs import BatchedStream, default_observer, text_lines, twistd_time


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


class TurnReactor(Clock):
    """A Clock that says it runs and takes system event triggers."""

    running = True

    def __init__(self) -> None:
        super().__init__()
        self.triggers: list = []

    def addSystemEventTrigger(self, phase, event, callable, *args) -> None:
        self.triggers.append((phase, event, callable))


def test_lines_of_one_turn_are_written_together_at_its_end() -> None:
    out, reactor = CountingStream(), TurnReactor()
    stream = BatchedStream(out, reactor)
    for n in range(3):
        stream.write(f"line {n}\n")
        stream.flush()  # what FileLogObserver does after each event
    assert out.getvalue() == ""
    reactor.advance(0)
    assert out.getvalue() == "line 0\nline 1\nline 2\n" and out.writes == 1
    stream.write("next turn\n")
    reactor.advance(0)
    assert out.getvalue().endswith("next turn\n") and out.writes == 2


def test_lines_from_other_threads_or_before_the_reactor_runs_go_out_at_once_in_order() -> None:
    out, reactor = CountingStream(), TurnReactor()
    stream = BatchedStream(out, reactor)
    stream.write("held\n")
    thread = threading.Thread(target=stream.write, args=("from a thread\n",))
    thread.start()
    thread.join()
    assert out.getvalue() == "held\nfrom a thread\n"
    reactor.running = False
    stream.write("not running\n")
    assert out.getvalue().endswith("not running\n")


def test_held_lines_are_written_at_shutdown() -> None:
    out, reactor = CountingStream(), TurnReactor()
    stream = BatchedStream(out, reactor)
    stream.write("last words\n")
    [(phase, event, flush)] = reactor.triggers
    assert (phase, event) == ("after", "shutdown")
    flush()
    assert out.getvalue() == "last words\n"


def test_text_lines_look_like_twistds_own() -> None:
    out, reactor = CountingStream(), TurnReactor()
    events: list[dict] = []
    observer = text_lines(out, reactor)
    log = Logger(namespace="mailhost.queue", observer=lambda event: (events.append(event), observer(event)))
    log.info("{id}: removed", id="ABC")
    log.warn("two\nlines")
    reactor.advance(0)
    assert out.getvalue() == "".join(formatEventAsClassicLogText(e) for e in events)
    assert "[mailhost.queue#info] ABC: removed\n" in out.getvalue() and "two\n\tlines\n" in out.getvalue()


def test_the_second_clock_formats_like_twisted() -> None:
    from twisted.logger import formatTime

    clock = twistd_time
    for when in (0.5, 1700000000.25, 1700000000.75, 1700000001.0):
        assert clock(when) == formatTime(when)
    assert clock(None) == "-"


def test_twistds_own_choice_of_log_stands() -> None:
    reactor = TurnReactor()
    assert default_observer({"nodaemon": True, "logfile": None}, reactor) is not None
    assert default_observer({"nodaemon": True, "logfile": "-"}, reactor) is not None
    assert default_observer({"nodaemon": True, "logfile": "/var/log/mailhost.log"}, reactor) is None
    assert default_observer({"nodaemon": True, "logger": "mailhost.ops.logs.json_lines"}, reactor) is None
    assert default_observer({"nodaemon": True, "syslog": True}, reactor) is None
    assert default_observer({"nodaemon": False}, reactor) is None
    assert default_observer(None, reactor) is None


def test_the_fast_line_is_twisteds_line_for_every_kind_of_event() -> None:
    from twisted.logger import LogLevel, formatTime
    from twisted.python.failure import Failure

    from mailhost.ops.logs import classic_line

    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()
    base = {"log_time": 1700000000.5, "log_level": LogLevel.info, "log_namespace": "mailhost.queue"}
    events = [
        {**base, "log_format": "{id}: to=<{rcpt}> delay={delay:.2f} ({reply!r})", "id": "ABC", "rcpt": "b@x.test",
         "delay": 0.1234, "reply": "250 ok"},
        {**base, "log_format": "two\nlines"},
        {**base, "log_format": "{missing}"},  # Twisted says it cannot format it: so do we
        {**base, "log_format": "{f()}", "f": lambda: "called"},
        {**base, "log_format": "boom {id}", "id": 1, "log_failure": failure},
        {**base, "log_format": "", "x": 1},
        {**base, "log_format": None, "log_text": "legacy"},
        {**base, "log_format": "from a worker", "log_system": "mailhost.queue#info worker 1"},
        {"log_format": "no time, level or namespace"},
    ]
    for event in events:
        assert classic_line(event, formatTime) == formatEventAsClassicLogText(event, formatTime), event


def test_writes_stay_within_a_pipes_atomic_size_and_keep_lines_whole() -> None:
    from mailhost.ops.logs import ATOMIC_WRITE, _whole_lines

    lines = [f"line {n} " + "x" * 200 + "\n" for n in range(100)] + ["é" * 2000 + "\n", "last\n"]
    writes = list(_whole_lines(lines, ATOMIC_WRITE))
    assert "".join(writes) == "".join(lines)
    assert all(len(w.encode()) <= ATOMIC_WRITE or w.count("\n") == 1 for w in writes)
    assert all(w.endswith("\n") for w in writes) and len(writes) > 1


def test_a_workers_text_lines_say_which_worker() -> None:
    out, reactor = CountingStream(), TurnReactor()
    log = Logger(namespace="mailhost.outbound", observer=text_lines(out, reactor, worker=2))
    log.info("{id}: delivered", id="XYZ")
    reactor.advance(0)
    assert "[mailhost.outbound#info worker 2] XYZ: delivered\n" in out.getvalue()


def test_held_lines_are_written_before_a_reply_goes_to_a_client() -> None:
    import socket as socketlib

    from twisted.internet import tcp
    from twisted.internet.protocol import Protocol

    from mailhost.ops.logs import flush_pending
    from mailhost.smtp.transport import send_eagerly
    from tests.smtp.test_transport import FakeReactor, transports

    out, reactor = CountingStream(), TurnReactor()
    log = Logger(namespace="mailhost.smtp", observer=text_lines(out, reactor))
    port = tcp.Port(0, None)
    with transports(plain=False):
        send_eagerly(port, before_write=flush_pending)  # as the daemon's listeners do (mailhost.service)
    ours, peer = socketlib.socketpair()
    ours.setblocking(False)
    server = port.transport(ours, Protocol(), ("127.0.0.1", 2525), None, 1, FakeReactor())
    try:
        log.info("{id}: accepted", id="QID")
        assert out.getvalue() == ""
        server.write(b"250 2.0.0 Ok: queued as QID\r\n")
        assert "QID: accepted" in out.getvalue()  # in the log before the reply left
        assert peer.recv(100).startswith(b"250")
    finally:
        ours.close()
        peer.close()
