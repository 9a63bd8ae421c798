"""Where a command runs: the device, and the CPUs its threads and processes take.

Training, batch captioning, evaluation and the service all use this module, which imports nothing
of them. Under ``torchrun``, the process group a command joins is ``captioner.distributed``'s.
"""

from __future__ import annotations

import os

import torch

from captioner.errors import CaptionerError


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; a CUDA device asked for must exist. A CUDA device
    always has its index (``cuda`` is the current one), which ``torch.cuda.set_device`` needs."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CaptionerError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CaptionerError(f"device {name} asked for, but CUDA is not available here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise CaptionerError(f"device {name} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def usable_cpus() -> float:
    """The CPUs this process may use: its affinity, capped by a cgroup CPU quota if one is set.

    ``os.cpu_count()`` counts the machine; a container or ``taskset`` may allow far fewer, and a
    torch pool sized for the machine then spins threads that wait on each other.
    """
    try:
        cpus = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        cpus = float(os.cpu_count() or 1)
    quota = _cgroup_quota()
    return min(cpus, quota) if quota else cpus


CGROUP_V2_CPU_MAX = "/sys/fs/cgroup/cpu.max"
CGROUP_V1_CPU = "/sys/fs/cgroup/cpu"


def _cgroup_quota() -> float | None:
    """CPUs allowed by the cgroup's quota (v2 cpu.max, else v1 cfs_quota/period); None if unlimited."""
    try:
        with open(CGROUP_V2_CPU_MAX) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open(f"{CGROUP_V1_CPU}/cpu.cfs_quota_us") as fq, open(f"{CGROUP_V1_CPU}/cpu.cfs_period_us") as fp:
            quota, period = int(fq.read()), int(fp.read())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def torch_threads(processes: int = 1, reserved: int = 1) -> int:
    """Threads for one process's torch pool when ``processes`` share the usable CPUs.

    ``reserved`` usable CPUs are left out for other work: by default one for each process's own
    other threads (request threads decoding images, the batcher's Python between ops) and the
    system; for batch captioning, one per image-decoding worker process. A torch pool that wants
    every CPU waits at each parallel op for whichever of its threads lost its CPU, which on a busy
    machine made a caption 30 times slower than one thread (scripts/bench_threads.py), and with a
    decoding worker beside it made batch captioning a quarter slower (README, "Captioning many
    images"). A fractional quota rounds down too; always at least 1.
    """
    return max(1, int((usable_cpus() - reserved) // max(1, processes)))


def split_cpus(model_threads: int, processes: int = 1, slot: int = 0) -> tuple[list[int], list[int]] | None:
    """(model process ``slot``'s CPUs, the HTTP processes' CPUs) for a service of ``processes``
    model processes of ``model_threads`` torch threads each, out of the CPUs this process may run on.

    Each model process gets CPUs of its own and the HTTP processes share the rest, the lowest. Left
    to the scheduler, request threads woken in a burst took the model's CPU from under it: at 16
    clients on two CPUs the model waited 0.38 ms per image for one (README, "Serving"). None where
    those CPUs are too few to leave the HTTP side one, or cannot be known (not Linux).
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    shared = len(cpus) - model_threads * processes
    if model_threads < 1 or shared < 1 or not 0 <= slot < processes:
        return None
    first = shared + slot * model_threads
    return cpus[first : first + model_threads], cpus[:shared]


def pin_process(cpus: list[int]) -> None:
    """Run every thread of this process on ``cpus`` only; threads it starts later inherit that.

    (``os.sched_setaffinity(0, ...)`` sets the calling thread's alone.)
    """
    for thread in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(thread), cpus)
        except ProcessLookupError:
            pass  # the thread has ended


def decoding_workers() -> int:
    """Image-decoding worker processes for batch captioning, by default: a quarter of the usable
    CPUs where there are four or more; none on fewer, where the main thread decodes images between
    the captions it writes while the CNN threads run (``captioner.batch.encoded_ahead``): on two
    CPUs a worker process beside those two threads made captioning a fifth slower."""
    cpus = int(usable_cpus())
    return cpus // 4 if cpus >= 4 else 0
