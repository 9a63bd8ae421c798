import pytest
import torch

from captioner.decoding import SpecialIds, beam_search, generate
from captioner.options import DecodeOptions
from captioner.errors import CaptionerError
from captioner.models.decoder import DecoderConfig, AttentionDecoder

IDS = SpecialIds(start=1, end=2, pad=0)
VOCAB = 12


@pytest.fixture
def decoder():
    torch.manual_seed(0)
    config = DecoderConfig(feature_dim=8, vocab_size=VOCAB, embed_dim=6, hidden_size=16, num_layers=2, dropout=0.0)
    return AttentionDecoder(config, torch.randn(VOCAB, 6), pad_id=IDS.pad).eval()


@pytest.fixture
def features():
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(1))


def teacher_forced_log_prob(decoder, feature, tokens):
    ids = torch.tensor([[IDS.start, *tokens[:-1]]])
    logp = decoder(feature.unsqueeze(0), ids).log_softmax(-1)[0]  # (T, V)
    return logp.gather(1, torch.tensor(tokens).unsqueeze(1)).sum().item()


def test_beam_size_one_equals_greedy(decoder, features):
    greedy = generate(decoder, features, DecodeOptions(mode="greedy", max_length=15), IDS)
    beam = generate(decoder, features, DecodeOptions(mode="beam", beam_size=1, max_length=15), IDS)
    for (g,), (b,) in zip(greedy, beam):
        assert g.tokens == b.tokens
        assert g.log_prob == pytest.approx(b.log_prob, abs=1e-5)


def test_log_probs_are_the_models(decoder, features):
    for options in (DecodeOptions(max_length=15), DecodeOptions(mode="beam", beam_size=4, num_captions=3)):
        for feature, hyps in zip(features, generate(decoder, features, options, IDS)):
            for hyp in hyps:
                expected = teacher_forced_log_prob(decoder, feature, hyp.tokens)
                assert hyp.log_prob == pytest.approx(expected, abs=1e-4)
                assert hyp.perplexity == pytest.approx(torch.tensor(-expected / len(hyp.tokens)).exp().item(), rel=1e-4)


def test_beam_returns_n_distinct_best_first(decoder, features):
    results = generate(decoder, features, DecodeOptions(mode="beam", beam_size=5, num_captions=3), IDS)
    for hyps in results:
        assert len(hyps) == 3
        assert len({tuple(h.tokens) for h in hyps}) == 3
        normalised = [h.log_prob / len(h.tokens) for h in hyps]
        assert normalised == sorted(normalised, reverse=True)


def test_beam_search_when_no_beam_ever_ends(decoder, features):
    with torch.no_grad():
        decoder.out.bias[IDS.end] = -1e4  # <end> is never the likelier word
    results = beam_search(decoder, features, DecodeOptions(mode="beam", beam_size=3, num_captions=3, max_length=7), IDS)
    for hyps in results:
        assert len(hyps) == 3
        assert all(len(h.tokens) == 7 and IDS.end not in h.tokens for h in hyps)


def test_beam_finds_a_caption_at_least_as_likely_as_greedy_on_average(decoder, features):
    greedy = generate(decoder, features, DecodeOptions(max_length=15), IDS)
    beam = generate(decoder, features, DecodeOptions(mode="beam", beam_size=8, max_length=15), IDS)
    mean = lambda h: h.log_prob / len(h.tokens)  # noqa: E731
    assert sum(mean(b[0]) for b in beam) >= sum(mean(g[0]) for g in greedy) - 1e-6


def test_sampling_is_seeded_per_image_independent_of_the_batch(decoder, features):
    options = DecodeOptions(mode="sample", num_captions=3, temperature=1.5)
    both = generate(decoder, features[:2], options, IDS, seeds=[5, 7])
    alone = generate(decoder, features[1:2], options, IDS, seeds=[7])
    assert [h.tokens for h in both[1]] == [h.tokens for h in alone[0]]
    again = generate(decoder, features[:2], options, IDS, seeds=[5, 7])
    assert [h.tokens for h in again[0]] == [h.tokens for h in both[0]]
    other = generate(decoder, features[:2], options, IDS, seeds=[6, 7])
    assert [h.tokens for h in other[0]] != [h.tokens for h in both[0]]


