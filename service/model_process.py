"""The model in a process of its own beside the HTTP process, each with its own GIL.

A caption is a string of small torch calls, and every one of them takes the GIL back when it
returns. In one process, the request threads (reading, decoding images, Flask, JSON) hold the GIL
often enough that the model waited for it at every call: measured at 16 clients, encoding a batch
took ten times as long as offline and the worker kept only 1.1 of 2 CPUs busy. So, as TorchServe
splits its frontend from its model workers, request threads here prepare pixels and ship them over
a pipe; the model process gathers them into batches (service/batcher.py) undisturbed, in one
thread, and sends the captions back.

``ModelProcess`` is the HTTP side's handle on the model process (``submit`` returns a Future). It
starts the model process, and starts it again if it dies: requests then in the model fail with
503 ``not_ready``, and readiness is 503 until the model is loaded again. A model that fails to
load is not retried; a process that dies before its model is ready (it cannot be spawned, is
killed while loading, an import fails in it) is started again after a delay that doubles, 0.5 s
up to 30 s, so that a cause that stays does not become a loop that burns a CPU and floods the log.

The model process ignores SIGINT and SIGTERM: a Ctrl-C or SIGTERM to the whole process group must
not kill the batch in progress. It stops when told (finishing its batch), or when the HTTP
process is gone: its pipe closes, and while it loads, the kernel kills it (PR_SET_PDEATHSIG).
So nothing else may wait for it: multiprocessing's exit handler would end a daemonic child with
SIGTERM and then wait for it forever, so every ModelProcess still running when the interpreter
exits is stopped first (``_stop_all_at_exit``), and a script, a notebook or a test that made an
app exits when its code returns.

The two talk in the messages of service/messages.py, one frozen dataclass each, pickled on one
duplex pipe:
    HTTP -> model: Slab, once, before any job; Job (its id, slot, options and when it was sent),
                   Cancel (a job), Stop
    model -> HTTP: Ready (the ServedModel) or LoadFailed, once; BatchAnswers: a model call's size
                   and its answers, sent as soon as the call ends, in one message; StopAnswers:
                   those of the jobs still waiting on stop. An answer is Done (a CaptionResult)
                   or Failed (shutting down, or the model call raised).
The model process reads the pipe only between batches, so jobs sent during a batch wait in the
socket's buffer until it ends, and a send waits once that is full. So pixels do not travel in
the pipe: jobs of 150 KB, a 224-pixel model's, filled it after one, and batches fell to 2. Each
model process gets a slab of shared memory from the HTTP process, one slot of (3, S, S) uint8
pixels (resized, not yet normalised) for each request the model may hold (``max_queue``; pages
are only taken as slots are used), and a job names its slot; the slot is free again once the job
is answered or cancelled. The HTTP side owns the slab and keeps the books of its slots
(``PendingJobs``); the model process only reads the slot a job names. (A message takes 1.3 KB of
the buffer however small: it still fills at about 160 waiting jobs.)
"""

from __future__ import annotations

import atexit
import ctypes
import itertools
import logging
import multiprocessing
import multiprocessing.util  # registers its exit handler now, so that ours (below) runs before it
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from weakref import WeakSet

import torch

from captioner.errors import CaptionerError
from captioner.options import DecodeOptions
from captioner.runtime import pin_process
from service.batcher import CaptionJob, CaptionResult, MicroBatcher, caption_batch
from service.logs import service_logger
from service.messages import (
    Answer,
    BatchAnswers,
    Cancel,
    Done,
    Failed,
    FromModel,
    Job,
    LoadFailed,
    Ready,
    Slab,
    Stop,
    StopAnswers,
    ToModel,
)
from service.model import ServedModel

log = logging.getLogger("captioner.service")
STOP_TIMEOUT_S = 10.0  # the batch in progress gets this long to finish on stop()
RESTART_DELAY_S = (0.5, 30.0)  # after a death before ready: the first delay, doubled up to the second
_RUNNING: WeakSet[ModelProcess] = WeakSet()  # started and not yet stopped


@atexit.register
def _stop_all_at_exit() -> None:
    """Stop the model processes an app left running (see the module); atexit runs this before
    multiprocessing's own exit handler, which was registered earlier."""
    for process in list(_RUNNING):
        process.stop()


class QueueFull(Exception):
    """``max_queue`` requests are already with the model; the client should retry later."""


class NotReady(Exception):
    """The model is not loaded (yet, or any more), or the service is stopping."""


class ModelCallFailed(Exception):
    """The model raised while captioning a batch (the model process logs the details)."""


