"""Prometheus metrics and a health check, served on `[metrics] endpoint`.

prometheus_client does the exposition format; each daemon gets its own
registry (no process-global state), handed to the parts that count.

With `[server] workers`, each worker writes a snapshot of its registry every
SNAPSHOT_SECONDS into state_dir/metrics/, and the main process serves the sum
of its own figures and the fresh snapshots, sample by sample (the age of the
oldest queued message: the largest), under the same names.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.twisted import MetricsResource
from twisted.web.resource import Resource
from twisted.web.server import Site

DELAY_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86400, 5 * 86400)
SNAPSHOT_SECONDS = 1.0  # how often a worker writes its figures for the main process
STALE_SECONDS = 10.0  # a snapshot older than this is a worker that is gone: left out
LARGEST_NOT_SUM = frozenset({"mailhost_queue_oldest_message_age_seconds", "mailhost_throttle_paused_seconds"})


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
        self.blocks = Counter(
            "mailhost_blocks", "Policy, authentication and content refusals that paused a destination group, "
            "by group (provider) and bounce class", ["group", "class"], registry=r,
        )
        self.bounces = Counter(
            "mailhost_bounces", "Refusals (4xx and 5xx replies) our deliveries got, by bounce class and kind "
            "(temporary, permanent)", ["class", "kind"], registry=r,
        )
        self.delivery_delay = Histogram(
            "mailhost_delivery_delay_seconds", "Time from arrival to delivery, per delivered recipient",
            buckets=DELAY_BUCKETS, registry=r,
        )
        self.queue_size = Gauge("mailhost_queue_messages", "Messages in the outbound queue", registry=r)
        self.oldest = Gauge("mailhost_queue_oldest_message_age_seconds", "Age of the oldest queued message", registry=r)
        self.corrupt = Gauge("mailhost_queue_corrupt", "Unreadable envelopes set aside in spool/corrupt/", registry=r)

    def watch_corrupt(self, count: Callable[[], int]) -> None:
        """The corrupt envelopes in the spool, counted at scrape time (by the main process only:
        the workers' figures are added to its own)."""
        self.corrupt.set_function(count)

    def watch_throttle(self, snapshot: Callable[[], dict[str, dict[str, float]]]) -> None:
        """Each paced destination group's current rate, read at scrape time."""
        self.registry.register(_ThrottleCollector(snapshot))

    def watch_complaints(self, rates: Callable[[], dict[str, tuple[float, int]]]) -> None:
        """Each provider's complaint rate over the window and its complaints ever, read at scrape
        time (by the main process only: the figures are already those of every process)."""
        self.registry.register(_ComplaintCollector(rates))

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
        paused = GaugeMetricFamily("mailhost_throttle_paused_seconds",
                                   "Seconds a destination group stays paused after a block", labels=["group"])
        for group, values in self._snapshot().items():
            rate.add_metric([group], values["rate"])
            ceiling.add_metric([group], values["max_rate"])
            paused.add_metric([group], values.get("paused_for", 0.0))
        yield rate
        yield ceiling
        yield paused


class _ComplaintCollector:
    def __init__(self, rates: Callable[[], dict[str, tuple[float, int]]]) -> None:
        self._rates = rates

    def collect(self) -> Any:
        rate = GaugeMetricFamily("mailhost_complaint_rate", "Spam complaints / delivered over the last 24 hours, "
                                 "by mailbox provider", labels=["provider"])
        total = CounterMetricFamily("mailhost_complaints", "Spam complaint reports (ARF) taken, by mailbox provider",
                                    labels=["provider"])
        for provider, (value, complaints) in self._rates().items():
            rate.add_metric([provider], value)
            total.add_metric([provider], complaints)
        yield rate
        yield total


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


def snapshots_folder(state_dir: Path) -> Path:
    return state_dir / "metrics"


def write_snapshot(metrics: Metrics, path: Path) -> None:
    """This process's figures as JSON, replaced atomically (a worker, for the main process to add up)."""
    families = [
        {"name": f.name, "type": f.type, "help": f.documentation,
         "samples": [[s.name, s.labels, s.value] for s in f.samples if not s.name.endswith("_created")]}
        for f in metrics.registry.collect()
    ]
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(families))
    os.replace(temporary, path)


class AllProcesses:
    """Collector: this process's registry plus every fresh worker snapshot in `folder`, summed."""

    def __init__(self, registry: CollectorRegistry, folder: Path, clock: Callable[[], float] = time.time) -> None:
        self._registry = registry
        self._folder = folder
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}

        def add(name: str, kind: str, documentation: str, samples: Any) -> None:
            if name not in families:
                families[name] = Metric(name, documentation, kind)
                values[name] = {}
            into = values[name]
            for sample_name, labels, value in samples:
                key = (sample_name, tuple(sorted(labels.items())))
                if key not in into:
                    into[key] = value
                elif name in LARGEST_NOT_SUM:
                    into[key] = max(into[key], value)
                elif not sample_name.endswith("_created"):
                    into[key] += value

        for family in self._registry.collect():
            add(family.name, family.type, family.documentation, ((s.name, s.labels, s.value) for s in family.samples))
        for snapshot in self._fresh_snapshots():
            for family in snapshot:
                add(family["name"], family["type"], family["help"], family["samples"])
        for name, family in families.items():
            for (sample_name, labels), value in values[name].items():
                family.add_sample(sample_name, dict(labels), value)
            yield family

    def _fresh_snapshots(self) -> Iterator[list[dict]]:
        now = self._clock()
        try:
            entries = list(os.scandir(self._folder))
        except FileNotFoundError:
            return
        for entry in entries:
            if not (entry.name.startswith("worker") and entry.name.endswith(".json")):
                continue
            try:
                if now - entry.stat().st_mtime > STALE_SECONDS:
                    continue
                with open(entry.path, "rb") as f:
                    yield json.loads(f.read())
            except (OSError, ValueError):
                continue  # replaced or removed meanwhile: the next scrape has it


def metrics_site(metrics: Metrics, ready: Callable[[], bool], workers_folder: Path | None = None) -> Site:
    """/metrics (Prometheus text) and /healthz (200 once the queue is loaded). With
    `workers_folder`, /metrics adds up this process's figures and the workers' snapshots."""
    registry = metrics.registry
    if workers_folder is not None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(AllProcesses(metrics.registry, workers_folder))
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry=registry))
    root.putChild(b"healthz", _Health(ready))
    site = Site(root)
    site.noisy = False
    return site
