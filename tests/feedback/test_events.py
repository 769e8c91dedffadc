"""The event log (mailhost.feedback.events): durable, ordered, unique ids, shared by processes."""

from __future__ import annotations

import json
import multiprocessing

import pytest

from mailhost.feedback.events import EventLog
from mailhost.feedback.suppression import SuppressionList


def test_events_come_back_in_order_after_an_id(tmp_path):
    log = EventLog(tmp_path / "events")
    first = log.record("delivered", queue_id="q1", recipient="a@example.com", sender="n@example.org", now=100.0)
    second = log.record("bounced", queue_id="q1", recipient="b@example.com", category="invalid_recipient", now=100.0)
    assert first["id"] != second["id"] and first["id"] < second["id"]
    assert [e["event"] for e in log.read()] == ["delivered", "bounced"]
    assert [e["id"] for e in EventLog(tmp_path / "events").read(first["id"])] == [second["id"]]
    assert (tmp_path / "events" / "events.jsonl").stat().st_mode & 0o777 == 0o600


def test_a_line_cut_short_by_a_crash_is_skipped(tmp_path):
    log = EventLog(tmp_path / "events")
    log.record("delivered", recipient="a@example.com")
    with open(log.path, "ab") as stream:
        stream.write(b'{"id":"ffff","event":"deliv')
    assert [e["recipient"] for e in log.read()] == ["a@example.com"]


def test_unknown_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="event kind"):
        EventLog(tmp_path).record("opened")


def _append(folder, count):
    log = EventLog(folder)
    for n in range(count):
        log.record("deferred", recipient=f"r{n}@example.com")


def test_processes_appending_together_lose_no_line(tmp_path):
    workers = [multiprocessing.Process(target=_append, args=(tmp_path, 200)) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    lines = (tmp_path / "events.jsonl").read_bytes().splitlines()
    events = [json.loads(line) for line in lines]
    assert len(events) == 600 and len({e["id"] for e in events}) == 600


def test_a_new_suppression_is_an_event_once(tmp_path):
    log = EventLog(tmp_path / "events")
    listed = SuppressionList(tmp_path / "suppression.json", events=log)
    listed.add("bob@example.com", "", "asked us", "manual")
    listed.add("ann@example.com", "", "one-click", "unsubscribe", category="unsubscribe", scope="example.org")
    [first, second] = list(log.read())
    assert (first["event"], first["recipient"], first["source"]) == ("suppressed", "bob@example.com", "manual")
    assert (second["scope"], second["class"]) == ("example.org", "unsubscribe")


def test_segments_rotate_and_read_continues_across_them(tmp_path):
    log = EventLog(tmp_path / "events", segment_bytes=600)
    ids = [log.record("delivered", recipient=f"r{n}@example.com")["id"] for n in range(30)]
    assert len(list((tmp_path / "events").glob("events-*.jsonl"))) > 3
    assert [e["id"] for e in log.read()] == ids
    assert [e["id"] for e in log.read(ids[17])] == ids[18:]
    assert log.last_id() == ids[-1]


def test_ids_keep_growing_when_the_clock_steps_back(tmp_path):
    log = EventLog(tmp_path / "events", segment_bytes=300)
    first = log.record("delivered", now=2_000_000_000.0)["id"]
    later = [log.record("delivered", now=1_000_000_000.0)["id"] for _ in range(5)]
    assert [first, *later] == sorted([first, *later]) and len(set(later)) == 5


def test_trim_keeps_what_a_webhook_has_not_passed_until_the_size_cap(tmp_path):
    log = EventLog(tmp_path / "events", segment_bytes=600)
    ids = [log.record("delivered", recipient=f"r{n}@example.com", now=1000.0 + n)["id"] for n in range(30)]
    segments = sorted((tmp_path / "events").glob("events-*.jsonl"))
    later = 10**10  # every segment is past its retention
    # A webhook behind at the 5th event: only segments wholly before it may go.
    kept = log.trim(passed=ids[4], now=later)
    assert not kept.unread
    assert [e["id"] for e in log.read(ids[4])] == ids[5:]
    assert all(not (tmp_path / "events" / name).exists() for name in kept.removed)
    # Every webhook past everything: all rotated segments go; the open one stays.
    log.trim(passed=ids[-1], now=later)
    assert not list((tmp_path / "events").glob("events-*.jsonl"))
    assert log.last_id() == ids[-1]
    # Over the size cap: the oldest go even though a webhook has not read them (and it is said).
    more = [log.record("delivered", recipient=f"s{n}@example.com")["id"] for n in range(30)]
    capped = log.trim(passed="", now=later, max_bytes=1200)
    assert capped.unread and capped.removed == capped.unread
    assert sum(p.stat().st_size for p in (tmp_path / "events").glob("events*.jsonl")) <= 1200
    assert [e["id"] for e in log.read(more[-3])] == more[-2:]
    assert segments  # rotation happened at all


def test_recent_segments_stay_whatever_the_cursors(tmp_path):
    log = EventLog(tmp_path / "events", segment_bytes=600)
    ids = [log.record("delivered", recipient=f"r{n}@example.com")["id"] for n in range(30)]
    assert log.trim(passed=ids[-1]).removed == ()  # within the retention: the API may still ask
    assert len(list(log.read())) == 30


def test_one_attempt_is_one_write_with_ids_in_order(tmp_path):
    log = EventLog(tmp_path / "events")
    before = log.record("suppressed", recipient="x@example.com")
    stored = log.record_many([{"event": "delivered", "recipient": f"r{n}@example.com", "queue_id": "q"}
                              for n in range(3)])
    assert [e["recipient"] for e in stored] == ["r0@example.com", "r1@example.com", "r2@example.com"]
    ids = [before["id"], *(e["id"] for e in stored)]
    assert ids == sorted(ids) and len(set(ids)) == 4
    assert [e["id"] for e in log.read(before["id"])] == ids[1:]
    with pytest.raises(ValueError, match="event kind"):
        log.record_many([{"event": "delivered"}, {"event": "opened"}])
    assert len(list(log.read())) == 4  # nothing of a refused batch was written


def test_attempts_that_end_together_share_one_write(tmp_path):
    from twisted.internet.defer import Deferred

    from mailhost.feedback.events import GroupCommit

    log = EventLog(tmp_path / "events")
    writes = []
    pending: list[tuple[Deferred, object]] = []

    def run(function):  # a disk thread that finishes when the test says so
        done = Deferred()
        pending.append((done, function))
        return done

    def finish():
        done, function = pending.pop(0)
        writes.append(function())
        done.callback(None)

    group = GroupCommit(log, run)
    fired = []
    for n in range(3):
        group.record(lambda n=n: [{"event": "delivered", "recipient": f"r{n}@example.com"}]).addCallback(fired.append)
    assert len(pending) == 1 and fired == []  # the first is being written; the other two wait
    finish()
    assert len(fired) == 1 and len(pending) == 1  # the first is durable; the two others go together
    finish()
    assert len(fired) == 3 and pending == []
    assert len(writes) == 2
    assert [e["recipient"] for e in log.read()] == ["r0@example.com", "r1@example.com", "r2@example.com"]
