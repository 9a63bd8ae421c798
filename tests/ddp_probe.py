"""Run under torchrun by test_distributed_training.py: trains, and records each rank's decoder.

    python -m torch.distributed.run --nproc-per-node 2 -m tests.ddp_probe PROBE_DIR CONFIG_JSON

Runs ``train(TrainConfig(**CONFIG_JSON))`` and writes PROBE_DIR/rank{RANK}.pt: the decoder's
weights as the first epoch starts and after the last one, and whether training saw it wrapped in
DistributedDataParallel. Before DDP takes the decoder, rank 1 shifts all of its weights, the
frozen embedding too, so the test sees that DDP hands every rank rank 0's weights.
"""

import json
import os
import sys
from pathlib import Path

import torch

import captioner.training as training
from captioner.options import TrainConfig

probe, values = Path(sys.argv[1]), json.loads(sys.argv[2])
rank = int(os.environ["RANK"])
record = {}


def shifted_ddp(module, *args, **kwargs):
    if rank == 1:
        with torch.no_grad():
            for p in module.parameters():
                p.add_(1.0)
    return torch.nn.parallel.DistributedDataParallel(module, *args, **kwargs)


def recorded_epoch(decoder, *args, **kwargs):
    record["ddp"] = isinstance(decoder, torch.nn.parallel.DistributedDataParallel)
    weights = lambda: {k: v.detach().clone() for k, v in decoder.module.state_dict().items()}  # noqa: E731
    record.setdefault("initial", weights())
    stats = real_epoch(decoder, *args, **kwargs)
    record["final"] = weights()
    return stats


real_epoch = training.train_one_epoch
training.train_one_epoch = recorded_epoch
training.DistributedDataParallel = shifted_ddp
training.train(TrainConfig(**values))
torch.save(record, probe / f"rank{rank}.pt")
