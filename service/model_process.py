"""The model in a process of its own beside the HTTP process, each with its own GIL.

A caption is a string of small torch calls, and every one of them takes the GIL back when it
returns. In one process, the request threads (reading, decoding images, Flask, JSON) hold the GIL
often enough that the model waited for it at every call: measured at 16 clients, encoding a batch
took ten times as long as offline and the worker kept only 1.1 of 2 CPUs busy. So, as TorchServe
splits its frontend from its model workers, request threads here prepare pixels and ship them over
a pipe; the model process runs the MicroBatcher undisturbed and sends the captions back.

``ModelProcess`` is the HTTP side, with the batcher's interface (``submit`` returns a Future). It
starts the model process, and starts it again if it dies: requests then in the model fail with
503 ``not_ready``, and readiness is 503 until the model is loaded again. A model that fails to
load is not retried. The model process ignores SIGINT and SIGTERM: it stops when told (finishing
its batch), or when the HTTP process is gone (its pipe closes).

Messages are pickled tuples on one duplex pipe:
    HTTP -> model: ("job", id, pixels, options), ("cancel", id), ("stop",)
    model -> HTTP: ("ready", ServedModel), ("load_failed", message, is_captioner_error),
                   ("batch", size, answers): a model call's size and its answers, sent by the
                   batcher's thread as soon as the call ends, in one message,
                   ("answers", answers): those outside a model call (refused, or failed on stop);
                   an answer is ("done", id, CaptionResult) or ("failed", id, shutting_down)
Pixels cross as a numpy array of bytes (resized, not yet normalised: a quarter of the floats'
size): torch would move a tensor through shared memory, one segment and one file descriptor per
image, which costs more than copying them.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import queue
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial

import torch

from captioner.errors import CaptionerError
from captioner.options import DecodeOptions
from captioner.runtime import pin_process
from service.batcher import MicroBatcher, NotReady, QueueFull
from service.logs import service_logger
from service.model import ServedModel

log = logging.getLogger("captioner.service")
STOP_TIMEOUT_S = 10.0  # the batch in progress gets this long to finish on stop()


class ModelCallFailed(Exception):
    """The model raised while captioning a batch (the model process logs the details)."""


class ModelProcess:
    """The HTTP process's handle on the model process (see the module).

    Args:
        load_model: picklable, called once in each model process.
        max_batch_size, max_wait_ms: the MicroBatcher's, in the model process.
        max_queue: most requests handed to the model and not yet answered; ``submit`` raises
            ``QueueFull`` beyond it.
        torch_threads: torch's intra-op threads in the model process.
        cpus: the CPUs the model process runs on; None: wherever the scheduler puts it.
        log_level: of the model process's JSON log lines.
        on_batch: called with the size of every model call (for metrics).
    """

    def __init__(
        self,
        load_model: Callable,
        *,
        max_batch_size: int = 16,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        torch_threads: int = 1,
        cpus: list[int] | None = None,
        log_level: str = "INFO",
        on_batch: Callable[[int], None] = lambda size: None,
    ):
        self._load_model = load_model
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._batcher_settings = {"max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms, "max_queue": max_queue}
        self._torch_threads = torch_threads
        self._cpus = cpus
        self._log_level = log_level
        self._on_batch = on_batch
        self._pending: dict[int, Future] = {}  # handed to the model, not yet answered
        self._lock = threading.Lock()  # guards _pending
        # Apart from _lock: a send can block on a full pipe, and the listener must still take answers.
        self._sending = threading.Lock()
        self._ids = itertools.count()
        self._conn = None
        self._process = None
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="captioner-model-process", daemon=True)
        self.served: ServedModel | None = None
        self.load_error: Exception | None = None

    def start(self) -> ModelProcess:
        self._thread.start()
        return self

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._stopping.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def queue_depth(self) -> int:
        return len(self._pending)

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
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting")
            job_id = next(self._ids)
            self._pending[job_id] = future
        if not self._send(("job", job_id, pixels.numpy(), options)):
            with self._lock:
                self._pending.pop(job_id, None)
            raise NotReady("the model process stopped")
        future.add_done_callback(partial(self._forget_if_cancelled, job_id))
        return future

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Let the batch in progress finish, fail the requests still waiting, end the model process."""
        was_ready = self._ready.is_set()
        self._stopping.set()
        with self._lock:
            process = self._process
        if not was_ready and process is not None and process.is_alive():
            process.kill()  # still loading: nothing in progress to finish
        self._send(("stop",))
        if self._thread.is_alive():
            self._thread.join(timeout)
        process = self._process
        if process is not None and process.is_alive():
            process.kill()
        self._fail_pending(NotReady("the service is shutting down"))

    def _send(self, message) -> bool:
        """Whether ``message`` went out; not when the process is gone (which _supervise sees)."""
        conn = self._conn
        if conn is None:
            return False
        try:
            with self._sending:
                conn.send(message)
        except OSError:
            return False
        return True

    def _forget_if_cancelled(self, job_id: int, future: Future) -> None:
        """A request that gave up (timed out): the model process skips it if it has not begun it."""
        if future.cancelled():
            with self._lock:
                forgotten = self._pending.pop(job_id, None) is not None
            if forgotten:
                self._send(("cancel", job_id))

    def _fail_pending(self, error: Exception) -> None:
        with self._lock:
            futures, self._pending = list(self._pending.values()), {}
        for future in futures:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)

    def _supervise(self) -> None:
        """Run the model process, and run it again whenever it dies, until stop()."""
        context = multiprocessing.get_context("spawn")  # never fork a process with threads and torch state
        while not self._stopping.is_set():
            conn, child_conn = context.Pipe()
            process = context.Process(
                target=serve_model,
                args=(child_conn, self._load_model, self._batcher_settings, self._torch_threads, self._cpus, self._log_level),
                name="captioner-model",
                daemon=True,
            )
            with self._lock:
                self._conn, self._process = conn, process
                if self._stopping.is_set():
                    break
                process.start()
            child_conn.close()  # the child's end: ours closed, recv() sees EOF when the child exits
            self._listen(conn)
            self._ready.clear()
            process.join(STOP_TIMEOUT_S)
            with self._lock:
                self._conn = None
            conn.close()
            self._fail_pending(NotReady("the model process stopped"))
            if self.load_error is not None or self._stopping.is_set():
                return
            log.error("the model process stopped unexpectedly; starting it again", extra={"fields": {"exitcode": process.exitcode}})

    def _deliver(self, kind: str, job_id: int, payload) -> None:
        with self._lock:
            future = self._pending.pop(job_id, None)
        if future is None or not future.set_running_or_notify_cancel():
            return  # the request gave up waiting
        if kind == "done":
            future.set_result(payload)
        elif payload:
            future.set_exception(NotReady("the service is shutting down"))
        else:
            future.set_exception(ModelCallFailed("the model failed on this batch"))

    def _listen(self, conn) -> None:
        """Deliver the model process's messages until its pipe closes."""
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return
            kind = message[0]
            if kind == "batch":
                self._on_batch(message[1])  # first: a request answered has its batch counted
                for answer in message[2]:
                    self._deliver(*answer)
            elif kind == "answers":
                for answer in message[1]:
                    self._deliver(*answer)
            elif kind == "ready":
                self.served = message[1]
                self._ready.set()
            elif kind == "load_failed":
                _, text, is_captioner_error = message
                self.load_error = CaptionerError(text) if is_captioner_error else ModelCallFailed(text)


