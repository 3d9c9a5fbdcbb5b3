"""Prometheus text-format metrics (exposition format 0.0.4), written by hand: counters,
histograms and gauges with labels, thread-safe. No dependency for a page of text."""

from __future__ import annotations

import bisect
import threading
from typing import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _labels(pairs: tuple) -> str:
    if not pairs:
        return ""
    body = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                    for k, v in pairs)
    return "{" + body + "}"


class Counter:
    def __init__(self, name: str, help_text: str):
        self.name, self.help = name, help_text
        self._values: dict[tuple, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            for key, v in sorted(self._values.items()):
                lines.append(f"{self.name}{_labels(key)} {v:g}")
        return lines


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple):
        self.name, self.help, self.buckets = name, help_text, tuple(buckets)
        self._series: dict[tuple, list] = {}  # key -> [bucket counts..., sum, count]
        self._lock = threading.Lock()

    def observe(self, value: float, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            s = self._series.setdefault(key, [0] * len(self.buckets) + [0.0, 0])
            i = bisect.bisect_left(self.buckets, value)
            if i < len(self.buckets):
                s[i] += 1
            s[-2] += value
            s[-1] += 1

    def count(self, **labels) -> int:
        s = self._series.get(tuple(sorted(labels.items())))
        return int(s[-1]) if s else 0

    def total(self, **labels) -> float:
        s = self._series.get(tuple(sorted(labels.items())))
        return float(s[-2]) if s else 0.0

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            for key, s in sorted(self._series.items()):
                cumulative = 0
                for bound, n in zip(self.buckets, s):
                    cumulative += n
                    lines.append(f"{self.name}_bucket{_labels(key + (('le', f'{bound:g}'),))} {cumulative}")
                lines.append(f"{self.name}_bucket{_labels(key + (('le', '+Inf'),))} {s[-1]}")
                lines.append(f"{self.name}_sum{_labels(key)} {s[-2]:.6f}")
                lines.append(f"{self.name}_count{_labels(key)} {s[-1]}")
        return lines


class Gauge:
    """A value read when the metrics are rendered."""

    def __init__(self, name: str, help_text: str, read: Callable[[], float]):
        self.name, self.help, self.read = name, help_text, read

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {float(self.read()):g}"]


class ServeMetrics:
    """The server's metrics; gauges are attached once the parts they read exist."""

    def __init__(self):
        self.requests = Counter("imat_requests_total", "HTTP requests by route and status code.")
        self.latency = Histogram("imat_request_duration_seconds", "HTTP request latency by route.", LATENCY_BUCKETS)
        self.model_calls = Counter("imat_model_calls_total", "ONNX Runtime calls (one per batch).")
        self.batch_images = Histogram("imat_batch_images", "Images per model call.", BATCH_BUCKETS)
        self.batch_requests = Histogram("imat_batch_requests", "Requests merged into one model call.",
                                        BATCH_BUCKETS)
        self.rejected = Counter("imat_rejected_total", "Requests answered 503 because the queue was full.")
        self.writes = Counter("imat_index_writes_total", "Acknowledged index writes by operation.")
        self.snapshots = Counter("imat_snapshots_total", "Journal folds into the index folder.")
        self.gauges: list[Gauge] = []

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.gauges.append(Gauge(name, help_text, read))

    def render(self) -> str:
        lines: list[str] = []
        for metric in (self.requests, self.latency, self.model_calls, self.batch_images, self.batch_requests,
                       self.rejected, self.writes, self.snapshots, *self.gauges):
            lines += metric.render()
        return "\n".join(lines) + "\n"
