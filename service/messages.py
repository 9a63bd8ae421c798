"""The messages between the HTTP process and its model process (service/model_process.py).

One frozen dataclass a message, pickled on their one duplex pipe; each end builds them by field
name and tells them apart by class (as CPython's concurrent.futures sends ``_CallItem`` and
``_ResultItem`` to its workers and back). Fields are keyword-only, so that neither a constructor
call nor a class pattern can depend on their order.

HTTP -> model: ``Slab``, once, before any job; then ``Job``, ``Cancel`` and ``Stop``.
model -> HTTP: ``Ready`` or ``LoadFailed``, once; then ``BatchAnswers`` for each model call, and
``StopAnswers`` on stop. An answer is ``Done`` or ``Failed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from captioner.options import DecodeOptions
from service.batcher import CaptionResult
from service.model import ServedModel

# --- HTTP -> model ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Slab:
    """The shared memory that holds the pixels of every job to come, one slot a job."""

    pixels: torch.Tensor  # (slots, 3, S, S) uint8, resized, not yet normalised


@dataclass(frozen=True, kw_only=True)
class Job:
    """Caption the image in ``slot`` of the slab."""

    job_id: int
    slot: int
    options: DecodeOptions
    sent: float  # time.monotonic() when the HTTP process sent it (a clock both processes share)


@dataclass(frozen=True, kw_only=True)
class Cancel:
    """The job's request gave up waiting: skip it if it has not been taken into a batch."""

    job_id: int


@dataclass(frozen=True, kw_only=True)
class Stop:
    """Finish the batch in progress, fail the jobs still waiting (``StopAnswers``) and exit."""


ToModel = Slab | Job | Cancel | Stop


# --- model -> HTTP ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Ready:
    """The model is loaded."""

    served: ServedModel


@dataclass(frozen=True, kw_only=True)
class LoadFailed:
    """The model failed to load; the model process has exited (it is not started again)."""

    text: str  # the error's message
    is_captioner_error: bool  # a CaptionerError (one a user can act on), not another exception


@dataclass(frozen=True, kw_only=True)
class Done:
    """A job's captions."""

    job_id: int
    result: CaptionResult


@dataclass(frozen=True, kw_only=True)
class Failed:
    """A job without captions."""

    job_id: int
    shutting_down: bool  # True: never taken before stop; False: its model call raised


Answer = Done | Failed


@dataclass(frozen=True, kw_only=True)
class BatchAnswers:
    """A model call's size and the answers of its jobs, sent as soon as the call ends."""

    size: int
    answers: tuple[Answer, ...]


@dataclass(frozen=True, kw_only=True)
class StopAnswers:
    """On stop, the answers of the jobs still waiting: each ``Failed`` as shutting down."""

    answers: tuple[Failed, ...]


FromModel = Ready | LoadFailed | BatchAnswers | StopAnswers
