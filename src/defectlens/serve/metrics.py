"""Prometheus metrics of one service: requests, latency, inference time, verdicts, queue, rejections."""

from __future__ import annotations

from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: The flagged-rate gauge looks at this many latest inspections per model.
FLAGGED_WINDOW = 200


class ServiceMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, pool=None):
        # One registry per app: two services in one process (tests) never share counters.
        self.registry = CollectorRegistry()
        self.requests = Counter("defectlens_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("defectlens_http_request_seconds", "HTTP request latency by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inference = Histogram("defectlens_inference_seconds", "Prediction time per image by model",
                                   ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inspections = Counter("defectlens_inspections", "Inspected images by model and label",
                                   ["model", "label"], registry=self.registry)
        self.flagged_rate = Gauge("defectlens_flagged_ratio",
                                  f"Fraction of the latest {FLAGGED_WINDOW} inspections labelled anomalous",
                                  ["model"], registry=self.registry)
        self.rejected = Counter("defectlens_rejected_requests", "Requests refused before inference, by reason",
                                ["reason"], registry=self.registry)
        self.queue = Gauge("defectlens_queue_jobs", "Prediction jobs running or waiting", registry=self.registry)
        if pool is not None:
            self.queue.set_function(lambda: pool.pending)
        self._recent: dict[str, deque] = {}

    def inspected(self, model: str, label: str | None, seconds_per_image: float) -> None:
        self.inspections.labels(model, label or "none").inc()
        self.inference.labels(model).observe(seconds_per_image)
        window = self._recent.setdefault(model, deque(maxlen=FLAGGED_WINDOW))
        window.append(label == "anomalous")
        self.flagged_rate.labels(model).set(sum(window) / len(window))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
