"""Prometheus metrics and a health check, served on `[metrics] endpoint`.

prometheus_client does the exposition format; each daemon gets its own
registry (no process-global state), handed to the parts that count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.twisted import MetricsResource
from twisted.web.resource import Resource
from twisted.web.server import Site

DELAY_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86400, 5 * 86400)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions = Counter("mailhost_smtp_sessions", "SMTP sessions accepted", ["role"], registry=r)
        self.tls_sessions = Counter("mailhost_smtp_tls_sessions", "SMTP sessions that started TLS", ["role"], registry=r)
        self.auth_failures = Counter("mailhost_smtp_auth_failures", "Failed AUTH attempts", ["role"], registry=r)
        self.received = Counter(
            "mailhost_messages_received", "Messages received, by role and result (accepted, refused)",
            ["role", "result"], registry=r,
        )
        self.deliveries = Counter(
            "mailhost_deliveries", "Recipient delivery results (delivered, deferred, bounced, expired)",
            ["result"], registry=r,
        )
        self.delivery_delay = Histogram(
            "mailhost_delivery_delay_seconds", "Time from arrival to delivery, per delivered recipient",
            buckets=DELAY_BUCKETS, registry=r,
        )
        self.queue_size = Gauge("mailhost_queue_messages", "Messages in the outbound queue", registry=r)
        self.oldest = Gauge("mailhost_queue_oldest_message_age_seconds", "Age of the oldest queued message", registry=r)

    def watch_throttle(self, snapshot: Callable[[], dict[str, dict[str, float]]]) -> None:
        """Each paced destination group's current rate, read at scrape time."""
        self.registry.register(_ThrottleCollector(snapshot))

    def watch_queue(self, size: Callable[[], int], oldest_arrival: Callable[[], float | None]) -> None:
        """Gauges read at scrape time, from the scheduler's in-memory index."""
        self.queue_size.set_function(size)
        self.oldest.set_function(lambda: (time.time() - arrival) if (arrival := oldest_arrival()) else 0.0)


class _ThrottleCollector:
    def __init__(self, snapshot: Callable[[], dict[str, dict[str, float]]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Any:
        rate = GaugeMetricFamily("mailhost_throttle_rate_per_minute", "Current pace of a destination group", labels=["group"])
        ceiling = GaugeMetricFamily("mailhost_throttle_max_rate_per_minute", "Configured pace of a destination group",
                                    labels=["group"])
        for group, values in self._snapshot().items():
            rate.add_metric([group], values["rate"])
            ceiling.add_metric([group], values["max_rate"])
        yield rate
        yield ceiling


class _Health(Resource):
    isLeaf = True

    def __init__(self, ready: Callable[[], bool]) -> None:
        super().__init__()
        self._ready = ready

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if self._ready():
            return b"ok\n"
        request.setResponseCode(503)
        return b"starting\n"


def metrics_site(metrics: Metrics, ready: Callable[[], bool]) -> Site:
    """/metrics (Prometheus text) and /healthz (200 once the queue is loaded)."""
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry=metrics.registry))
    root.putChild(b"healthz", _Health(ready))
    site = Site(root)
    site.noisy = False
    return site
