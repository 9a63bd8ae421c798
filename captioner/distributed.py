"""Processes under ``torchrun``: where this one stands, the process group it joins, and how a
training run's processes wait for, agree with and hear from one another.

``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address in the environment;
without them a command runs as a single process and every helper here does nothing, or returns
what a lone process has. Training and batch captioning use this module, which imports nothing of
them.

The waits of a training run outside its steps (rank 0 preparing while the others wait, the random
states gathered and the best epoch broadcast after each epoch) go through a gloo group of their own,
the host group (``host_group``), with a long timeout; a lone process has none (None).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from captioner.errors import CaptionerError

# Rank 0 prepares (CNN pretraining, feature extraction) while the others wait: hours on a large data
# set, far past a collective's default timeout (10 minutes with nccl), so the waits between
# processes outside the training steps go through a gloo group of their own with a long one.
HOST_TIMEOUT = timedelta(hours=24)

T = TypeVar("T")


@dataclass(frozen=True)
class Process:
    """Where this process stands: rank ``rank`` of ``world_size``, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_process(device: torch.device) -> Process:
    """Joins the process group when started by torchrun: nccl for CUDA, gloo on CPU.

    Args:
        device: the device this process computes on.

    Returns:
        This process's place; a lone process (no torchrun) is rank 0 of 1.
    """
    if not launched_by_torchrun():
        return Process()
    process = Process(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if process.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return process


def process_device(name: str) -> str:
    """Under torchrun, ``auto`` or ``cuda`` means this process's own GPU, ``cuda:LOCAL_RANK``.

    nccl needs one GPU per process and fails with an obscure error when two share one, so an
    explicit ``cuda:N`` with several processes on this machine, or more processes than GPUs, is a
    CaptionerError here.
    """
    if not launched_by_torchrun():
        return name
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if name.startswith("cuda:") and local_processes > 1:
        raise CaptionerError(
            f"--device {name} under torchrun would put all {local_processes} processes on this machine "
            "on the same GPU: pass --device cuda or auto, and each process takes cuda:LOCAL_RANK"
        )
    if name in ("auto", "cuda") and torch.cuda.is_available():
        if local_processes > torch.cuda.device_count():
            raise CaptionerError(
                f"{local_processes} processes on this machine but {torch.cuda.device_count()} GPU(s): "
                "start at most one process per GPU (--nproc-per-node), or pass --device cpu"
            )
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return name


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def host_group(process: Process) -> dist.ProcessGroup | None:
    """The gloo group, with ``HOST_TIMEOUT``, for the waits between processes (None: a lone process).

    Every process must call this, at the same point: creating a group is a collective.
    """
    if not process.distributed:
        return None
    return dist.new_group(backend="gloo", timeout=HOST_TIMEOUT)


def rank_zero_first(process: Process, host: dist.ProcessGroup | None, prepare: Callable[[], T]) -> T:
    """``prepare()`` on rank 0, then on the others: rank 0 writes what ``prepare`` makes once (a
    pretrained CNN, the feature cache), which the others then read instead of racing it to write."""
    if process.is_main:
        result = prepare()
    if process.distributed:
        dist.barrier(group=host)
    if not process.is_main:
        result = prepare()
    return result


def check_agreement(value: Any, process: Process, host: dist.ProcessGroup | None, disagreement: str) -> None:
    """Under torchrun: a CaptionerError saying ``disagreement`` unless every rank holds the same ``value``
    (compared with ``==`` on rank 0's, after a round trip through pickle)."""
    if not process.distributed:
        return
    everyone = [None] * process.world_size
    dist.all_gather_object(everyone, value, group=host)
    if any(theirs != everyone[0] for theirs in everyone):
        raise CaptionerError(disagreement)


def gather_rng_states(process: Process, host: dist.ProcessGroup | None) -> list[torch.Tensor] | None:
    """Every rank's torch random state, on rank 0 (None on the others, and for a lone process)."""
    if not process.distributed:
        return None
    rngs = [None] * process.world_size if process.is_main else None
    dist.gather_object(torch.get_rng_state(), rngs, dst=0, group=host)
    return rngs


def own_rng_state(states: list[torch.Tensor], process: Process) -> torch.Tensor:
    """This rank's of the random states that each rank of a run saved (``gather_rng_states``):
    its own as long as the number of processes is the same, else rank 0's."""
    return states[process.rank] if process.rank < len(states) else states[0]


def broadcast(value: T, process: Process, host: dist.ProcessGroup | None) -> T:
    """Rank 0's ``value`` on every rank (the others wait here while rank 0 works)."""
    if not process.distributed:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0, group=host)
    return shared[0]
