"""Self-critical sequence training (Rennie et al. 2017): after cross-entropy, the decoder learns
from the captions it writes itself, rewarded by their CIDEr-D against the image's references.

Cross-entropy teaches the next word of a human caption given the human words before it; at test
time the decoder reads its own words instead (exposure bias), and the metrics judge whole
captions, not words. Sampling captions and raising the probability of those that score better than
the image's other samples (REINFORCE with the mean of the other samples as the baseline, Luo 2020)
trains on both. The samples are drawn and their log-probabilities computed with dropout off, so the
gradient is that of the policy that wrote them.

The reward is ``metrics.CiderD``: pycocoevalcap's CIDEr-D with the document frequencies of the
training references fixed once, fast enough for tens of thousands of sampled captions an epoch.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from tqdm import tqdm

from captioner.decoding import SpecialIds, generate, next_word_log_probs
from captioner.metrics import CiderD
from captioner.options import DecodeOptions

SAMPLES = 5  # captions sampled per image: each one's baseline is the mean reward of the other four


def sample_length(captions, pad: int, share: float = 0.95) -> int:
    """The words a self-critical sample may have: as many as ``share`` of the training captions
    fit in. The longest sample sets every row's steps in its batch, and one far longer than
    the references scores little (CIDEr-D's length penalty)."""
    words = ((captions.ids != pad).sum(1) - 2).sort().values  # without <start> and <end>
    return max(1, int(words[math.ceil(share * len(words)) - 1]))


def self_critical_epoch(
    decoder, features: torch.Tensor, cider: CiderD, words, run, *, ids: SpecialIds, max_length: int,
    generator: torch.Generator,
) -> dict:  # fmt: skip
    """One pass over the training images, ``run.config.batch_size // SAMPLES`` images a step.

    Args:
        decoder: the decoder, or its DistributedDataParallel wrapper (whose forward syncs gradients).
        features: (N, F) training features; row i is image i of ``cider``'s references.
        words: the vocabulary's words by id, to turn sampled ids into words for the reward.
        run: the training run (``training.Run``): its optimizer, scaler, device, AMP dtype, process
            and the config's batch size, clip norm and progress, as ``training.train_one_epoch`` reads them.
        max_length: the words a sample may have (``sample_length``).
        generator: the epoch's order of images and the seeds of their samples.

    Returns:
        ``{"train_reward"}`` (the samples' mean CIDEr-D) and the gradient columns of a
        cross-entropy epoch (``grad_norm``, ``grad_norm_max``, ``clip_rate``).
    """
    config, device, optimizer, scaler = run.config, run.device, run.optimizer, run.scaler
    world_size = run.process.world_size
    module = getattr(decoder, "module", decoder)
    per_step = max(1, config.batch_size // SAMPLES)
    batches = list(torch.randperm(len(features), generator=generator).split(per_step))
    batches = batches[: len(batches) - len(batches) % world_size][run.process.rank :: world_size]
    sampling = DecodeOptions(mode="sample", num_captions=SAMPLES, max_length=max_length)
    decoder.eval()  # no dropout: the gradient is that of the policy that sampled
    params = [p for p in decoder.parameters() if p.requires_grad]
    reward_sum, samples, norms, clipped = 0.0, 0, [], 0
    for batch in tqdm(batches, desc="self-critical", unit="batch", disable=not config.progress, leave=False):
        feats = features[batch].to(device)
        seeds = torch.randint(2**62, (len(batch),), generator=generator).tolist()
        hypotheses = generate(module, feats, sampling, ids, seeds)  # per image, SAMPLES captions
        rows = [[ids.start, *h.tokens] for hyps in hypotheses for h in hyps]
        reward = torch.tensor(
            [[cider.score(int(i), [words[t] for t in h.tokens if t != ids.end]) for h in hyps] for i, hyps in zip(batch, hypotheses)]
        )  # (B, SAMPLES)
        advantage = (reward - (reward.sum(1, keepdim=True) - reward) / (SAMPLES - 1)).flatten().to(device)
        tokens = torch.full((len(rows), max(map(len, rows))), ids.pad, dtype=torch.long)
        for r, row in enumerate(rows):
            tokens[r, : len(row)] = torch.tensor(row)
        tokens = tokens.to(device)
        with torch.autocast(device.type, dtype=run.amp, enabled=run.amp is not None):
            logits = decoder(feats, tokens[:, :-1], repeats=SAMPLES)
        targets = tokens[:, 1:]
        # Under the distribution the samples were drawn from (no <unk>): with <unk> in the
        # softmax, a sample scoring below its siblings is made less likely most cheaply by
        # moving mass to <unk>, which sampling never draws, and within an epoch <unk> had it all.
        said = next_word_log_probs(logits.flatten(0, 1), ids).view_as(logits).gather(2, targets.unsqueeze(2)).squeeze(2)
        log_prob = said.masked_fill(targets == ids.pad, 0.0).sum(1)  # (R,) each caption's
        loss = -(advantage * log_prob).mean()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        norm = float(torch.nn.utils.clip_grad_norm_(params, config.clip_norm))
        if math.isfinite(norm):
            norms.append(norm)
            clipped += norm > config.clip_norm
        scaler.step(optimizer)
        scaler.update()
        reward_sum, samples = reward_sum + reward.sum().item(), samples + reward.numel()
    total = torch.tensor([reward_sum, samples], dtype=torch.float64, device=device)
    if world_size > 1:  # the reward over all ranks' samples, as a cross-entropy epoch's loss is
        dist.all_reduce(total)
    return {
        "train_reward": (total[0] / total[1].clamp(min=1)).item(),
        "grad_norm": sum(norms) / max(len(norms), 1),
        "grad_norm_max": max(norms, default=0.0),
        "clip_rate": clipped / max(len(norms), 1),
    }
