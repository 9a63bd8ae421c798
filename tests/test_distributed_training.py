"""Training under a real ``torchrun`` with two CPU processes (gloo), on the tiny shapes world."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import captioner.training as training
from captioner.checkpoint import read_checkpoint
from captioner.data.datasets import load_dataset
from captioner.distributed import (
    Process, broadcast, check_agreement, gather_rng_states, host_group, own_rng_state, process_device, rank_zero_first,
)  # fmt: skip
from captioner.errors import CaptionerError
from captioner.models.captioner import Captioner

from tests.helpers import ROOT, TINY, free_port, tiny_config


def torchrun(*args, processes=2):
    """Runs ``torchrun --nproc-per-node PROCESSES ARGS`` on a free local port."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def assert_captions(model, records):
    """The loaded model gives one greedy caption of some words per image."""
    captions = model.caption([r.path for r in records])
    assert [len(c) for c in captions] == [1] * len(records)
    assert all(c["text"] and c["perplexity"] >= 1 for [c] in captions), captions


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, shapes_json, feature_cache):
    """A 1-epoch 2-process run (tests/ddp_probe.py): the run folder and each rank's decoder weights."""
    root = tmp_path_factory.mktemp("ddp")
    config = {**TINY, "data": str(shapes_json), "out": str(root / "run"), "feature_cache": str(feature_cache), "epochs": 1}
    result = torchrun("-m", "tests.ddp_probe", root, json.dumps(config))
    return root / "run", [torch.load(root / f"rank{r}.pt") for r in (0, 1)], result.stderr


@pytest.mark.slow  # torchrun
def test_two_processes_train_in_step_and_rank_0_writes_the_run(ddp_run, shapes_json):
    run, (rank0, rank1), log = ddp_run
    assert rank0["ddp"] and rank1["ddp"]
    # Rank 1 had shifted every weight before DDP took the decoder: DDP broadcast rank 0's,
    # the frozen embedding included, so both started alike...
    for key, value in rank0["initial"].items():
        assert torch.equal(rank1["initial"][key], value), key
    # ...and stay alike after their steps on different batches.
    for key, value in rank0["final"].items():
        assert torch.equal(rank1["final"][key], value), key
    assert not torch.equal(rank0["final"]["out.weight"], rank0["initial"]["out.weight"])
    assert torch.equal(rank0["final"]["embed.weight"], rank0["initial"]["embed.weight"])

    saved = read_checkpoint(run / "model.pt")["decoder"]["state_dict"]  # the plain decoder, no "module." prefix
    assert saved.keys() == rank0["final"].keys()
    assert all(torch.equal(saved[k], v) for k, v in rank0["final"].items())
    [row] = rows(run)
    assert row["epoch"] == 1 and row["world_size"] == 2 and row["effective_batch_size"] == 2 * TINY["batch_size"]
    assert_captions(Captioner.load(run / "model.pt", "cpu"), load_dataset(shapes_json).split("test"))
    assert log.count("DistributedDataParallel: 2 processes (gloo), batch size 16 per process, 32 in all") == 1
    assert log.count("epoch 1/1:") == 1  # rank 0 alone logs


@pytest.mark.slow  # torchrun
def test_command_line_resumes_a_distributed_run_into_self_critical_epochs(ddp_run, tmp_path, shapes_json, feature_cache):
    run = tmp_path / "run"
    shutil.copytree(ddp_run[0], run)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "progress"]
    result = torchrun("-m", "captioner", "train", "--data", shapes_json, "--out", run, "--feature-cache", feature_cache,
                      *flags, "--no-progress", "--epochs", "2", "--self-critical-epochs", "1", "--resume")
    assert result.stdout.count("best epoch") == 1  # rank 0 speaks for all
    history = rows(run)
    assert [r["epoch"] for r in history] == [1, 2, 3] and {r["world_size"] for r in history} == {2}
    assert history[0] == rows(ddp_run[0])[0]
    assert "train_perplexity" in history[1] and history[2]["train_reward"] > 0  # the third, self-critical
    last = read_checkpoint(run / "last.pt")["training"]
    assert last["epoch"] == 3 and len(last["rng_ranks"]) == 2  # each rank's dropout continues on resume
    assert_captions(Captioner.load(run / "model.pt", "cpu"), load_dataset(shapes_json).split("test"))


def test_too_few_batches_for_the_processes_is_a_clear_error(tmp_path, shapes_json, feature_cache, monkeypatch):
    monkeypatch.setattr(training, "init_process", lambda device: Process(rank=0, world_size=64))
    with pytest.raises(CaptionerError, match="cannot be shared by 64 processes"):
        training.train(tiny_config(shapes_json, tmp_path / "run", feature_cache))


def torchrun_env(monkeypatch, *, rank=1, world_size=2, local_rank=1, local_world_size=2):
    """The variables torchrun sets, without starting a process group."""
    for name, value in dict(RANK=rank, WORLD_SIZE=world_size, LOCAL_RANK=local_rank, LOCAL_WORLD_SIZE=local_world_size).items():
        monkeypatch.setenv(name, str(value))


def test_one_gpu_for_several_local_processes_is_a_clear_error(tmp_path, monkeypatch):
    # The check does not depend on a GPU being here, nor on how many there are.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    torchrun_env(monkeypatch)
    with pytest.raises(CaptionerError, match=r"--device cuda:0 .* same GPU: pass --device cuda or auto"):
        process_device("cuda:0")
    # cuda and auto give each process its own GPU, cpu stays cpu.
    assert process_device("cuda") == process_device("auto") == "cuda:1"
    assert process_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(CaptionerError, match="2 processes on this machine but 1 GPU"):
        process_device("cuda")
    # train stops before it joins a process group or reads the data.
    with pytest.raises(CaptionerError, match="same GPU"):
        training.train(tiny_config(tmp_path / "missing.json", tmp_path / "run", tmp_path / "cache", device="cuda:1"))


def test_an_explicit_gpu_is_kept_for_one_process_per_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    torchrun_env(monkeypatch, rank=1, world_size=2, local_rank=0, local_world_size=1)  # 2 machines, 1 process each
    assert process_device("cuda:1") == "cuda:1"
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name)
    assert process_device("cuda:1") == "cuda:1"  # no torchrun


def test_a_lone_process_waits_for_no_one_and_keeps_its_own_values():
    lone = Process()
    assert host_group(lone) is None
    calls = []
    assert rank_zero_first(lone, None, lambda: calls.append(1) or "prepared") == "prepared" and calls == [1]
    check_agreement(("words",), lone, None, "never said")
    assert gather_rng_states(lone, None) is None
    assert broadcast({"epoch": 3}, lone, None) == {"epoch": 3}


def test_each_rank_goes_on_with_its_own_saved_random_state_or_rank_0s():
    states = [torch.tensor([0]), torch.tensor([1])]  # saved by a run of two processes
    assert own_rng_state(states, Process(rank=1, world_size=2)) is states[1]
    assert own_rng_state(states, Process(rank=3, world_size=4)) is states[0]  # resumed with more processes
    assert own_rng_state(states[:1], Process()) is states[0]  # a single-process run's one state