# Below about 1e-45 a temperature or top_p is 0 in float32: they must still mean "almost greedy".
@pytest.mark.parametrize(
    "options",
    [dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-6), dict(temperature=1e-46), dict(temperature=5e-324),
     dict(top_p=1e-46), dict(top_p=5e-324), dict(temperature=1e-300, top_p=1e-300, top_k=3)],
)
def test_sampling_filters_collapse_to_greedy(decoder, features, options):
    greedy = generate(decoder, features, DecodeOptions(), IDS)
    sampled = generate(decoder, features, DecodeOptions(mode="sample", seed=0, **options), IDS)
    assert [g[0].tokens for g in greedy] == [s[0].tokens for s in sampled]
    assert [g[0].log_prob for g in greedy] == pytest.approx([s[0].log_prob for s in sampled])


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(mode="nucleus"), "unknown mode"),
        (dict(mode="sample", temperature=0), "temperature"),
        (dict(mode="sample", top_p=1.5), "top_p"),
        (dict(mode="sample", top_k=-1), "top_k"),
        (dict(mode="beam", beam_size=2, num_captions=3), "at most 2 captions"),
        (dict(mode="beam", beam_size=0), "beam_size"),
        (dict(num_captions=2), "num_captions does not apply to greedy decoding"),
        (dict(beam_size=8), "beam_size does not apply to greedy"),
        (dict(mode="beam", temperature=0.5), "temperature does not apply to beam"),
        (dict(mode="beam", seed=1), "seed does not apply to beam"),
        (dict(max_length=0), "max_length"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(CaptionerError, match=message):
        DecodeOptions(**options)


def test_decoder_knows_where_each_cell_is():
    # Without a position per cell, attention and the mean-pooled initial state are blind to
    # the order of cells: a scene and its mirror image would get the same caption.
    torch.manual_seed(0)
    config = DecoderConfig(feature_dim=4 * 9, vocab_size=VOCAB, embed_dim=6, cells=9, hidden_size=16, dropout=0.0)
    decoder = AttentionDecoder(config, torch.randn(VOCAB, 6), pad_id=IDS.pad).eval()
    cells = torch.randn(1, 4, 9)  # channel-major, as the encoder lays out its grid
    mirrored = cells.view(1, 4, 3, 3).flip(-1).reshape(1, 4, 9)
    tokens = torch.tensor([[IDS.start, 5, 6]])
    with torch.no_grad():
        logits = decoder(cells.flatten(1), tokens)
        assert not torch.allclose(logits, decoder(mirrored.flatten(1), tokens), atol=1e-4)
        decoder.position.weight.zero_()  # the bias is the same for every cell
        assert torch.allclose(decoder(cells.flatten(1), tokens), decoder(mirrored.flatten(1), tokens), atol=1e-5)


def test_attention_remembers_where_it_looked():
    # The query adds the previous context and each cell's coverage, and the scores fall with the
    # coverage. All are empty at the first word, so cutting any out changes nothing there, and
    # every word after it.
    torch.manual_seed(0)
    config = DecoderConfig(feature_dim=4 * 9, vocab_size=VOCAB, embed_dim=6, cells=9, hidden_size=16, dropout=0.0)
    decoder = AttentionDecoder(config, torch.randn(VOCAB, 6), pad_id=IDS.pad).eval()
    features, tokens = torch.randn(2, 4 * 9), torch.tensor([[IDS.start, 5, 6, 7]] * 2)
    with torch.no_grad():
        decoder.attention.coverage_weight.normal_()
        logits = decoder(features, tokens)
        attention = decoder.attention
        for forget in (attention.coverage_weight, attention.coverage_penalty, attention.feed.weight):
            kept = forget.clone()
            forget.zero_()
            forgetful = decoder(features, tokens)
            forget.copy_(kept)
            assert torch.allclose(logits[:, 0], forgetful[:, 0], atol=1e-6)
            assert all(not torch.allclose(logits[:, t], forgetful[:, t], atol=1e-4) for t in range(1, 4))


def test_one_step_at_a_time_equals_teacher_forcing():
    # Generation carries the attention's context and coverage in the state from step to step.
    torch.manual_seed(0)
    config = DecoderConfig(feature_dim=4 * 9, vocab_size=VOCAB, embed_dim=6, cells=9, hidden_size=16, dropout=0.0)
    decoder = AttentionDecoder(config, torch.randn(VOCAB, 6), pad_id=IDS.pad).eval()
    torch.nn.init.normal_(decoder.attention.coverage_weight)
    features, tokens = torch.randn(3, 4 * 9), torch.randint(3, VOCAB, (3, 6))
    with torch.no_grad():
        memory, state = decoder.start_stepwise(features)
        steps = []
        for t in range(tokens.size(1)):
            logits, state = decoder.step(tokens[:, t], state, memory)
            steps.append(logits)
        assert torch.allclose(torch.stack(steps, dim=1), decoder(features, tokens), atol=1e-5)


MODES = [
    DecodeOptions(max_length=9),
    DecodeOptions(mode="sample", num_captions=2, seed=4, max_length=9),
    DecodeOptions(mode="beam", beam_size=3, num_captions=2, max_length=9),
]


@pytest.mark.parametrize("options", MODES, ids=lambda o: o.mode)
def test_a_caption_cut_at_max_length_is_reported_unfinished(decoder, features, options):
    finishing = generate(decoder, features, DecodeOptions(**{**options.to_dict(), "max_length": 30}), IDS)
    assert all(h.finished == (h.tokens[-1] == IDS.end) for hyps in finishing for h in hyps)
    with torch.no_grad():
        decoder.out.bias[IDS.end] = -1e4  # never ends: every caption is cut
    for hyps in generate(decoder, features, options, IDS):
        assert hyps and all(not h.finished and len(h.tokens) == 9 and IDS.end not in h.tokens for h in hyps)


@pytest.fixture
def attending_decoder():
    """A decoder over a 3 x 3 grid of cells, so that attention has somewhere to choose."""
    torch.manual_seed(2)
    config = DecoderConfig(feature_dim=9 * 4, vocab_size=VOCAB, embed_dim=6, cells=9, hidden_size=16, dropout=0.0)
    return AttentionDecoder(config, torch.randn(VOCAB, 6), pad_id=IDS.pad).eval()


@pytest.mark.parametrize("options", MODES, ids=lambda o: o.mode)
def test_explain_gives_each_words_probability_and_the_attention_that_chose_it(attending_decoder, options):
    features = torch.randn(3, 36, generator=torch.Generator().manual_seed(5))
    plain = generate(attending_decoder, features, options, IDS)
    explained = generate(attending_decoder, features, DecodeOptions(**{**options.to_dict(), "explain": True}), IDS)
    assert all(h.word_log_probs is None for hyps in plain for h in hyps)
    captured = []
    attending_decoder.attention.register_forward_hook(lambda module, args, out: captured.append(out[1]))
    for feature, hyps, plain_hyps in zip(features, explained, plain):
        for hyp, same in zip(hyps, plain_hyps):
            assert hyp.tokens == same.tokens  # explaining changes nothing that was decided
            assert len(hyp.word_log_probs) == len(hyp.attention) == len(hyp.tokens)
            assert sum(hyp.word_log_probs) == pytest.approx(hyp.log_prob, abs=1e-4)
            captured.clear()
            ids = torch.tensor([[IDS.start, *hyp.tokens[:-1]]])
            with torch.no_grad():
                attending_decoder(feature.unsqueeze(0), ids)  # teacher forcing: _Attention's own weights
            expected = captured[0][0]  # (T, N)
            assert torch.allclose(torch.tensor(hyp.attention), expected, atol=1e-5)
            assert expected.std(dim=-1).min() > 0  # not uniform: the test can tell cells apart


def test_teacher_forcing_with_repeated_images_equals_repeating_their_features(decoder, features):
    tokens = torch.randint(3, VOCAB, (len(features) * 3, 7), generator=torch.Generator().manual_seed(2))
    once = decoder(features, tokens, repeats=3)
    assert torch.allclose(once, decoder(features.repeat_interleave(3, dim=0), tokens), atol=1e-6)
    assert not torch.allclose(once, decoder(features.repeat(3, 1), tokens), atol=1e-3)


@pytest.mark.parametrize("options", [DecodeOptions(), DecodeOptions(mode="sample", num_captions=4, seed=0), DecodeOptions(mode="beam")])
def test_unk_is_never_said_and_its_probability_goes_to_the_other_words(decoder, features, options):
    unk = 3
    with torch.no_grad():
        decoder.out.bias[unk] = 8.0  # <unk> the likeliest next word everywhere
    allowed = generate(decoder, features, options, IDS)
    assert any(unk in h.tokens for hyps in allowed for h in hyps)
    ids = SpecialIds(start=1, end=2, pad=0, unk=unk)
    for hyps, feature in zip(generate(decoder, features, options, ids), features):
        for h in hyps:
            assert unk not in h.tokens
            ids_in = torch.tensor([[ids.start, *h.tokens[:-1]]])
            logits = decoder(feature.unsqueeze(0), ids_in)[0]
            logits[:, unk] = float("-inf")
            expected = logits.log_softmax(-1).gather(1, torch.tensor(h.tokens).unsqueeze(1)).sum().item()
            assert h.log_prob == pytest.approx(expected, abs=1e-4)
