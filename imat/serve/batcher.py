"""ModelBatcher: images of concurrent requests run through the model together.

One worker thread owns the model. A request submits its decoded images and gets a
Future; the worker takes the first waiting request, then keeps taking requests until the
batch holds `max_batch` images or `max_wait_ms` has passed since it took the first, runs
the model once per `max_batch` images and hands each request its rows. With batching off
every request is its own model call. At most `queue_limit` images wait: beyond that
`submit` raises QueueFull (the app answers 503 with Retry-After) instead of letting the
queue, and every request's latency, grow without bound.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time

import numpy as np

from imat.serve.metrics import ServeMetrics

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """More images are waiting for the model than the queue allows."""


@dataclasses.dataclass
class _Job:
    images: np.ndarray  # uint8 [n, H, W, 3]
    future: concurrent.futures.Future


class ModelBatcher:
    def __init__(self, session, *, max_batch: int, max_wait_ms: float, queue_limit: int, batching: bool = True,
                 metrics: ServeMetrics | None = None):
        self.session = session
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.queue_limit = queue_limit
        self.batching = batching
        self.metrics = metrics or ServeMetrics()
        self._jobs: collections.deque[_Job] = collections.deque()
        self._waiting_images = 0
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    @property
    def queue_depth(self) -> int:
        """Images waiting for the model (not counting the batch running now)."""
        return self._waiting_images

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="imat-model-batcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._cond:  # nobody will run these now
            while self._jobs:
                self._jobs.popleft().future.set_exception(RuntimeError("the server is shutting down"))
            self._waiting_images = 0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop

    def submit(self, images: np.ndarray) -> concurrent.futures.Future:
        """Queue uint8 [n,H,W,3] images; the Future gives the model's outputs for them ({name: [n, ...]})."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        n = int(images.shape[0])
        with self._cond:
            if self._stop:
                raise RuntimeError("the server is shutting down")
            if self._waiting_images + n > self.queue_limit and self._waiting_images > 0:
                self.metrics.rejected.inc()
                raise QueueFull(f"{self._waiting_images} images are waiting for the model (limit {self.queue_limit})")
            self._jobs.append(_Job(images, future))
            self._waiting_images += n
            self._cond.notify()
        return future

    def _take_batch(self) -> list[_Job] | None:
        with self._cond:
            while not self._jobs and not self._stop:
                self._cond.wait(timeout=0.5)
            if self._stop:
                return None
            jobs = [self._jobs.popleft()]
            images = jobs[0].images.shape[0]
            if self.batching:
                deadline = time.monotonic() + self.max_wait_s
                while images < self.max_batch:
                    if not self._jobs:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._cond.wait(timeout=remaining)
                        if self._stop:
                            break
                        continue
                    if images + self._jobs[0].images.shape[0] > self.max_batch:
                        break
                    job = self._jobs.popleft()
                    jobs.append(job)
                    images += job.images.shape[0]
            self._waiting_images -= images
            return jobs

    def _run(self) -> None:
        while True:
            jobs = self._take_batch()
            if jobs is None:
                return
            try:
                outputs = self._run_model(np.concatenate([j.images for j in jobs]))
            except BaseException as e:  # noqa: BLE001 - handed to every waiting request, the worker goes on
                logger.exception("model call failed")
                for j in jobs:
                    j.future.set_exception(e)
                continue
            self.metrics.batch_requests.observe(len(jobs))
            start = 0
            for j in jobs:
                n = j.images.shape[0]
                j.future.set_result({name: value[start:start + n] for name, value in outputs.items()})
                start += n

    def _run_model(self, images: np.ndarray) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, images.shape[0], self.max_batch):
            chunk = images[start:start + self.max_batch]
            out = self.session.run(chunk)
            self.metrics.model_calls.inc()
            self.metrics.batch_images.observe(chunk.shape[0])
            for name, value in out.items():
                parts.setdefault(name, []).append(np.asarray(value))
        return {name: np.concatenate(chunks) for name, chunks in parts.items()}
