"""mailhost.intake.cleanup.received_date: the Received: date, made once a second."""

from __future__ import annotations

from email.utils import formatdate, parsedate_to_datetime

import mailhost.intake.cleanup as intake


def test_the_date_is_formatdates_and_changes_with_the_second(monkeypatch) -> None:
    now = [1800000000.2]
    monkeypatch.setattr(intake.time, "time", lambda: now[0])
    first = intake.received_date()
    assert first == formatdate(1800000000, localtime=True)
    now[0] += 0.5
    assert intake.received_date() == first
    now[0] += 1.0
    later = intake.received_date()
    assert parsedate_to_datetime(later).timestamp() == 1800000001