@dataclass(frozen=True)
class Placement:
    """Where the model process runs: its torch threads and CPUs, and CPUs it takes as well when its
    CNN is heavy.

    A CPU left to the HTTP side pays for a light model (the demo's service was 26% slower with
    both CPUs of two in its pool), and sits nearly idle beside a photo CNN, which is then the
    whole cost: on 2 CPUs a ResNet-50 served 11 img/s on one and 22 on both, 0.52 and 1.0 of
    offline, where mobilenet_v3_small at 224 px (4 ms an image) fell from 227 to 174 on both
    (README, "A heavy CNN on a small machine"). So the model process times its CNN once loaded,
    and a CNN slower than ``heavy_cnn_ms`` an image takes ``heavy_cnn_cpus`` too, a torch
    thread each.
    """

    torch_threads: int = 1
    cpus: list[int] | None = None  # None: wherever the scheduler puts it
    heavy_cnn_cpus: list[int] | None = None  # the HTTP side's, where the model process may take them
    heavy_cnn_ms: float = 10.0


@dataclass(frozen=True)
class _Pending:
    """A job handed to the model process and not yet answered."""

    future: Future
    slot: int  # where its pixels are in the slab


class PendingJobs:
    """The slab of shared memory for one model process's pixels, and the books of its slots: the
    jobs handed to the model and not yet answered, each in a slot of its own (see the module).

    ModelProcess makes one for each model process once it is ready, and holds its lock around
    every call.

    Args:
        slots: ``max_queue``: one for each request the model may hold.
        side: the model's image size, S.
    """

    def __init__(self, slots: int, side: int):
        # Shared memory from the start, as torch's DataLoader collates into it: its pages are
        # taken only as slots are written (share_memory_() would copy, touching all of them).
        storage = torch.UntypedStorage._new_shared(slots * 3 * side * side)
        self.slab = torch.empty(0, dtype=torch.uint8).set_(storage).view(slots, 3, side, side)  # (slots, 3, S, S)
        self._free = list(range(slots))[::-1]  # slot 0 first
        self._jobs: dict[int, _Pending] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    def full(self) -> bool:
        return not self._free

    def add(self, job_id: int, future: Future) -> int:
        """The free slot that the job's pixels go to (raises IndexError when ``full()``)."""
        slot = self._free.pop()
        self._jobs[job_id] = _Pending(future, slot)
        return slot

    def pop(self, job_id: int) -> Future | None:
        """The job's future, the job forgotten and its slot free again; None if it was not pending."""
        job = self._jobs.pop(job_id, None)
        if job is None:
            return None
        self._free.append(job.slot)
        return job.future

    def pop_all(self) -> list[Future]:
        """Every pending job's future, all of them forgotten and every slot free again."""
        jobs, self._jobs = self._jobs, {}
        self._free.extend(job.slot for job in jobs.values())
        return [job.future for job in jobs.values()]


