"""AIMD pacing per destination group, on a fake clock."""

from __future__ import annotations

import pytest

from mailhost.delivery.throttle import (
    CLEAN_WINDOW, DEFAULT_RULES, Pace, Throttle, ThrottleRule, group_of, is_slow_down_signal, merge_snapshots, share_of,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("host, group", [
    ("gmail-smtp-in.l.google.com", "google"),
    ("alt1.gmail-smtp-in.l.google.com.", "google"),
    ("aspmx.l.google.com", "google"),
    ("mta5.am0.yahoodns.net", "yahoo"),
    ("example-com.mail.protection.outlook.com", "microsoft"),
    ("mx1.remote.test", "remote.test"),
    ("localhost", "localhost"),
])
def test_groups_by_mx_host_domain(host, group):
    assert group_of(host, DEFAULT_RULES)[0] == group


def test_pace_spaces_sends_at_the_rate():
    clock = Clock()
    pace = Pace("g", connections=2, rate=60.0, floor=6.0, clock=clock)  # one a second
    assert [pace.reserve() for _ in range(3)] == [0.0, 1.0, 2.0]
    pace.give_back()
    assert pace.reserve() == 2.0


def test_halves_on_signal_never_below_floor_and_grows_back_additively():
    clock = Clock()
    pace = Pace("g", connections=2, rate=600.0, floor=100.0, clock=clock)
    pace.slow_down()
    assert pace.rate == 300.0
    pace.slow_down()  # the same burst: counted once
    assert pace.rate == 300.0
    for _ in range(5):
        clock.now += 2
        pace.slow_down()
    assert pace.rate == 100.0  # the floor
    clock.now += CLEAN_WINDOW
    pace.reserve()
    assert pace.rate == 160.0  # + a tenth of 600
    pace.reserve()
    assert pace.rate == 160.0  # once per clean window
    for _ in range(10):
        clock.now += CLEAN_WINDOW
        pace.reserve()
    assert pace.rate == 600.0  # never above the configured rate


def test_unmatched_groups_are_not_paced():
    throttle = Throttle(DEFAULT_RULES, default_connections=4, clock=Clock())
    pace = throttle.pace_for("mx1.remote.test")
    assert [pace.reserve() for _ in range(100)] == [0.0] * 100
    pace.slow_down()
    assert throttle.snapshot() == {}
    assert pace.connections.limit == 4
    assert throttle.pace_for("gmail-smtp-in.l.google.com") is throttle.pace_for("aspmx.l.google.com")
    assert set(throttle.snapshot()) == {"google"}


@pytest.mark.parametrize("code, status, refused, expected", [
    (421, "4.7.0", False, True),
    (421, "4.3.2", False, True),
    (450, "4.7.28", False, True),  # Gmail's rate limit
    (451, "4.7.1", False, True),
    (450, "4.2.1", False, False),  # a busy mailbox says nothing about our pace
    (550, "5.7.1", False, False),
    (None, "", True, True),
    (None, "", False, False),
])
def test_slow_down_signals(code, status, refused, expected):
    assert is_slow_down_signal(code, status, refused) is expected


def test_a_share_of_the_pace_per_delivering_process_adds_up_to_the_configured_one() -> None:
    rules = (ThrottleRule("google", ("google.com",), 10, 600.0, 10.0),)
    halves = [Throttle(rules, default_connections=5, share=2, index=i) for i in range(2)]
    for throttle in halves:
        pace = throttle.pace_for("alt1.gmail-smtp-in.l.google.com")
        assert (pace.rate, pace.max_rate, pace.floor, pace.connections.limit) == (300.0, 300.0, 5.0, 5)
    # 5 connections over 2 processes: 3 and 2, never more than configured in all.
    assert [t.pace_for("mx.other.test").connections.limit for t in halves] == [3, 2]
    merged = merge_snapshots([t.snapshot() for t in halves])
    assert merged == {"google": {"rate": 600.0, "max_rate": 600.0, "connections": 10, "paused_for": 0.0}}


@pytest.mark.parametrize("total, share", [(10, 1), (10, 2), (10, 3), (5, 2), (7, 4), (50, 3), (64, 64)])
def test_the_parts_of_a_limit_add_up_to_it(total: int, share: int) -> None:
    parts = [share_of(total, share, index) for index in range(share)]
    assert sum(parts) == total and max(parts) - min(parts) <= 1


def test_every_process_gets_at_least_one_connection() -> None:
    assert [share_of(2, 3, index) for index in range(3)] == [1, 1, 1]


def test_delivering_alone_again_gives_new_groups_the_whole_pace() -> None:
    rules = (ThrottleRule("google", ("google.com",), 10, 600.0, 10.0),)
    throttle = Throttle(rules, default_connections=5, share=2)
    assert throttle.pace_for("mx.google.com").max_rate == 300.0
    throttle.deliver_alone()
    assert throttle.pace_for("mx.google.com").max_rate == 600.0


def test_each_step_back_up_is_logged_with_the_new_rate():
    from twisted.logger import capturedLogs, formatEvent

    clock = Clock()
    pace = Pace("google", connections=2, rate=600.0, floor=100.0, clock=clock)
    pace.slow_down()
    with capturedLogs() as events:
        pace.reserve()  # in the same window: no growth, no line
        clock.now += CLEAN_WINDOW
        pace.reserve()
        clock.now += CLEAN_WINDOW
        pace.reserve()
    assert [formatEvent(e) for e in events] == ["pace for google up to 360/min (at most 600/min)",
                                                "pace for google up to 420/min (at most 600/min)"]
