"""Dynamic micro-batching: concurrent caption requests share one model call.

The model process (service/model_process.py) reads the jobs the HTTP process sends it into a
``MicroBatcher``, which says when the next batch is due: when ``max_batch_size`` jobs wait, or
when the oldest has waited ``max_wait_ms`` since the HTTP process sent it. ``caption_batch`` then
runs the encoder once over the batch and decodes each group of jobs whose options are compatible
in one ``generate`` call. Sampling seeds are per image, so a request's captions do not depend on
which other requests happened to share its batch.

Nothing here has a thread: the model process's one thread reads jobs between batches, and those
that arrive during a batch wait in the pipe until it ends. (A thread of its own reading the pipe,
waking for every job, cost the model a tenth of its CPU a request; README, "Serving".)
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, replace

import torch

from captioner.options import DecodeOptions
from captioner.models.captioner import Captioner

log = logging.getLogger("captioner.service")


@dataclass
class CaptionJob:
    """One image waiting for captions."""

    job_id: int
    pixels: torch.Tensor  # (3, S, S) uint8, resized (ImageTransform.resize): its slot in shared memory
    options: DecodeOptions
    sent: float  # time.monotonic() when the HTTP process sent it (a clock both processes share)


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
    """The jobs waiting for the model, oldest first, and when the next batch of them is due.

    Args:
        max_batch_size: most images in one model call.
        max_wait_ms: longest a job waits for others to join its batch, from when it was sent:
            jobs that queued up while the previous batch ran are taken at once.
    """

    def __init__(self, max_batch_size: int = 16, max_wait_ms: float = 5.0):
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self._waiting: dict[int, CaptionJob] = {}  # by id, in the order they came

    def add(self, job: CaptionJob) -> None:
        self._waiting[job.job_id] = job

    def cancel(self, job_id: int) -> None:
        """Drops a job whose request gave up waiting, if it has not been taken yet."""
        self._waiting.pop(job_id, None)

    def time_left(self) -> float | None:
        """Seconds the oldest job may still wait for others to join it (0 once it has waited
        long enough); None while no job waits."""
        if not self._waiting:
            return None
        oldest = next(iter(self._waiting.values()))
        return max(0.0, oldest.sent + self.max_wait - time.monotonic())

    def full(self) -> bool:
        """Whether the next batch is as large as it can be."""
        return len(self._waiting) >= self.max_batch_size

    def take(self, everything: bool = False) -> list[CaptionJob]:
        """The next batch: the oldest jobs, up to ``max_batch_size`` (all of them with ``everything``)."""
        count = len(self._waiting) if everything else self.max_batch_size
        jobs = list(itertools.islice(self._waiting.values(), count))
        for job in jobs:
            del self._waiting[job.job_id]
        return jobs


def caption_batch(model: Captioner, jobs: list[CaptionJob]) -> list[CaptionResult | None]:
    """Each job's captions, from one encoder call and a ``generate`` call per decode group; None
    for the jobs whose call raised (logged here; the client is told no more than that)."""
    results: list[CaptionResult | None] = [None] * len(jobs)
    started = time.monotonic()
    try:
        features = model.encode_pixels(torch.stack([job.pixels for job in jobs]))  # (B, F)
        encode_ms = _ms(time.monotonic() - started)
        groups: dict[DecodeOptions, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(decode_group(job.options), []).append(i)
        for options, members in groups.items():
            generate_started = time.monotonic()
            seeds = [jobs[i].options.seed for i in members]
            captions = model.describe(model.generate(features[members], options, seeds), features[members])
            generate_ms = _ms(time.monotonic() - generate_started)
            for i, image_captions in zip(members, captions, strict=True):
                timing = {"queue": _ms(started - jobs[i].sent), "encode": encode_ms, "generate": generate_ms}
                results[i] = CaptionResult(image_captions, timing, len(jobs))
    except Exception:
        log.exception("a model call failed", extra={"fields": {"batch_size": len(jobs)}})
    return results
