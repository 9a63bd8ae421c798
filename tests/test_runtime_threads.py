"""Tests for captioner.runtime's torch-thread rule (affinity, cgroup quotas, workers) and the
service's split of the CPUs between its model and HTTP processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from captioner import runtime


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A machine of 16 CPUs whose affinity and cgroup files a test sets."""

    def make(affinity=16, v2=None, v1=None):
        monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(affinity)))
        monkeypatch.setattr(runtime, "CGROUP_V2_CPU_MAX", str(tmp_path / "cpu.max"))
        monkeypatch.setattr(runtime, "CGROUP_V1_CPU", str(tmp_path / "v1"))
        if v2 is not None:
            (tmp_path / "cpu.max").write_text(v2)
        if v1 is not None:
            (tmp_path / "v1").mkdir()
            (tmp_path / "v1" / "cpu.cfs_quota_us").write_text(str(v1[0]))
            (tmp_path / "v1" / "cpu.cfs_period_us").write_text(str(v1[1]))

    return make


def test_threads_follow_affinity_less_one_cpu_shared_by_workers(machine):
    machine(affinity=16)
    assert runtime.usable_cpus() == 16
    assert runtime.torch_threads(1) == 15 and runtime.torch_threads(3) == 5 and runtime.torch_threads(32) == 1
    machine(affinity=2)  # taskset -c 0,1
    assert runtime.torch_threads(1) == 1


@pytest.mark.parametrize(
    ("v2", "v1", "cpus"),
    [("400000 100000\n", None, 4.0), ("max 100000\n", None, 16.0), (None, (250000, 100000), 2.5), (None, (-1, 100000), 16.0)],
)
def test_cgroup_quota_caps_the_cpus(machine, v2, v1, cpus):
    machine(affinity=16, v2=v2, v1=v1)
    assert runtime.usable_cpus() == cpus
    assert runtime.torch_threads(1) == max(1, int(cpus - 1))


@pytest.mark.parametrize(
    ("cpus", "workers", "threads"), [(1, 0, 1), (2, 0, 1), (3, 0, 2), (4, 1, 2), (8, 2, 5), (16, 4, 11)]
)
def test_batch_captioning_leaves_a_cpu_to_the_caption_writer_and_each_decoding_worker(machine, cpus, workers, threads):
    machine(affinity=cpus)
    assert runtime.decoding_workers() == workers
    assert runtime.torch_threads(reserved=1 + workers) == threads


def test_the_caption_command_sets_threads_beside_its_workers(machine, monkeypatch, tmp_path, trained_run, shapes):
    # No OMP_NUM_THREADS: on 2 CPUs the command picks no worker and 1 thread for the CNN; on 8,
    # 2 workers and 5 threads; and it honours --num-workers.
    import torch

    from captioner.cli import main

    seen = []
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    image = str(shapes.split("test")[0].path)
    machine(affinity=2)
    assert main(["caption", str(trained_run / "model.pt"), image, "--output", str(tmp_path / "a.jsonl")]) == 0
    machine(affinity=8)
    assert main(["caption", str(trained_run / "model.pt"), image, "--output", str(tmp_path / "b.jsonl")]) == 0
    assert main(["caption", str(trained_run / "model.pt"), image, "--num-workers", "0", "--output", str(tmp_path / "c.jsonl")]) == 0
    assert seen == [1, 5, 7]


def test_a_service_gives_each_model_process_cpus_of_its_own_and_the_http_side_the_rest(machine, monkeypatch):
    machine(affinity=2)
    assert runtime.split_cpus(1) == ([1], [0])
    machine(affinity=16)
    assert runtime.split_cpus(15) == (list(range(1, 16)), [0])
    assert runtime.split_cpus(7, processes=2, slot=0) == (list(range(2, 9)), [0, 1])
    assert runtime.split_cpus(7, processes=2, slot=1) == (list(range(9, 16)), [0, 1])
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {8, 3, 5})  # taskset -c 3,5,8
    assert runtime.split_cpus(2) == ([5, 8], [3])


@pytest.mark.parametrize(
    "affinity, threads, processes, slot",
    [(1, 1, 1, 0), (2, 2, 1, 0), (2, 1, 2, 0), (16, 5, 3, 3), (16, 0, 1, 0)],
    ids=["one-cpu", "no-cpu-left-for-http", "two-models-on-two-cpus", "slot-beyond-the-workers", "no-threads"],
)
def test_no_split_where_the_cpus_do_not_go_round(machine, affinity, threads, processes, slot):
    machine(affinity=affinity)
    assert runtime.split_cpus(threads, processes, slot) is None


@pytest.mark.slow  # a Python subprocess
def test_pin_process_moves_every_thread_and_those_it_starts_later():
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs to tell a pinned thread from a free one")
    script = f"""
import os, threading
from captioner.runtime import pin_process
stop = threading.Event()
before = threading.Thread(target=stop.wait)
before.start()
pin_process([{cpus[-1]}])
after = threading.Thread(target=stop.wait)
after.start()
print(sorted({{tuple(sorted(os.sched_getaffinity(int(t)))) for t in os.listdir("/proc/self/task")}}))
stop.set()
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.strip() == str([(cpus[-1],)])