class ModelProcess:
    """The HTTP process's handle on the model process (see the module).

    Args:
        load_model: picklable, called once in each model process.
        max_batch_size, max_wait_ms: the MicroBatcher's, in the model process.
        max_queue: most requests handed to the model and not yet answered; ``submit`` raises
            ``QueueFull`` beyond it.
        placement: its torch threads and CPUs.
        log_level: of the model process's JSON log lines.
        on_batch: called with the size of every model call (for metrics).
        name: the model's name in the service (service.models), in its log lines.

    Attributes:
        log_load_failure: whether a model that cannot be loaded is logged here, in one line (a
            swap that tries a new file logs its refusal itself).
    """

    def __init__(
        self,
        load_model: Callable,
        *,
        max_batch_size: int = 16,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        placement: Placement = Placement(),
        log_level: str = "INFO",
        on_batch: Callable[[int], None] = lambda size: None,
        name: str | None = None,
    ):
        self._load_model = load_model
        self.name = name
        self._fields = {"model": name} if name is not None else {}
        self.log_load_failure = True
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._batcher_settings = {"max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms}
        self.placement = placement
        self._log_level = log_level
        self._on_batch = on_batch
        self._jobs: PendingJobs | None = None  # the current model process's; None until one is ready
        self._lock = threading.Lock()  # guards _jobs (and what is in it), and _conn and _process as one starts
        # Apart from _lock: a send can block on a full pipe, and the listener must still take
        # answers. Guards _conn's closing too.
        self._sending = threading.Lock()
        self._ids = itertools.count()
        self._conn = None
        self._process = None
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="captioner-model-process", daemon=True)
        self.served: ServedModel | None = None
        self.load_error: Exception | None = None
        self.not_ready_reason: str | None = None  # why the model process is being started again

    def start(self) -> ModelProcess:
        _RUNNING.add(self)
        self._thread.start()
        return self

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._stopping.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def queue_depth(self) -> int:
        jobs = self._jobs
        return 0 if jobs is None else len(jobs)

    @property
    def pid(self) -> int | None:
        """The current model process's id; None until one is started."""
        process = self._process
        return None if process is None else process.pid

    @property
    def exitcode(self) -> int | None:
        """The current model process's exit status (negative: the signal that ended it); None
        while it runs, or before one is started."""
        process = self._process
        return None if process is None else process.exitcode

    def is_alive(self) -> bool:
        """Whether this handle runs a model process or will start one again: False before
        ``start()``, after the model failed to load, and once ``stop()`` has returned (the model
        process reaped and its pipe closed)."""
        return self._thread.is_alive()

    @property
    def sending(self) -> bool:
        """Whether a message to the model process is on its way (a send waits while the pipe is full)."""
        return self._sending.locked()

    def submit(self, pixels: torch.Tensor, options: DecodeOptions) -> Future:
        """Hand one resized (3, S, S) uint8 image to the model; the future's result is a ``CaptionResult``.

        Raises:
            NotReady: the model is not loaded, or the service is stopping.
            QueueFull: ``max_queue`` requests are already with the model.
        """
        future: Future = Future()
        with self._lock:
            if not self.ready:
                raise NotReady("the model is not loaded")
            jobs = self._jobs
            if jobs.full():  # a slot for each request the model holds
                raise QueueFull(f"{self.max_queue} requests are already waiting")
            job_id = next(self._ids)
            slot = jobs.add(job_id, future)
        jobs.slab[slot].copy_(pixels)
        if not self._send(Job(job_id=job_id, slot=slot, options=options, sent=time.monotonic())):
            self._release(job_id)
            raise NotReady("the model process stopped")
        future.add_done_callback(partial(self._forget_if_cancelled, job_id))
        return future

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Let the batch in progress finish, fail the requests still waiting, end the model process;
        on return it has exited and been reaped.

        Safe to call more than once; also called for every model process still running when the
        interpreter exits.
        """
        _RUNNING.discard(self)
        was_ready = self._ready.is_set()
        self._stopping.set()
        with self._lock:
            process = self._process
        if not was_ready and process is not None and process.is_alive():
            process.kill()  # still loading: nothing in progress to finish
        # The model process reads the pipe between batches only, and a send waits once the
        # socket's buffer is full (about 160 jobs waiting): from a thread of its own, so that a
        # model stuck in a batch is still killed in time (the send then fails).
        threading.Thread(target=self._send, args=(Stop(),), name="captioner-stop", daemon=True).start()
        if self._thread.is_alive():
            self._thread.join(timeout)
        process = self._process
        if process is not None and process.is_alive():
            process.kill()
            # Killed is not yet gone: the supervisor reaps it and closes the pipe, at once now.
            self._thread.join(timeout)
        self._fail_pending(NotReady("the service is shutting down"))

    def _send(self, message: ToModel) -> bool:
        """Whether ``message`` went out; not when the process is gone (which _supervise sees)."""
        with self._sending:
            conn = self._conn
            if conn is None:
                return False
            try:
                conn.send(message)
            except OSError:
                return False
        return True

    def _release(self, job_id: int) -> Future | None:
        """A job's future, the job forgotten and its slot free again; None if it was not pending."""
        with self._lock:
            return None if self._jobs is None else self._jobs.pop(job_id)

    def _forget_if_cancelled(self, job_id: int, future: Future) -> None:
        """A request that gave up (timed out): the model process skips it if it has not begun it.
        (Its slot may be reused at once: a batch that has begun holds a copy of the pixels it
        took, and a cancelled job's answer goes to no one.)"""
        if future.cancelled() and self._release(job_id) is not None:
            self._send(Cancel(job_id=job_id))

    def _fail_pending(self, error: Exception) -> None:
        with self._lock:
            futures = [] if self._jobs is None else self._jobs.pop_all()
        for future in futures:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)

    def _supervise(self) -> None:
        """Run the model process, and run it again whenever it dies, until stop(): at once after
        it was ready, after a growing delay while it keeps dying before (see the module)."""
        context = multiprocessing.get_context("spawn")  # never fork a process with threads and torch state
        delay, starts = RESTART_DELAY_S[0], 0
        while not self._stopping.is_set():
            conn, child_conn = context.Pipe()
            process = context.Process(
                target=serve_model,
                args=(child_conn, self._load_model, self._batcher_settings, self.placement, self._log_level, os.getpid(), self.name),
                name="captioner-model",
                daemon=True,
            )
            with self._lock:
                self._conn, self._process = conn, process
                if self._stopping.is_set():
                    break
                try:
                    start_on(process, self.placement)
                    failure, error_text = None, None
                except Exception as error:  # no process, fds or memory left; a main module that refuses
                    failure, error_text = f"not started: {type(error).__name__}", str(error)
            child_conn.close()  # the child's end: ours closed, recv() sees EOF when the child exits
            starts += 1
            was_ready = False
            if failure is None:
                self._listen(conn)
                was_ready = self._ready.is_set()
                self._ready.clear()
                process.join(STOP_TIMEOUT_S)
                if process.is_alive():
                    process.kill()
                    process.join()
                failure = f"exit status {process.exitcode}"
            # Its end closed, a send in progress fails at once and lets go of _sending; only then
            # is ours closed, never under a send (whose descriptor could go to another file).
            with self._sending, self._lock:
                self._conn = None
                conn.close()
            self._fail_pending(NotReady("the model process stopped"))
            if self.load_error is not None or self._stopping.is_set():
                return
            if was_ready:  # at once, and counting from the first delay again
                delay, starts = RESTART_DELAY_S[0], 0
                self.not_ready_reason = f"the model process stopped ({failure}); it is starting again"
                fields = {**self._fields, "exitcode": process.exitcode}
                log.error("the model process stopped unexpectedly; starting it again", extra={"fields": fields})
                continue
            self.not_ready_reason = (
                f"the model process stopped before it was ready ({failure}; failed starts in a row: {starts}); "
                f"starting it again in {delay:g} s"
            )
            fields = {**self._fields, "exitcode": process.exitcode, "error": error_text, "starts": starts, "delay_s": delay}
            log.error(self.not_ready_reason, extra={"fields": fields})
            self._stopping.wait(delay)
            delay = min(2 * delay, RESTART_DELAY_S[1])

    def _deliver(self, answer: Answer) -> None:
        future = self._release(answer.job_id)
        if future is None or not future.set_running_or_notify_cancel():
            return  # the request gave up waiting
        match answer:
            case Done():
                future.set_result(answer.result)
            case Failed(shutting_down=True):
                future.set_exception(NotReady("the service is shutting down"))
            case Failed():
                future.set_exception(ModelCallFailed("the model failed on this batch"))

    def _give_slab(self, side: int) -> None:
        """A new slab of slots, all free, for the model process just loaded (see the module)."""
        jobs = PendingJobs(self.max_queue, side)
        with self._lock:
            self._jobs = jobs  # the last model process's were all failed when it stopped
        self._send(Slab(pixels=jobs.slab))

    def _listen(self, conn) -> None:
        """Deliver the model process's messages until its pipe closes."""
        while True:
            try:
                message: FromModel = conn.recv()
            except (EOFError, OSError):
                return
            match message:
                case BatchAnswers():
                    self._on_batch(message.size)  # first: a request answered has its batch counted
                    for answer in message.answers:
                        self._deliver(answer)
                case StopAnswers():
                    for answer in message.answers:
                        self._deliver(answer)
                case Ready():
                    self._give_slab(message.served.transform.config.image_size)
                    self.served = message.served
                    self.not_ready_reason = None
                    self._ready.set()
                case LoadFailed():
                    text = message.text
                    self.load_error = CaptionerError(text) if message.is_captioner_error else ModelCallFailed(text)
                    if message.is_captioner_error and self.log_load_failure:  # otherwise the model process logged it
                        log.error(f"the model failed to load: {text}", extra={"fields": self._fields})


