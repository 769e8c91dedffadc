"""The complaint rate: per provider, over a sliding window, shared by every process."""

from __future__ import annotations

import pytest
from twisted.logger import formatEvent, globalLogPublisher

from mailhost.feedback.complaints import BUCKET_SECONDS, WINDOW_SECONDS, ComplaintRate, provider_of


@pytest.mark.parametrize("address, provider", [
    ("a@gmail.com", "google"), ("a@GoogleMail.com.", "google"), ("a@yahoo.com", "yahoo"), ("a@yahoo.co.uk", "yahoo"),
    ("a@aol.com", "yahoo"), ("a@ymail.com", "yahoo"), ("a@outlook.com", "microsoft"), ("a@hotmail.fr", "microsoft"),
    ("a@live.co.uk", "microsoft"), ("a@msn.com", "microsoft"), ("a@icloud.com", "apple"), ("a@me.com", "apple"),
    ("a@Example.ORG", "example.org"), ("a@yahoo.com.br", "yahoo"), ("a@yahoo.test", "yahoo.test"),
    ("a@live.example.org", "live.example.org"), ("a@yahoo", "yahoo"),
])
def test_provider_of(address, provider):
    assert provider_of(address) == provider


@pytest.fixture
def caplog_twisted():
    lines: list[str] = []

    def observe(event: dict) -> None:
        lines.append(f"{event['log_level'].name}: {formatEvent(event)}")

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def rate(tmp_path, clock, **kwargs) -> ComplaintRate:
    return ComplaintRate(tmp_path / "complaints.json", clock=clock, **kwargs)


def deliver(counter: ComplaintRate, n: int, domain: str = "gmail.com") -> None:
    for i in range(n):
        counter.delivered(f"user{i}@{domain}")


def test_two_processes_share_one_rate(tmp_path):
    clock = Clock()
    main, worker = rate(tmp_path, clock), rate(tmp_path, clock)
    deliver(main, 600)
    deliver(worker, 400)
    worker.complained("x@gmail.com")
    assert main.flush() == [] and worker.flush() == []  # 1 / 1000 = 0.1%: not above
    [figures] = main.rates().values()
    assert (figures.provider, figures.delivered, figures.complaints, figures.total_complaints) == ("google", 1000, 1, 1)
    assert figures.rate == pytest.approx(0.001)


def test_each_crossing_logged_once_across_processes(tmp_path, caplog_twisted):
    clock = Clock()
    a, b = rate(tmp_path, clock), rate(tmp_path, clock)
    deliver(a, 1000)
    a.complained("x@gmail.com")
    a.complained("y@gmail.com")
    [(provider, level, figures)] = a.flush()
    assert (provider, level, figures.complaints) == ("google", "warning", 2)
    b.complained("z@gmail.com")
    assert b.flush() == []  # 0.3%: still the warning level, told already by the other process
    b.complained("w@gmail.com")
    [(_, level, figures)] = b.flush()
    assert level == "error" and figures.rate == pytest.approx(0.004)
    deliver(a, 3000)
    [(_, level, _)] = a.flush()
    assert level == ""  # 4 / 4000: back under
    assert any(line.startswith("warn: complaint rate of google above 0.1%: 2 complaints / 1000 delivered")
               for line in caplog_twisted)
    assert any(line.startswith("error: complaint rate of google above 0.3%") for line in caplog_twisted)


def test_too_few_deliveries_never_alarm(tmp_path):
    clock = Clock()
    counter = rate(tmp_path, clock)
    deliver(counter, 3)
    counter.complained("x@gmail.com")
    assert counter.flush() == []
    assert counter.rates()["google"].rate == pytest.approx(1 / 3)


def test_window_slides(tmp_path):
    clock = Clock()
    counter = rate(tmp_path, clock, min_delivered=1)
    deliver(counter, 100)
    counter.complained("x@gmail.com")
    counter.flush()
    clock.now += WINDOW_SECONDS - BUCKET_SECONDS
    assert counter.rates()["google"].complaints == 1
    clock.now += 2 * BUCKET_SECONDS
    deliver(counter, 10)
    counter.flush()
    figures = counter.rates()["google"]
    assert (figures.delivered, figures.complaints, figures.total_complaints) == (10, 0, 1)


def test_damaged_file_starts_over(tmp_path):
    (tmp_path / "complaints.json").write_text('{"buckets": {"x": 1}, "totals": [')
    counter = rate(tmp_path, Clock())
    assert counter.rates() == {}
    deliver(counter, 2)
    counter.flush()
    assert counter.rates()["google"].delivered == 2
