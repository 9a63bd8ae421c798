"""Tests for the model process (service/model_process.py) without Flask: driven through its
ModelProcess handle, or, for the protocol, over its pipe with the messages of service/messages.py."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest
import torch

from captioner.options import DecodeOptions
from service.messages import BatchAnswers, Cancel, Done, Failed, Job, Ready, Slab, Stop, StopAnswers
from service.model import load_model
from service.model_process import ModelProcess, NotReady, Placement, QueueFull, serve_model, start_on
from tests import service_models
from tests.helpers import ROOT, send_own_cpus, threads_cpus, wait_until


@pytest.fixture(scope="module")
def model_path(trained_run):
    return trained_run / "model.pt"




@pytest.fixture
def start_model_process(model_path):
    """Factory of started model processes on the tiny model, loaded by ``loader`` (a function of
    ``load_model``'s arguments, from tests.service_models); stopped after the test."""
    started = []

    def start(loader=load_model, **settings) -> ModelProcess:
        model_process = ModelProcess(partial(loader, str(model_path)), **settings).start()
        started.append(model_process)
        return model_process

    yield start
    for model_process in started:
        model_process.stop()


def loaded(model_process: ModelProcess) -> ModelProcess:
    """``model_process``, once its model is loaded."""
    assert model_process.wait_ready(60), model_process.load_error
    return model_process


def zeros(model_process: ModelProcess) -> torch.Tensor:
    """An image of the model's size, resized as the HTTP side sends it."""
    side = model_process.served.transform.config.image_size
    return torch.zeros((3, side, side), dtype=torch.uint8)  # (3, S, S)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


# --- it dies with the HTTP process --------------------------------------------------------


@pytest.mark.slow  # a Python subprocess and its model process
def test_the_model_process_outlives_no_http_process(model_path, tmp_path):
    """Killed with SIGKILL, the HTTP process leaves no model process behind."""
    script = f"""
import time
from functools import partial
from service.model import load_model
from service.model_process import ModelProcess
model_process = ModelProcess(partial(load_model, {str(model_path)!r})).start()
assert model_process.wait_ready(60)
print(model_process.pid, flush=True)
time.sleep(60)
"""
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        model_pid = int(server.stdout.readline())
    finally:
        server.kill()
        server.wait()
        server.stdout.close()
    wait_until(lambda: not _alive(model_pid), timeout=20)


@pytest.mark.slow  # a Python subprocess and its model process
def test_a_model_process_still_loading_outlives_no_http_process(model_path, switches):
    """Killed with SIGKILL while its model loads (no pipe read yet), the HTTP process leaves no
    model process behind either."""
    script = f"""
import time
from functools import partial
from service.model_process import ModelProcess
from tests import service_models
if __name__ == "__main__":
    model_process = ModelProcess(partial(service_models.load_when_allowed, {str(model_path)!r})).start()
    while model_process.pid is None:  # made, then started
        time.sleep(0.01)
    print(model_process.pid, flush=True)
    time.sleep(60)
"""
    server = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        model_pid = int(server.stdout.readline())
        wait_until(lambda: (switches / "loading").exists(), timeout=60)
    finally:
        server.kill()
        server.wait()
        server.stdout.close()
    wait_until(lambda: not _alive(model_pid), timeout=10)  # it would wait 30 s for "load", then fail


# --- where it runs ------------------------------------------------------------------------


@pytest.mark.slow  # a model process of its own
def test_the_model_process_runs_on_the_cpus_it_is_given(start_model_process):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs to tell a pinned process from a free one")
    model_process = loaded(start_model_process(placement=Placement(torch_threads=2, cpus=[cpus[-1]])))
    assert model_process.submit(zeros(model_process), DecodeOptions()).result(timeout=60)  # so torch's pool has started too
    assert threads_cpus(model_process.pid) == {(cpus[-1],)}
    assert threads_cpus(os.getpid()) == {tuple(cpus)}  # the HTTP side is gunicorn's to place


@pytest.mark.slow  # a model process of its own
@pytest.mark.parametrize("heavy_cnn_ms, takes_them", [(0, True), (1e6, False)])
def test_a_heavy_cnn_takes_the_http_sides_cpus_too(start_model_process, capfd, heavy_cnn_ms, takes_them):
    # The tiny model's CNN takes well under a millisecond an image: heavy above 0 ms, light below 1e6.
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs to tell a pinned process from a free one")
    placement = Placement(torch_threads=1, cpus=[cpus[-1]], heavy_cnn_cpus=[cpus[0]], heavy_cnn_ms=heavy_cnn_ms)
    model_process = loaded(start_model_process(placement=placement))
    assert model_process.submit(zeros(model_process), DecodeOptions()).result(timeout=60)  # so torch's pool has started too
    assert threads_cpus(model_process.pid) == {(cpus[0], cpus[-1]) if takes_them else (cpus[-1],)}
    told = [json.loads(line) for line in capfd.readouterr().err.splitlines() if "a heavy CNN" in line]
    assert len(told) == takes_them
    if takes_them:
        assert told[0]["torch_threads"] == 2 and told[0]["cnn_ms_per_image"] >= 0


@pytest.mark.slow  # a spawned Python process
def test_the_model_process_starts_on_every_cpu_it_may_use_and_the_caller_keeps_its_own():
    # OpenMP counts the CPUs when torch loads, before the child pins itself: a heavy CNN's pool of
    # two threads, counted one CPU, slept at every barrier and ran 12% slower.
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 3:
        cpus = cpus * 3  # one CPU: nothing to widen, yet the child must still start
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpus[0]})  # this thread, as the HTTP side's
    try:
        context = multiprocessing.get_context("spawn")
        conn, child_conn = context.Pipe()
        process = context.Process(target=send_own_cpus, args=(child_conn,), daemon=True)
        start_on(process, Placement(cpus=[cpus[-1]], heavy_cnn_cpus=[cpus[1]]))
        assert os.sched_getaffinity(0) == {cpus[0]}
        assert conn.poll(60) and conn.recv() == sorted({cpus[0], cpus[1], cpus[-1]})
        process.join(10)
    finally:
        os.sched_setaffinity(0, before)