def serve_model(
    conn, load_model: Callable, batcher_settings: dict, placement: Placement, log_level: str, parent: int, name: str | None = None
) -> None:
    """The model process: one thread that reads jobs from the pipe between batches, captions each
    batch as it falls due and sends its answers back (see the module). ``name``: the model's, in
    its log lines."""
    # Stopping is the HTTP process's call: a Ctrl-C or SIGTERM to the whole process group must
    # not kill the batch in progress under it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with(parent)
    service_logger(log_level)
    fields = {"model": name} if name is not None else {}

    def send(message: FromModel) -> None:
        try:
            conn.send(message)
        except OSError:
            pass  # the HTTP process is gone; reading the pipe sees it too

    try:
        if placement.cpus is not None:
            _pin(placement.cpus, "MODEL_CPUS")  # before torch starts its pool, whose threads inherit it
        torch.set_num_threads(placement.torch_threads)
        model = load_model()
        if placement.cpus is not None and placement.heavy_cnn_cpus and model.device.type == "cpu":
            cost = _cnn_ms_per_image(model)
            if cost > placement.heavy_cnn_ms:
                cpus = sorted({*placement.cpus, *placement.heavy_cnn_cpus})
                _pin(cpus, "HEAVY_CNN_CPUS")  # the pool's threads as well
                torch.set_num_threads(len(cpus))
                heavy = {"cnn_ms_per_image": round(cost, 1), "cpus": cpus, "torch_threads": len(cpus)}
                log.info("a heavy CNN: the model process takes the HTTP side's CPUs too", extra={"fields": {**fields, **heavy}})
    except Exception as error:
        if not isinstance(error, CaptionerError):  # a bug, not a file to fix: its traceback
            log.exception("the model failed to load", extra={"fields": fields})
        # A CaptionerError says what to fix in one line: the HTTP side logs it (or refuses a swap).
        send(LoadFailed(text=str(error), is_captioner_error=isinstance(error, CaptionerError)))
        conn.close()
        return
    batcher = MicroBatcher(**batcher_settings)
    log.info("model ready", extra={"fields": {**fields, "max_batch_size": batcher.max_batch_size}})
    send(Ready(served=ServedModel.of(model)))
    slab = None  # the HTTP process's pixels, one slot a job (Slab.pixels): its first message
    while True:
        # Read while no job waits, or while the oldest may still wait for others to join it, and
        # whatever is already there (poll(0)) before a batch runs: the jobs that came during the
        # last one, which have waited long enough, and any cancellation of them.
        try:
            time_left = batcher.time_left()
            due = time_left is not None and not conn.poll(0 if batcher.full() else time_left)
            message: ToModel | None = None if due else conn.recv()
        except (EOFError, OSError):
            break  # the HTTP process is gone
        match message:
            case None:  # the next batch is due
                jobs = batcher.take()
                results = caption_batch(model, jobs)
                answers = tuple(_answer(job, result) for job, result in zip(jobs, results, strict=True))
                send(BatchAnswers(size=len(jobs), answers=answers))
            case Job():
                batcher.add(CaptionJob(message.job_id, slab[message.slot], message.options, message.sent))
            case Slab():
                slab = message.pixels
            case Cancel():
                batcher.cancel(message.job_id)
            case Stop():
                break
    if left := batcher.take(everything=True):
        send(StopAnswers(answers=tuple(Failed(job_id=job.job_id, shutting_down=True) for job in left)))
    conn.close()


