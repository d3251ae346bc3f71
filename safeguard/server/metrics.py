"""Prometheus metrics of one server, in a registry of their own (two apps in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["Metrics"]

_LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Requests by endpoint/policy/status, fired categories, queue depth, generated tokens, latency, batch sizes."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("safeguard_requests", "Requests answered.", ["endpoint", "policy", "status"], registry=r)
        self.fired = Counter("safeguard_fired_categories", "Categories that fired.", ["policy", "category"], registry=r)
        self.tokens = Counter("safeguard_generated_tokens", "New tokens generated.", ["policy"], registry=r)
        self.queue_depth = Gauge("safeguard_queue_depth", "Requests admitted and not finished (waiting or generating).", registry=r)
        self.latency = Histogram("safeguard_request_latency_seconds", "Arrival to last byte of the reply.", ["endpoint"],
                                 buckets=_LATENCY, registry=r)
        self.ttft = Histogram("safeguard_time_to_first_token_seconds", "Streams: arrival to the first text piece.", buckets=_LATENCY,
                              registry=r)
        self.batch_rows = Histogram("safeguard_batch_rows", "Rows per prefill (rows that joined the running batch together; mode window: per generate call).",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
                                    registry=r)
        self.streams_stopped = Counter("safeguard_streams_stopped", "Streams whose generation was stopped early (client gone, timeout).",
                                       registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