def serve_model(
    conn, load_model: Callable, batcher_settings: dict, torch_threads: int, cpus: list[int] | None, log_level: str
) -> None:
    """The model process: a MicroBatcher fed from the pipe, answering on it (see the module)."""
    # Stopping is the HTTP process's call: a Ctrl-C or SIGTERM to the whole process group must
    # not kill the batch in progress under it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    service_logger(log_level)
    if cpus is not None:
        try:
            pin_process(cpus)  # before torch starts its pool, whose threads inherit it
        except OSError as error:
            message = f"service setting MODEL_CPUS: none of CPUs {cpus} is available ({error.strerror})"
            log.error(message)
            conn.send(("load_failed", message, True))
            conn.close()
            return
    torch.set_num_threads(torch_threads)
    # The batcher's thread releases the GIL around every torch call; with the default 5 ms switch
    # interval the thread reading the pipe would wait that long for it.
    sys.setswitchinterval(0.0005)
    sending = threading.Lock()  # the batcher's thread sends batches, this one refusals
    answers: queue.SimpleQueue = queue.SimpleQueue()  # from the jobs' futures, mostly in the batcher's thread

    def send(message) -> None:
        try:
            with sending:
                conn.send(message)
        except OSError:
            pass  # the HTTP process is gone; recv() below sees it too

    def send_batch(size: int) -> None:
        """The batcher's thread, a model call's jobs answered: its answers go with its size."""
        send(("batch", size, _drain(answers)))

    batcher = MicroBatcher(load_model, on_batch=send_batch, **batcher_settings).start()
    while not batcher.wait_ready(0.1):
        if batcher.load_error is not None:
            error = batcher.load_error
            send(("load_failed", str(error), isinstance(error, CaptionerError)))
            conn.close()
            return
    send(("ready", ServedModel.of(batcher.model)))
    jobs: dict[int, Future] = {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        if message[0] == "job":
            _, job_id, pixels, options = message
            try:
                future = batcher.submit(torch.from_numpy(pixels), options)
            except (NotReady, QueueFull):  # answered at once, like any other refusal: 503 not_ready
                send(("answers", [("failed", job_id, True)]))
                continue
            jobs[job_id] = future
            future.add_done_callback(partial(_answer, answers, jobs, job_id))
        elif message[0] == "cancel":
            future = jobs.get(message[1])
            if future is not None:
                future.cancel()
        elif message[0] == "stop":
            break
    batcher.stop()  # the jobs still waiting fail, and their answers join ``answers``
    if left := _drain(answers):
        send(("answers", left))
    conn.close()


def _answer(answers: queue.SimpleQueue, jobs: dict, job_id: int, future: Future) -> None:
    jobs.pop(job_id, None)
    if future.cancelled():
        return
    error = future.exception()
    if error is None:
        answers.put(("done", job_id, future.result()))
    else:
        answers.put(("failed", job_id, isinstance(error, NotReady)))


def _drain(answers: queue.SimpleQueue) -> list:
    taken = []
    while True:
        try:
            taken.append(answers.get_nowait())
        except queue.Empty:
            return taken
