"""The copying decoder: class names come from the attended cell, so it names combinations that no
training caption contained. Trained here on the shapes world's captions with perfect cell readings
(one-hot class probabilities), so that only the decoder is under test."""

import random
from types import SimpleNamespace

import pytest
import torch

from captioner.data.vocab import Vocabulary
from captioner.decoding import SpecialIds, generate
from captioner.evaluation import encode_captions
from captioner.models.decoder import DecoderConfig, AttentionDecoder
from captioner.options import DecodeOptions
from captioner.shapes import GRID, Scene, check_caption, describe_scene, sample_scene
from captioner.shapes.pretraining import CELL_CLASSES, cell_labels
from captioner.options import TrainConfig
from captioner.training import Run, copy_ids, train_one_epoch

HELD_OUT = frozenset({("green", "triangle")})


def perfect_features(scenes: list[Scene]) -> torch.Tensor:
    """(N, C * cells) one-hot readings of every cell, channel-major, as a perfect cell head gives."""
    rows = []
    for scene in scenes:
        labels = cell_labels(scene)  # (cells, groups)
        groups = [torch.nn.functional.one_hot(labels[:, g], len(names)) for g, names in enumerate(CELL_CLASSES)]
        rows.append(torch.cat(groups, dim=-1).T.flatten().float())  # (C, cells) flattened
    return torch.stack(rows)


def train_decoder(copying: bool, scenes, captions, vocab, epochs=12) -> AttentionDecoder:
    torch.manual_seed(0)
    features = perfect_features(scenes)
    config = DecoderConfig(
        feature_dim=features.size(1), vocab_size=len(vocab), embed_dim=16, cells=GRID * GRID, hidden_size=48,
        dropout=0.0, copy_ids=copy_ids(CELL_CLASSES, vocab) if copying else (),
    )  # fmt: skip
    decoder = AttentionDecoder(config, torch.randn(len(vocab), 16), pad_id=vocab.pad)
    records = [SimpleNamespace(captions=c) for c in captions]  # all encode_captions reads
    tensors = encode_captions(records, vocab, 30)
    optimizer = torch.optim.Adam([p for p in decoder.parameters() if p.requires_grad], lr=1e-2)
    run = Run.alone(TrainConfig(data="unused", out="unused", batch_size=32, clip_norm=5.0, progress=False), optimizer, features, tensors)
    for epoch in range(epochs):
        train_one_epoch(decoder, features, tensors, run, pad=vocab.pad, generator=torch.Generator().manual_seed(epoch))
    return decoder.eval()


@pytest.fixture(scope="module")
def world():
    rng = random.Random(0)
    scenes = [sample_scene(rng, holdout=HELD_OUT) for _ in range(500)]
    captions = [tuple(describe_scene(s, rng, 3)) for s in scenes]
    assert not any("green triangle" in c for cs in captions for c in cs)  # never said in training
    vocab = Vocabulary.build((c for cs in captions for c in cs), min_count=1)
    return scenes, captions, vocab


def caption(decoder, vocab, scenes) -> list[str]:
    ids = SpecialIds(start=vocab.start, end=vocab.end, pad=vocab.pad)
    hyps = generate(decoder, perfect_features(scenes), DecodeOptions(max_length=30), ids)
    return [vocab.decode(h.tokens) for (h,) in hyps]


@pytest.mark.slow  # trains a decoder for 12 epochs: several seconds
def test_a_copying_decoder_names_a_pair_no_training_caption_contained(world):
    scenes, captions, vocab = world
    decoder = train_decoder(True, scenes, captions, vocab)
    rng = random.Random(5)
    unseen = [sample_scene(rng, holdout=HELD_OUT, require_holdout=True) for _ in range(60)]
    checks = [check_caption(text, scene) for text, scene in zip(caption(decoder, vocab, unseen), unseen)]
    named = sum(("green", "triangle") in check.mentions for check in checks)
    right = sum(all(right for _, right in check.attributes) for check in checks)
    print(f"named {named}, attributes right {right} of {len(checks)}")
    # Named in most of them, and with every shape, colour and size right (relations aside: a
    # decoder this small, trained for seconds, still miscounts objects now and then). Trained with
    # seeds 0 to 5, each before and after a change of rounding in training, it named the pair in 51
    # to 60 of the 60 scenes: a bar higher than that passes or fails on the seed. (With these
    # perfect cell readings a decoder without copying names it in about 51 too: what copying adds
    # shows on a CNN's readings, docs/compositional.md;
    # here, that the copied words come out right.)
    assert named >= 50 and right >= 55
    # The words copied are probabilities over the vocabulary: each step's distribution sums to 1.
    logp = decoder(perfect_features(unseen[:3]), torch.full((3, 4), vocab.start))  # (B, T, V)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(3, 4), atol=1e-5)


def test_copied_words_come_only_from_the_attended_cell(world):
    # A class name is said only through copying: with every cell read as empty, no shape or
    # colour word has any probability left, whatever the language model would like to say.
    scenes, captions, vocab = world
    decoder = train_decoder(True, scenes[:50], captions[:50], vocab, epochs=1)
    empty = perfect_features([Scene(())])
    logp = decoder(empty, torch.tensor([[vocab.start, vocab.index["a"], vocab.index["large"]]]))[0, -1]  # (V,)
    names = [vocab.index[name] for group in CELL_CLASSES[:2] for name in group if name]
    assert logp[names].exp().max() < 1e-6


def test_every_decoding_mode_scores_a_copying_decoder_by_its_own_distribution(world):
    # Greedy, sampling and beam search read the copying decoder's log-probabilities as logits: the
    # log-probability each reports is what teacher forcing gives the same words.
    scenes, captions, vocab = world
    decoder = train_decoder(True, scenes[:50], captions[:50], vocab, epochs=1)
    features = perfect_features(scenes[:3])
    ids = SpecialIds(start=vocab.start, end=vocab.end, pad=vocab.pad)
    modes = [
        DecodeOptions(max_length=12),
        DecodeOptions(mode="sample", num_captions=2, top_p=0.9, seed=0, max_length=12),
        DecodeOptions(mode="beam", beam_size=3, num_captions=2, max_length=12),
    ]
    for options in modes:
        for feature, hyps in zip(features, generate(decoder, features, options, ids)):
            for h in hyps:
                tokens = h.tokens  # up to and with <end>, or cut at the length limit
                inputs = torch.tensor([[vocab.start, *tokens[:-1]]])
                logp = decoder(feature.unsqueeze(0), inputs).log_softmax(-1)[0]
                forced = logp.gather(1, torch.tensor(tokens).unsqueeze(1)).sum().item()
                assert h.log_prob == pytest.approx(forced, abs=1e-4), options.mode