def _die_with(parent: int) -> None:
    """Have the kernel kill this process when the thread that started it ends (the HTTP process's
    supervisor, which outlives it unless the HTTP process dies): until its model is loaded it
    reads no pipe that would tell it. Linux only; elsewhere the pipe tells it once loaded."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the request was made
        os._exit(1)


def start_on(process: multiprocessing.Process, placement: Placement) -> None:
    """Starts the model process on every CPU it may use, from the calling thread (whose CPUs a
    child inherits) widened for the while; the child pins itself to its own CPUs first thing.

    OpenMP (libgomp) counts the CPUs it may use once, when torch loads, and a pool of more threads
    than that sleeps at every barrier instead of spinning: a heavy CNN's pool, widened from one
    thread to two, then ran 12% slower (13,000 sleeps a thread in 5 s against 15-43).
    """
    wanted = set(placement.cpus or ()) | set(placement.heavy_cnn_cpus or ())
    if not wanted:
        process.start()
        return
    own = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, own | wanted)
    except OSError:  # CPUs this machine lacks: the child reports them, by name of their setting
        pass
    try:
        process.start()
    finally:
        os.sched_setaffinity(0, own)


def _pin(cpus: list[int], setting: str) -> None:
    try:
        pin_process(cpus)
    except OSError as error:
        raise CaptionerError(f"service setting {setting}: none of CPUs {cpus} is available ({error.strerror})") from None


@torch.inference_mode()
def _cnn_ms_per_image(model, images: int = 2) -> float:
    """Milliseconds an image of the CNN on the model process's pool, from its second call (the
    first allocates and picks kernels)."""
    size = model.transform.config.image_size
    pixels = torch.zeros(images, 3, size, size, dtype=torch.uint8)
    model.encode_pixels(pixels)
    started = time.perf_counter()
    model.encode_pixels(pixels)
    return (time.perf_counter() - started) * 1000 / images


def _answer(job: CaptionJob, result: CaptionResult | None) -> Answer:
    if result is None:
        return Failed(job_id=job.job_id, shutting_down=False)
    return Done(job_id=job.job_id, result=result)
