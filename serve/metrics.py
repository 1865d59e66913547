"""The service's Prometheus metrics (GET /metrics): requests, refusals, latency, stages, queue, batches, verdicts
and streams. No user content is ever a label."""

from __future__ import annotations


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("omniguard_requests", "HTTP requests answered", ["endpoint", "status"],
                                registry=self.registry)
        self.errors = Counter("omniguard_errors", "requests refused or failed, by kind", ["kind"],
                              registry=self.registry)
        self.latency = Histogram("omniguard_request_seconds", "time from receipt to answer", ["endpoint"],
                                 registry=self.registry)
        self.stages = Histogram("omniguard_stage_seconds", "the Guard's stage timings", ["stage"],
                                registry=self.registry)
        self.queue = Gauge("omniguard_queue_depth", "jobs waiting for the batcher", registry=self.registry)
        self.batch = Histogram("omniguard_batch_size", "requests per moderate_batch call",
                               buckets=(1, 2, 4, 8, 16, 32), registry=self.registry)
        self.verdicts = Counter("omniguard_verdicts", "results by verdict", ["verdict"], registry=self.registry)
        self.streams = Gauge("omniguard_open_streams", "open /v1/streams", registry=self.registry)
        self.stream_kv = Gauge("omniguard_stream_kv_bytes", "decoder cache the open streams hold",
                               registry=self.registry)
