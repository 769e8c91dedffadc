"""The console's per-minute figures: counted in memory, merged into one file by every process."""

from __future__ import annotations

import json

from mailhost.feedback.traffic import BUCKETS, MAX_GROUPS, OTHER, Traffic

T0 = 1_800_000_000.0  # a minute boundary


def by_domain(recipient: str, remote_mta: str) -> str:
    return remote_mta or recipient.rpartition("@")[2]


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def delivered(recipient: str, mta: str = "") -> dict:
    return {"event": "delivered", "recipient": recipient, "remote_mta": mta}


def test_counts_by_kind_group_and_class(tmp_path):
    clock = Clock()
    traffic = Traffic(tmp_path / "traffic.json", by_domain, clock=clock)
    traffic.received(3)
    traffic.count_events([delivered("a@gmail.test", "google"), delivered("b@gmail.test", "google"),
                          {"event": "deferred", "recipient": "c@x.test", "class": "rate_limit"},
                          {"event": "bounced", "recipient": "d@x.test", "class": ""},
                          {"event": "suppressed", "recipient": "e@x.test"}])
    first, series = traffic.series()
    assert first == T0 - (BUCKETS - 1) * 60
    assert {k: sum(v) for k, v in series.items()} == {
        "received": 3, "delivered:google": 2, "deferred:rate_limit": 1, "bounced:other": 1}
    assert series["received"][-1] == 3 and len(series["received"]) == BUCKETS


def test_two_processes_add_up_and_survive_a_restart(tmp_path):
    clock = Clock()
    path = tmp_path / "traffic.json"
    one, two = Traffic(path, by_domain, clock=clock), Traffic(path, by_domain, clock=clock)
    one.received()
    two.received(2)
    clock.now += 60
    two.count_events([delivered("a@y.test")])
    assert one.flush() == 1 and two.flush() == 3
    again = Traffic(path, by_domain, clock=clock)  # a new daemon reads what the old ones wrote
    _, series = again.series()
    assert series["received"][-2:] == [3, 0] and series["delivered:y.test"][-1] == 1
    assert one.flush() == 0  # nothing pending: the file is not rewritten


def test_old_minutes_are_dropped_and_groups_are_bounded(tmp_path):
    clock = Clock()
    path = tmp_path / "traffic.json"
    traffic = Traffic(path, by_domain, clock=clock)
    traffic.received()
    traffic.flush()
    clock.now += 24 * 3600 + 60
    traffic.count_events([delivered(f"a@d{n}.test") for n in range(MAX_GROUPS + 5)])
    traffic.flush()
    minutes = json.loads(path.read_text())["minutes"]
    assert list(minutes) == [str(int(clock.now))]  # the day-old minute is gone
    groups = [k for k in minutes[str(int(clock.now))]]
    assert len(groups) == MAX_GROUPS + 1 and minutes[str(int(clock.now))][f"delivered:{OTHER}"] == 5


def test_a_damaged_file_starts_again(tmp_path):
    path = tmp_path / "traffic.json"
    path.write_text('{"minutes": {"x": 1, "60": {"received": "many", "delivered:a": 2}}')
    traffic = Traffic(path, by_domain, clock=Clock())
    assert traffic.series()[1] == {}  # not JSON: nothing
    path.write_text(json.dumps({"minutes": {"x": {}, str(int(T0)): {"received": "many", "delivered:a": 2}}}))
    assert {k: sum(v) for k, v in Traffic(path, by_domain, clock=Clock()).series()[1].items()} == {"delivered:a": 2}
