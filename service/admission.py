"""Admission: how many caption requests the service takes on at once, and how many decode at once.

A request is admitted, or answered 429 with Retry-After, before its body is read or its image
decoded, so overload costs the service almost nothing and clients learn at once when to come back.
Admitted requests decode a few at a time: a decode's memory is bounded (captioner.data.images),
so this bounds the worker's memory for decoding to ``decodes`` times that.
"""

from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager


class Busy(Exception):
    """Every admission slot is taken; ``retry_after`` is a whole number of seconds to wait."""

    def __init__(self, limit: int, retry_after: int):
        super().__init__(f"{limit} requests are already in progress")
        self.retry_after = retry_after


class Admission:
    """At most ``limit`` requests in progress; at most ``decodes`` of them decoding at once.

    Retry-After is the time admitted requests have recently taken (a moving average, rounded up
    to whole seconds, at least 1): by then, about a full set of slots has freed up.
    """

    def __init__(self, limit: int, decodes: int):
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)
        self._decodes = threading.BoundedSemaphore(decodes)
        self._lock = threading.Lock()
        self._average_s = 1.0

    @contextmanager
    def admitted(self):
        """Hold a slot for the request's duration.

        Raises:
            Busy: no slot free; nothing of the request has been read.
        """
        if not self._slots.acquire(blocking=False):
            raise Busy(self.limit, max(1, math.ceil(self._average_s)))
        started = time.perf_counter()
        try:
            yield
        finally:
            self._slots.release()
            with self._lock:
                self._average_s += 0.1 * (time.perf_counter() - started - self._average_s)

    @contextmanager
    def decoding(self):
        """Wait for one of the ``decodes`` decode slots and hold it."""
        with self._decodes:
            yield
