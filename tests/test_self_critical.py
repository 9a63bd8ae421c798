import random
from types import SimpleNamespace

import pytest
import torch
from pycocoevalcap.cider.cider import Cider

from captioner.decoding import SpecialIds, generate
from captioner.distributed import Process
from captioner.evaluation import CaptionTensors, caption_loss
from captioner.options import DecodeOptions
from captioner.models.decoder import DecoderConfig, AttentionDecoder
from captioner.metrics import CiderD
from captioner.self_critical import sample_length, self_critical_epoch

IDS = SpecialIds(start=1, end=2, pad=0, unk=3)
WORDS = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "cat", "runs", "sits", "on", "grass", "the", "mat"]


def test_cider_d_is_pycocoevalcaps():
    rng = random.Random(0)
    words = WORDS[4:]
    references = [[[rng.choice(words) for _ in range(rng.randint(2, 9))] for _ in range(rng.randint(1, 5))] for _ in range(40)]
    # Candidates that share n-grams with their references, and some that share none.
    candidates = [rng.choice(refs)[: rng.randint(1, 8)] + [rng.choice(words)] for refs in references]
    candidates[3] = ["zebra"]
    expected = Cider().compute_score(
        {i: [" ".join(r) for r in refs] for i, refs in enumerate(references)},
        {i: [" ".join(c)] for i, c in enumerate(candidates)},
    )[1]
    cider = CiderD(references)
    got = [cider.score(i, c) for i, c in enumerate(candidates)]
    assert got == pytest.approx(list(expected), abs=1e-9)
    assert got[3] == 0.0 and max(got) > 1.0
    # Re-ranking's mean over several images' references is the mean of the scores.
    images = [0, 5, 17]
    assert cider.mean_score(images, candidates[5]) == pytest.approx(sum(cider.score(i, candidates[5]) for i in images) / 3)


def test_self_critical_epochs_move_the_decoder_to_the_caption_the_reward_prefers():
    """Cross-entropy on two captions per image teaches a decoder to say either, half the time
    each; each image's references name one of them. Self-critical epochs alone move it to that
    one: the reward of its samples rises and greedy decoding says it."""
    torch.manual_seed(0)
    config = DecoderConfig(feature_dim=8, vocab_size=len(WORDS), embed_dim=6, hidden_size=32, dropout=0.0)
    decoder = AttentionDecoder(config, torch.randn(len(WORDS), 6), pad_id=IDS.pad)
    optimizer = torch.optim.Adam([p for p in decoder.parameters() if p.requires_grad], lr=1e-2)
    kinds = torch.eye(8)[:2]
    captions = [["a", "dog", "runs", "on", "grass"], ["the", "cat", "sits", "on", "the", "mat"]]
    rows = [[IDS.start, *(WORDS.index(w) for w in c), IDS.end] for c in captions]
    tokens = torch.tensor([row + [IDS.pad] * (8 - len(row)) for row in rows * 2])  # both captions for both kinds
    for _ in range(150):
        loss, words = caption_loss(decoder, kinds.repeat_interleave(2, dim=0), tokens, IDS.pad)
        optimizer.zero_grad()
        (loss / words).backward()
        optimizer.step()

    features = kinds.repeat(4, 1)  # 8 images; image i shows kind i % 2, whose references say caption i % 2
    cider = CiderD([[captions[i % 2]] * 3 for i in range(8)])
    optimizer = torch.optim.Adam([p for p in decoder.parameters() if p.requires_grad], lr=5e-3)  # no momentum from before
    generator = torch.Generator().manual_seed(0)
    unk_row = decoder.out.weight[3].detach().clone(), decoder.out.bias[3].detach().clone()
    run = SimpleNamespace(  # all self_critical_epoch reads of a training.Run: one CPU process, float32
        config=SimpleNamespace(batch_size=20, clip_norm=5.0, progress=False), device=torch.device("cpu"),
        process=Process(), optimizer=optimizer, scaler=torch.amp.GradScaler("cuda", enabled=False), amp=None,
    )  # fmt: skip
    rewards = []
    for _ in range(10):
        row = self_critical_epoch(decoder, features, cider, WORDS, run, ids=IDS, max_length=10, generator=generator)
        rewards.append(row["train_reward"])
    said = generate(decoder, kinds, DecodeOptions(), IDS)
    # <unk>, never sampled, is outside the policy: its output row had no gradient. (In the
    # whole softmax it took every sample's loss and, on Flickr8k, all the mass within an epoch.)
    assert torch.equal(decoder.out.weight[3], unk_row[0]) and torch.equal(decoder.out.bias[3], unk_row[1])
    assert 3.0 < rewards[0] < 7.0 and min(rewards[-3:]) > 8.0, rewards
    greedy = [[WORDS[t] for t in hyps[0].tokens if t != IDS.end] for hyps in said]
    assert [caption[:2] for caption in greedy] == [["a", "dog"], ["the", "cat"]], greedy
    assert min(cider.score(i, caption) for i, caption in enumerate(greedy)) > 7.0, greedy


def test_samples_are_as_long_as_nineteen_in_twenty_training_captions():
    words = [3] * 19 + [25]  # one caption in twenty far longer than the others
    ids = torch.zeros(len(words), 30, dtype=torch.long)
    for row, n in enumerate(words):
        ids[row, : n + 2] = 5  # <start>, n words, <end>
    assert sample_length(CaptionTensors(ids, torch.zeros(len(words))), pad=0) == 3
    assert sample_length(CaptionTensors(ids, torch.zeros(len(words))), pad=0, share=1.0) == 25
