"""A background thread that keeps the next few items of a sequence ready (host-side prefetch)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def prefetch(make: Callable[[int], T], keys: Iterable[int], depth: int = 2, *, name: str = "imat-prefetch") -> Iterator[T]:
    """``make(k)`` for each k of ``keys``, in order, computed ``depth`` ahead in a daemon thread.

    An exception in ``make`` is raised in the consumer; closing the iterator early stops the thread.
    """
    if depth <= 0:
        for k in keys:
            yield make(k)
        return
    q: queue.Queue = queue.Queue(maxsize=int(depth))
    stop = threading.Event()
    done = object()

    def produce():
        try:
            for k in keys:
                item = make(k)
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():   # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)
