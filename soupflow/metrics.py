"""What a monitoring system scrapes: Prometheus metrics through `prometheus_client`.

Upstream: ingest (stores, refusals, bytes, the price of an ACK), receivers (associations),
runtime.workers (finished messages, their latency), pipeline.run (activity attempts and
durations), runtime.admin_http (`/metrics`). Labels are bounded: `workflow` is the
WorkflowId, `activity` the setting's Id, `status` a DIMSE status in hex, `state` and `result`
small fixed sets. Never a UID, a patient value or an address. The queue's gauges are read
from the queue at each scrape (`QueueCollector`), so they are true across processes. The
counters and histograms of a worker process are its own: it reports them (`report`, written
to a file every second by runtime.processes) and its runtime's `/metrics` adds them to its
own (`WithReports`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from importlib.metadata import version

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from soupflow.store.queue import Queue, State

REGISTRY = CollectorRegistry()
# What adds up across processes, as one row per sample: (family, sample, labels, value).
ReportRow = tuple[str, str, dict[str, str], float]
_ADDED_UP = frozenset(("counter", "histogram"))
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_LATENCY = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)

BUILD = Info("soupflow_build", "The running soupflow.", registry=REGISTRY)
BUILD.info({"version": version("soupflow")})
ASSOCIATIONS = Counter(
    "soupflow_associations_total",
    "Associations asked for, by result (accepted, rejected).",
    ["workflow", "result"],
    registry=REGISTRY,
)
RECEIVED = Counter(
    "soupflow_instances_received",
    "Instances answered Success and durably committed.",
    ["workflow"],
    registry=REGISTRY,
)
REFUSED = Counter(
    "soupflow_instances_refused",
    "Instances answered with a failure status (hex).",
    ["workflow", "status"],
    registry=REGISTRY,
)
BYTES = Counter(
    "soupflow_received_bytes", "Bytes of the instances committed.", ["workflow"], registry=REGISTRY
)
COMMIT = Histogram(
    "soupflow_store_commit_seconds",
    "From the object's last byte to its durable commit: the price of an acknowledgement.",
    buckets=_SECONDS,
    registry=REGISTRY,
)
HELD = Counter(
    "soupflow_intake_held_seconds",
    "Seconds answers were held back because the workflow's backlog was over its limit.",
    ["workflow"],
    registry=REGISTRY,
)
FINISHED = Counter(
    "soupflow_messages_finished",
    "Messages that reached a final state (completed, filtered, dead).",
    ["workflow", "state"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "soupflow_message_latency_seconds",
    "From receipt to the message's final state.",
    ["workflow"],
    buckets=_LATENCY,
    registry=REGISTRY,
)
ATTEMPTS = Counter(
    "soupflow_activity_attempts",
    "Activity attempts by outcome (success, transient, permanent).",
    ["workflow", "activity", "outcome"],
    registry=REGISTRY,
)
WORKER_PROCESSES = Gauge(
    "soupflow_worker_processes",
    "Worker processes running (`run --processes N`; fewer while one waits to start again).",
    registry=REGISTRY,
)
WORKER_EXITS = Counter(
    "soupflow_worker_process_exits",
    "Worker processes that exited while the runtime ran (each is started again).",
    registry=REGISTRY,
)
DURATION = Histogram(
    "soupflow_activity_duration_seconds",
    "How long one attempt of an activity took.",
    ["workflow", "activity"],
    buckets=_SECONDS,
    registry=REGISTRY,
)


class QueueCollector(Collector):
    """The queue's state at scrape time: messages by state, the oldest pending age, dead."""

    def __init__(self, queue: Callable[[], Queue | None], clock: Callable[[], float] = time.time):
        self._queue = queue
        self._clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        messages = GaugeMetricFamily(
            "soupflow_queue_messages",
            "Messages in the queue by state.",
            labels=["workflow", "state"],
        )
        oldest = GaugeMetricFamily(
            "soupflow_queue_oldest_pending_age_seconds",
            "Age of the oldest queued or processing message.",
            labels=["workflow"],
        )
        dead = GaugeMetricFamily(
            "soupflow_queue_dead_messages", "Dead messages.", labels=["workflow"]
        )
        queue = self._queue()
        if queue is not None:
            now = self._clock()
            for entry in queue.counts():
                for state in State:
                    messages.add_metric(
                        [entry.workflow_id, state.value], entry.by_state.get(state, 0)
                    )
                pending = entry.oldest_pending_received_at
                oldest.add_metric([entry.workflow_id], max(now - pending, 0.0) if pending else 0.0)
                dead.add_metric([entry.workflow_id], entry.by_state.get(State.DEAD, 0))
        yield messages
        yield oldest
        yield dead


class RuntimeCollector(Collector):
    """The workflows a runtime runs, by (WorkflowId, name, connections served now)."""

    def __init__(self, workflows: Callable[[], list[tuple[str, str, int]]]) -> None:
        self._workflows = workflows

    def collect(self) -> Iterator[GaugeMetricFamily]:
        info = GaugeMetricFamily(
            "soupflow_workflow_info",
            "A workflow the runtime runs (1).",
            labels=["workflow", "name"],
        )
        active = GaugeMetricFamily(
            "soupflow_associations_active",
            "Connections its listener serves now (associations, or STOW-RS connections).",
            labels=["workflow"],
        )
        for workflow_id, name, connections in self._workflows():
            info.add_metric([workflow_id, name], 1)
            active.add_metric([workflow_id], connections)
        yield info
        yield active


def report() -> list[ReportRow]:
    """This process's counters and histograms, for its runtime to add to its own (their
    `_created` timestamps are left out: the runtime's own say when counting started)."""
    return [
        (family.name, sample.name, sample.labels, sample.value)
        for family in REGISTRY.collect()
        if family.type in _ADDED_UP
        for sample in family.samples
        if not sample.name.endswith("_created")
    ]


def added_up(reports: Iterable[Iterable[ReportRow]]) -> list[ReportRow]:
    """Reports of several processes as one: each sample summed by family, name and labels."""
    sums: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
    for rows in reports:
        for family, name, labels, value in rows:
            key = (family, name, tuple(sorted(labels.items())))
            sums[key] = sums.get(key, 0.0) + value
    return [(family, name, dict(labels), value) for (family, name, labels), value in sums.items()]


class WithReports(Collector):
    """REGISTRY's metrics with what other processes reported added to its counters and
    histograms: one family per name, as Prometheus requires, summed by labels."""

    def __init__(self, reports: Callable[[], Iterable[Iterable[ReportRow]]]) -> None:
        self._reports = reports

    def collect(self) -> Iterator[Metric]:
        added: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for family_name, sample_name, sample_labels, count in added_up(self._reports()):
            key = (sample_name, tuple(sorted(sample_labels.items())))
            added.setdefault(family_name, {})[key] = count
        for family in REGISTRY.collect():
            extra = added.get(family.name)
            if not extra or family.type not in _ADDED_UP:
                yield family
                continue
            merged = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                total = sample.value + extra.pop(key, 0.0)
                merged.add_sample(sample.name, sample.labels, total, sample.timestamp)
            for (name, labels), value in extra.items():  # label values only they have seen
                merged.add_sample(name, dict(labels), value)
            yield merged
