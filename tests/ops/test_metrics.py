"""mailhost.ops.metrics.AllProcesses: /metrics adds up the main process and its workers' snapshots."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, generate_latest

from mailhost.ops.metrics import STALE_SECONDS, AllProcesses, Metrics, write_snapshot


def sample(text: str, series: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_counters_histograms_and_gauges_add_up_and_stale_workers_are_left_out(tmp_path) -> None:
    main, worker, gone = Metrics(), Metrics(), Metrics()
    main.deliveries.labels("delivered").inc(3)
    worker.deliveries.labels("delivered").inc(2)
    worker.deliveries.labels("bounced").inc()
    main.delivery_delay.observe(2)
    worker.delivery_delay.observe(400)
    main.watch_queue(lambda: 5, lambda: 1000.0)
    worker.watch_queue(lambda: 7, lambda: 10.0)  # older: its age is the one shown
    worker.watch_throttle(lambda: {"google": {"rate": 300.0, "max_rate": 300.0, "connections": 5}})
    main.watch_throttle(lambda: {"google": {"rate": 300.0, "max_rate": 300.0, "connections": 5}})
    gone.deliveries.labels("delivered").inc(100)
    write_snapshot(worker, tmp_path / "worker1.json")
    write_snapshot(gone, tmp_path / "worker2.json")
    old = os.stat(tmp_path / "worker2.json").st_mtime - STALE_SECONDS - 1
    os.utime(tmp_path / "worker2.json", (old, old))

    served = CollectorRegistry(auto_describe=False)
    served.register(AllProcesses(main.registry, tmp_path))
    text = generate_latest(served).decode()
    assert sample(text, 'mailhost_deliveries_total{result="delivered"}') == 5
    assert sample(text, 'mailhost_deliveries_total{result="bounced"}') == 1
    assert sample(text, "mailhost_delivery_delay_seconds_count") == 2
    assert sample(text, 'mailhost_delivery_delay_seconds_bucket{le="5.0"}') == 1
    assert sample(text, 'mailhost_delivery_delay_seconds_bucket{le="+Inf"}') == 2
    assert sample(text, "mailhost_queue_messages") == 12
    assert sample(text, "mailhost_queue_oldest_message_age_seconds") > 1e9  # the largest, not the sum
    assert sample(text, 'mailhost_throttle_max_rate_per_minute{group="google"}') == 600
    assert text.count("# TYPE mailhost_deliveries_total counter") == 1


def test_without_snapshots_it_is_the_main_process_alone(tmp_path) -> None:
    main = Metrics()
    main.received.labels("mx", "accepted").inc(4)
    served = CollectorRegistry(auto_describe=False)
    served.register(AllProcesses(main.registry, tmp_path / "missing"))
    text = generate_latest(served).decode()
    assert sample(text, 'mailhost_messages_received_total{result="accepted",role="mx"}') == 4
