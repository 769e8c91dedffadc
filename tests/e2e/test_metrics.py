"""The Prometheus scrape and the health check, after real traffic."""

from __future__ import annotations

import urllib.error
import urllib.request

from tests.e2e.conftest import free_port
from tests.e2e.test_sending import dns, relay_config, sinks, submit, wait_for  # noqa: F401  (fixtures)


def scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return response.read().decode()


def healthy(port: int) -> bool:
    """True once /healthz says ok; its 503 while the queue still loads means not yet."""
    try:
        return scrape(port, "/healthz") == "ok\n"
    except urllib.error.HTTPError as error:
        if error.code == 503:
            return False
        raise


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
    wait_for(lambda: healthy(port), what="healthy")
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


def test_metrics_add_up_every_process_with_workers(make_daemon, dns, sinks):  # noqa: F811
    from concurrent.futures import ThreadPoolExecutor

    from tests.e2e.test_workers import main_process_stopped, worker_pids, writer_pids

    port = free_port()
    mx1 = sinks("127.0.0.5")
    daemon = make_daemon(start=False, extra=relay_config(dns), prelude=f'[metrics]\nendpoint = "tcp:{port}:interface=127.0.0.1"\n',
                         workers=2)
    daemon.start()
    wait_for(lambda: "worker 1 listening" in daemon.log(), what="the worker to listen")
    jobs = [(["alice@example.test"], f"local {n}") for n in range(6)] + [(["bob@remote.test"], f"remote {n}") for n in range(6)]
    with main_process_stopped(daemon):  # only the worker accepts: it stores, counts and relays these
        for job in jobs:
            submit(daemon, *job)
        wait_for(lambda: len(mx1.messages()) == 6, what="the worker's messages relayed")
    assert set(writer_pids(daemon).values()) == set(worker_pids(daemon))
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda job: submit(daemon, job[0], job[1] + " again"), jobs))
    wait_for(lambda: len(mx1.messages()) == 12, what="every remote message relayed")
    wait_for(lambda: value(scrape(port), 'mailhost_deliveries_total{result="delivered"}') == 12,
             what="the deliveries of both processes counted")
    text = scrape(port)
    assert value(text, 'mailhost_messages_received_total{result="accepted",role="mx"}') == 24
    assert value(text, "mailhost_delivery_delay_seconds_count") == 12
    assert value(text, 'mailhost_delivery_delay_seconds_bucket{le="+Inf"}') == 12
    assert value(text, "mailhost_queue_messages") == 0
    assert text.count("# TYPE mailhost_deliveries_total counter") == 1  # one family, added up
