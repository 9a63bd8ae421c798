"""gunicorn settings for the captioning service: ``gunicorn -c service/gunicorn.conf.py``.

Suited to PyTorch: each worker starts its model process after the fork (the master never imports
torch, whose threads and state would not survive a fork), torch's thread pool is sized per worker
so workers do not fight over cores, and threaded workers let one worker's micro-batcher see many
requests at once. The model runs in a process of its own beside each worker
(service.model_process), so the two do not share a GIL. The worker is gthread that reads request
heads in its event loop under a deadline (service.worker), so slow clients cannot hold the request
threads. Environment:
CAPTIONER_BIND (default 127.0.0.1:8000), CAPTIONER_WORKERS (default 1: one model process sees all traffic
and /metrics covers it all), CAPTIONER_THREADS (request threads per worker, default 32),
CAPTIONER_TORCH_THREADS (torch threads of each model process; default: the CPUs this process may
use, by affinity and cgroup quota, less one, divided by the workers:
captioner.runtime.torch_threads),
CAPTIONER_PIN_CPUS (default 1: each model process runs on CPUs of its own, as many as its torch
threads, and the HTTP processes on the others, where there are enough: captioner.runtime.split_cpus;
with one worker and CAPTIONER_TORCH_THREADS unset, a model process whose CNN is heavy takes the
HTTP side's CPUs as well: service.model_process.Placement; 0 leaves placement to the scheduler),
CAPTIONER_READ_TIMEOUT_S (default 20: a request must arrive within this of its first byte), and
the app's own CAPTIONER_* settings (service.app.DEFAULTS). A key file (CAPTIONER_API_KEYS_FILE) or
a list of models (CAPTIONER_MODELS) that is not right stops gunicorn before any worker starts.

SIGHUP to the master has each worker read the key file and the models again, in place
(service.models: a model whose file changed is loaded beside the one serving, which answers every
request until the new one is ready), instead of gunicorn's reload: new workers, each loading every
model, answered most requests 503 while they loaded (docs/service.md). New code takes a restart.
"""

import json
import os
import signal
import sys

wsgi_app = "service.wsgi:app"
bind = os.environ.get("CAPTIONER_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("CAPTIONER_WORKERS", "1"))
worker_class = "service.worker.CaptionerWorker"
# Threads mostly wait on the model process, so many of them cost little and feed bigger batches.
threads = int(os.environ.get("CAPTIONER_THREADS", "32"))
preload_app = False  # import the app, and so start the model process, in each worker after the fork
timeout = 120  # a worker silent this long is restarted; allows for loading a large model
graceful_timeout = 30  # on SIGTERM, requests in flight get this long to finish
keepalive = 5
control_socket_disable = True  # no runtime control needed; instances would share its default path
accesslog = None  # the app logs every request itself
# gunicorn's own messages as JSON lines too, like the app's, so one parser reads the whole log.
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "service.logs.JsonLineFormatter"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
    "root": {"handlers": ["stderr"], "level": "INFO"},
    "loggers": {"gunicorn.error": {"handlers": ["stderr"], "level": "INFO", "propagate": False}},
}


pin_cpus = os.environ.get("CAPTIONER_PIN_CPUS", "1") != "0"
api_keys_file = os.environ.get("CAPTIONER_API_KEYS_FILE")


def on_starting(server):
    """A key file (it must never come up open) or a list of models that is not right: one line,
    and no server."""
    from captioner.errors import CaptionerError
    from service.keys import read_key_file
    from service.models import read_sources

    environ = os.environ.get
    try:
        if api_keys_file is not None:
            read_key_file(api_keys_file)
        read_sources(environ("CAPTIONER_MODELS"), environ("CAPTIONER_MODEL_PATH"), environ("CAPTIONER_MODEL_NAME"))
    except CaptionerError as error:
        server.log.error("%s", error)
        sys.exit(1)


def when_ready(server):
    """SIGHUP has the workers read the key file and the models again, in place (service.worker)."""

    def forward_hup():
        server.log.info("Hang up: the workers read the API key file and the models again")
        for pid in list(server.WORKERS):
            try:
                os.kill(pid, signal.SIGHUP)
            except ProcessLookupError:
                pass

    server.handle_hup = forward_hup  # the arbiter looks its signal handlers up on itself


def pre_fork(server, worker):
    """Number the worker with the lowest slot no live worker holds: which CPUs its model process gets."""
    taken = {getattr(other, "captioner_slot", None) for other in server.WORKERS.values()}
    worker.captioner_slot = min(set(range(server.num_workers + 1)) - taken)


def post_fork(server, worker):
    """Tune this worker for PyTorch before the app (and its model process) start."""
    import torch

    from captioner.runtime import pin_process, split_cpus, torch_threads

    # The model runs in a process of its own (service.model_process), which takes its thread count
    # and CPUs from here; this process only prepares pixels, one image per request thread.
    threads_given = "CAPTIONER_TORCH_THREADS" in os.environ
    threads = os.environ.setdefault("CAPTIONER_TORCH_THREADS", str(torch_threads(server.num_workers)))
    split = None
    if pin_cpus and threads.isdigit():  # a bad value is the app's to refuse, with its own message
        split = split_cpus(int(threads), server.num_workers, worker.captioner_slot)
    if split is not None:
        model_cpus, http_cpus = split
        os.environ["CAPTIONER_MODEL_CPUS"] = json.dumps(model_cpus)
        if server.num_workers == 1 and not threads_given:  # a heavy CNN may take the HTTP side's too
            os.environ.setdefault("CAPTIONER_HEAVY_CNN_CPUS", json.dumps(http_cpus))
        pin_process(http_cpus)  # this thread alone so far; the request threads inherit it
        server.log.info("worker %s: model process on CPUs %s, HTTP on CPUs %s", worker.pid, model_cpus, http_cpus)
    torch.set_num_threads(1)
    _return_big_blocks_to_the_system()


def _return_big_blocks_to_the_system():
    """Have glibc map every block over 1 MiB on its own, so freeing it gives the memory back.

    By default glibc raises that threshold to the largest block freed so far (up to 32 MiB), and
    keeps the freed memory of decoded images in the heaps of request threads: a burst of big
    images would leave the worker hundreds of MB above its baseline for good.
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD; fixing it ends the raising
    except (OSError, AttributeError):  # not glibc
        pass


def worker_exit(server, worker):
    """Let the batches in progress finish and fail waiting requests cleanly."""
    runtime = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("captioner")
    if runtime is not None:
        runtime.stop()
