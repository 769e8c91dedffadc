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
    assert (second["scope"], second["category"]) == ("example.org", "unsubscribe")