# --- a busy model: the queue, and stopping ------------------------------------------------


@pytest.mark.slow  # a model process of its own
def test_stop_ends_a_model_process_stuck_in_a_batch_behind_a_full_pipe(start_model_process, switches):
    """Jobs sent while the model is busy wait in the pipe; once it is full, their sends wait too.
    Stopping must still end the model process in time and fail every request."""
    model_process = loaded(start_model_process(service_models.load_faulty, max_queue=400, max_batch_size=1, max_wait_ms=0))
    pixels = zeros(model_process)
    (switches / "pause").touch()
    try:
        running = model_process.submit(pixels, DecodeOptions())
        wait_until(lambda: (switches / "paused").exists())  # the model is stuck in a batch
        with ThreadPoolExecutor(8) as pool:
            submits = [pool.submit(model_process.submit, pixels, DecodeOptions()) for _ in range(399)]
            wait_until(lambda: model_process.sending)
            time.sleep(0.5)
            assert model_process.sending and not all(s.done() for s in submits)  # a send waits on the full pipe
            stopping = threading.Thread(target=model_process.stop, kwargs={"timeout": 2})
            stopping.start()
            stopping.join(15)
            assert not stopping.is_alive(), "stop() waited on the full pipe"
            # Killed is not yet gone: stop() returns once the process is reaped and its pipe closed.
            assert not model_process.is_alive(), "stop() returned before the model process was reaped"
            assert model_process.exitcode is not None
        with pytest.raises(NotReady):
            running.result(timeout=5)
        for submit in submits:
            with pytest.raises(NotReady):
                future = submit.result(timeout=5)  # refused at submit, or failed afterwards
                future.result(timeout=5)
    finally:
        (switches / "pause").unlink()


