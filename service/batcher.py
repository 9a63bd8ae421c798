"""Dynamic micro-batching: concurrent caption requests share one model call.

Request threads decode and resize their image and ``submit`` it. One worker thread takes the
oldest waiting job, gathers more until ``max_batch_size`` or until that job has waited
``max_wait_ms``, runs the encoder once over all of them, then decodes each group of jobs whose
options are compatible in one ``generate`` call. Sampling seeds are per image, so a request's
captions do not depend on which other requests happened to share its batch.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import torch

from captioner.options import DecodeOptions
from captioner.models.captioner import Captioner

log = logging.getLogger("captioner.service")


class QueueFull(Exception):
    """The queue of waiting jobs is at its limit; the client should retry later."""


class NotReady(Exception):
    """The model is not loaded (yet, or any more)."""


@dataclass
class CaptionJob:
    """One image waiting for captions."""

    pixels: torch.Tensor  # (3, S, S) uint8, resized (ImageTransform.resize), on the CPU
    options: DecodeOptions
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class CaptionResult:
    captions: list[dict]  # [{"text", "log_prob", "perplexity"}]
    timing_ms: dict[str, float]  # queue, encode, generate
    batch_size: int  # images in the model call that served this job


def decode_group(options: DecodeOptions) -> DecodeOptions:
    """The options jobs must share to be decoded in one ``generate`` call.

    The seed is applied per image; every other option acts on the whole call. (Options a mode
    does not use are always at their defaults: DecodeOptions refuses anything else.)
    """
    return replace(options, seed=None)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


class MicroBatcher:
    """A worker thread that loads the model, then captions submitted images in batches.

    Args:
        load_model: called once in the worker thread; the batcher is ready when it returns.
        max_batch_size: most images in one model call.
        max_wait_ms: longest a job waits for others to join its batch.
        max_queue: most jobs waiting; ``submit`` raises ``QueueFull`` beyond it.
        on_batch: called with the size of every model call once its jobs are answered (for
            metrics; the model process sends the call's answers with it).
    """

    def __init__(
        self,
        load_model: Callable[[], Captioner],
        *,
        max_batch_size: int = 16,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        on_batch: Callable[[int], None] = lambda size: None,
    ):
        self._load_model = load_model
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self._on_batch = on_batch
        self._queue: queue.Queue[CaptionJob] = queue.Queue(maxsize=max_queue)
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="captioner-batcher", daemon=True)
        self.model: Captioner | None = None
        self.load_error: Exception | None = None

    def start(self) -> MicroBatcher:
        self._thread.start()
        return self

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._stopping.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def queue_depth(self) -> int:
        return self._queue.qsize()

    def submit(self, pixels: torch.Tensor, options: DecodeOptions) -> Future:
        """Queue one image; the future's result is a ``CaptionResult``.

        Raises:
            NotReady: the model is not loaded, or the batcher is stopping.
            QueueFull: ``max_queue`` jobs are already waiting.
        """
        if not self.ready:
            raise NotReady("the model is not loaded")
        job = CaptionJob(pixels, options)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} requests are already waiting") from None
        return job.future

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in progress, fail the jobs still waiting, and end the worker thread."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(NotReady("the service is shutting down"))

    def _run(self) -> None:
        try:
            self.model = self._load_model()
        except Exception as exc:
            self.load_error = exc
            log.exception("the model failed to load")
            return
        self._ready.set()
        log.info("model ready", extra={"fields": {"max_batch_size": self.max_batch_size}})
        while not self._stopping.is_set():
            jobs = self._gather()
            if jobs:
                self._run_batch(jobs)

    def _gather(self) -> list[CaptionJob]:
        """The oldest job and those that join it in time; [] after a short idle wait."""
        try:
            first = self._queue.get(timeout=0.1)  # wakes up now and then to notice stop()
        except queue.Empty:
            return []
        jobs = [first]
        # Waiting counts from the first job's arrival: jobs that queued up while the previous
        # batch ran are taken at once.
        deadline = first.enqueued + self.max_wait
        while len(jobs) < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            try:
                jobs.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        # A job whose request gave up waiting was cancelled: skip it.
        return [job for job in jobs if job.future.set_running_or_notify_cancel()]

    def _run_batch(self, jobs: list[CaptionJob]) -> None:
        model = self.model
        started = time.perf_counter()
        try:
            features = model.encode_pixels(torch.stack([job.pixels for job in jobs]))  # (B, F)
            encode_ms = _ms(time.perf_counter() - started)
            groups: dict[DecodeOptions, list[int]] = {}
            for i, job in enumerate(jobs):
                groups.setdefault(decode_group(job.options), []).append(i)
            for options, members in groups.items():
                generate_started = time.perf_counter()
                seeds = [jobs[i].options.seed for i in members]
                captions = model.describe(model.generate(features[members], options, seeds))
                generate_ms = _ms(time.perf_counter() - generate_started)
                for i, image_captions in zip(members, captions, strict=True):
                    timing = {"queue": _ms(started - jobs[i].enqueued), "encode": encode_ms, "generate": generate_ms}
                    jobs[i].future.set_result(CaptionResult(image_captions, timing, len(jobs)))
        except Exception as exc:
            log.exception("a model call failed", extra={"fields": {"batch_size": len(jobs)}})
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
        self._on_batch(len(jobs))
