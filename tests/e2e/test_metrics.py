"""The Prometheus scrape and the health check, after real traffic."""

from __future__ import annotations

import urllib.request

from tests.e2e.conftest import free_port
from tests.e2e.test_sending import dns, relay_config, sinks, submit, wait_for  # noqa: F401  (fixtures)


def scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return response.read().decode()


def value(text: str, series: str) -> float:
    """The sample of one series, e.g. 'mailhost_deliveries_total{result="bounced"}'; 0 when absent."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_after_traffic(make_daemon, dns, sinks):  # noqa: F811
    port = free_port()
    mx1 = sinks("127.0.0.5")
    daemon = make_daemon(extra=relay_config(dns), prelude=f'[metrics]\nendpoint = "tcp:{port}:interface=127.0.0.1"\n')
    wait_for(lambda: scrape(port, "/healthz") == "ok\n", what="healthy")
    submit(daemon, ["bob@remote.test"], "counted")
    submit(daemon, ["x@nullmx.test"], "bounced")
    wait_for(lambda: len(mx1.messages()) == 1, what="delivery")
    wait_for(lambda: value(scrape(port), 'mailhost_deliveries_total{result="bounced"}') == 1, what="the bounce counted")
    text = scrape(port)
    assert value(text, 'mailhost_deliveries_total{result="delivered"}') == 1
    assert value(text, "mailhost_delivery_delay_seconds_count") == 1
    assert "mailhost_queue_messages" in text and "mailhost_queue_oldest_message_age_seconds" in text
    assert value(text, 'mailhost_messages_received_total{result="accepted",role="mx"}') == 2
    assert value(text, 'mailhost_smtp_sessions_total{role="mx"}') >= 2