@pytest.mark.slow  # a model process of its own
def test_requests_are_handed_to_a_busy_model_at_once_up_to_the_queue(start_model_process, switches):
    """Pixels go through shared memory, not the pipe: while the model is stuck in a batch,
    ``max_queue`` requests of a large model's size are handed over without waiting, the next is
    refused, and all are answered once it is free."""
    settings = {"max_queue": 100, "max_batch_size": 100, "max_wait_ms": 0}  # 300 KB of pixels: more than a socket holds
    model_process = loaded(start_model_process(service_models.load_faulty, **settings))
    side = model_process.served.transform.config.image_size
    (switches / "pause").touch()
    try:
        running = model_process.submit(torch.zeros((3, side, side), dtype=torch.uint8), DecodeOptions())
        wait_until(lambda: (switches / "paused").exists())  # the model is stuck in a batch
        started = time.monotonic()
        waiting = [model_process.submit(torch.full((3, side, side), i, dtype=torch.uint8), DecodeOptions()) for i in range(99)]
        assert time.monotonic() - started < 5  # no send waited on the model
        with pytest.raises(QueueFull):
            model_process.submit(torch.zeros((3, side, side), dtype=torch.uint8), DecodeOptions())
    finally:
        (switches / "pause").unlink()
    assert running.result(timeout=60).batch_size == 1
    assert [f.result(timeout=60).batch_size for f in waiting] == [99] * 99  # read at once, one batch
    assert model_process.queue_depth() == 0
    assert model_process.submit(torch.zeros((3, side, side), dtype=torch.uint8), DecodeOptions()).result(timeout=60)


# --- the protocol, over the pipe ----------------------------------------------------------


def _answers(conn, count: int) -> list[BatchAnswers | StopAnswers]:
    """The next ``count`` messages from a model process."""
    messages = []
    for _ in range(count):
        assert conn.poll(30), "the model process did not answer"
        messages.append(conn.recv())
    return messages


def _kinds(answers) -> list[tuple[type, int]]:
    """Each answer's class and job id."""
    return [(type(answer), answer.job_id) for answer in answers]


@pytest.mark.slow  # a spawned model process
def test_the_model_process_batches_what_came_during_a_batch_and_fails_what_waits_on_stop(model_path, switches):
    """Driven over its pipe: jobs sent while a batch runs are all taken at once when it ends (but
    no more than a batch), a job cancelled before then is skipped, and those still waiting on stop
    are failed as shutting down, never lost."""
    context = multiprocessing.get_context("spawn")
    conn, child_conn = context.Pipe()
    loader = partial(service_models.load_faulty, str(model_path), "cpu", None, "eager")
    settings = {"max_batch_size": 4, "max_wait_ms": 0}
    process = context.Process(target=serve_model, args=(child_conn, loader, settings, Placement(), "INFO", os.getpid()), daemon=True)
    process.start()
    child_conn.close()

    slab = torch.UntypedStorage._new_shared(16 * 3 * 32 * 32)
    slab = torch.empty(0, dtype=torch.uint8).set_(slab).view(16, 3, 32, 32)  # (16, 3, S, S)

    def job(job_id):
        slab[job_id].fill_(job_id)
        conn.send(Job(job_id=job_id, slot=job_id, options=DecodeOptions(), sent=time.monotonic()))

    try:
        assert conn.poll(60) and isinstance(conn.recv(), Ready)
        conn.send(Slab(pixels=slab))
        (switches / "pause").touch()
        job(1)
        wait_until(lambda: (switches / "paused").exists())  # job 1 in the model
        for job_id in range(2, 8):
            job(job_id)
        conn.send(Cancel(job_id=3))
        (switches / "paused").unlink()
        (switches / "pause").unlink()
        first, second, third = _answers(conn, 3)
        assert all(isinstance(message, BatchAnswers) for message in (first, second, third))
        assert [(message.size, _kinds(message.answers)) for message in (first, second, third)] == [
            (1, [(Done, 1)]),
            (4, [(Done, 2), (Done, 4), (Done, 5), (Done, 6)]),  # at once, 3 skipped
            (1, [(Done, 7)]),  # beyond the batch: the next one
        ]
        assert all(answer.result.batch_size == message.size for message in (first, second) for answer in message.answers)

        (switches / "pause").touch()
        job(8)
        wait_until(lambda: (switches / "paused").exists())
        job(9), job(10)
        conn.send(Stop())
        (switches / "pause").unlink()
        batch, failed = _answers(conn, 2)
        assert isinstance(batch, BatchAnswers) and batch.size == 1 and _kinds(batch.answers) == [(Done, 8)]
        assert failed == StopAnswers(answers=(Failed(job_id=9, shutting_down=True), Failed(job_id=10, shutting_down=True)))
        process.join(20)
        assert process.exitcode == 0
    finally:
        if process.is_alive():
            process.kill()
        conn.close()
