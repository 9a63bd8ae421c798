"""Looking inside the decoder: unrolled cells equal the fused ones, attention, gates, cells,
gradients through time, and ``captioner inspect`` end to end on a tiny model."""

import json

import pytest
import torch
import torch.nn.functional as F

from captioner.cli import main
from captioner.decoding import Hypothesis
from captioner.inspection import (
    by_distance,
    gradient_norms,
    inspect_caption,
    word_properties,
)
from captioner.models.captioner import Captioner
from captioner.models.decoder import DecoderConfig, AttentionDecoder
from captioner.models.recurrent import recurrent_layer, run_layer, unroll
from captioner.training import train
from tests.helpers import tiny_config


def tiny_decoder(cell="lstm", layers=1, cells=9, copy_ids=()):
    torch.manual_seed(0)
    config = DecoderConfig(feature_dim=4 * cells, vocab_size=12, embed_dim=6, cells=cells, hidden_size=16,
                           num_layers=layers, dropout=0.0, cell=cell, copy_ids=copy_ids)  # fmt: skip
    return AttentionDecoder(config, torch.randn(12, 6), pad_id=0).eval()


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("layers", [1, 2])
def test_unrolled_layer_equals_the_fused_one(cell, layers):
    torch.manual_seed(1)
    module = recurrent_layer(cell, 5, 7, layers).eval()
    x, h, c = torch.randn(3, 6, 5), torch.randn(layers, 3, 7), torch.randn(layers, 3, 7)
    fused = run_layer(module, x, h, c)
    record = {}
    unrolled = unroll(module, x, h, c, record)
    for a, b in zip(fused, unrolled):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert torch.allclose(torch.stack(record["hidden"], 1), fused[0], atol=1e-6)


def test_lstm_gates_follow_the_lectures_equations():
    torch.manual_seed(2)
    module = recurrent_layer("lstm", 5, 7).eval()
    x, h, c = torch.randn(3, 6, 5), torch.zeros(1, 3, 7), torch.randn(1, 3, 7)
    record = {}
    unroll(module, x, h, c, record)
    i, f, g, o = (record["gates"][name] for name in ("input", "forget", "candidate", "output"))
    cells = torch.cat([c.transpose(0, 1), record["cell"]], dim=1)  # (B, T+1, H): c_0 .. c_T
    torch.testing.assert_close(cells[:, 1:], f * cells[:, :-1] + i * g, atol=1e-6, rtol=0)
    torch.testing.assert_close(module(x, (h, c))[0], o * record["cell"].tanh(), atol=1e-6, rtol=0)
    assert ((i > 0) & (i < 1) & (f > 0) & (f < 1) & (o > 0) & (o < 1)).all()


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_a_trace_changes_no_output(cell):
    decoder = tiny_decoder(cell, layers=2)
    features, ids = torch.randn(3, 36), torch.randint(1, 12, (3, 7))
    memory, state = decoder.start(features)
    plain, plain_state = decoder.run(ids, state, memory)
    record = {}
    traced, traced_state = decoder.run(ids, state, memory, trace=record)
    torch.testing.assert_close(plain, traced, atol=1e-6, rtol=0)
    for a, b in zip(plain_state, traced_state):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert record["attention"].shape == (3, 7, 9)


def test_checkpoints_from_before_the_cell_option_are_lstms():
    config = tiny_decoder().config.to_dict()
    del config["cell"]
    decoder = AttentionDecoder(DecoderConfig(**config), torch.randn(12, 6), pad_id=0)
    assert isinstance(decoder.language_lstm, torch.nn.LSTM) and isinstance(decoder.word_lstm, torch.nn.LSTM)
    assert "language_lstm.weight_hh_l0" in decoder.state_dict()  # the weight names checkpoints hold


class _Vocab:
    words = [f"w{i}" for i in range(12)]

    def decode(self, tokens):
        return " ".join(self.words[t] for t in tokens)


class _Model:
    """What ``inspect_caption`` reads of a Captioner."""

    def __init__(self, decoder):
        self.decoder, self.vocab, self.device = decoder, _Vocab(), torch.device("cpu")
        self.ids = type("Ids", (), {"start": 1})


def test_inspected_words_attention_sums_to_one_and_probabilities_are_the_models():
    decoder = tiny_decoder()
    feature, tokens = torch.randn(36), [5, 7, 3, 2]
    inspected = inspect_caption(_Model(decoder), feature, Hypothesis(tokens, 0.0))
    logp = decoder(feature[None], torch.tensor([[1, 5, 7, 3]])).log_softmax(-1)[0]  # (T, V)
    assert [w["word"] for w in inspected["words"]] == ["w5", "w7", "w3", "w2"]
    for t, word in enumerate(inspected["words"]):
        attention = torch.tensor(word["attention"])
        assert attention.shape == (3, 3) and attention.sum().item() == pytest.approx(1.0, abs=1e-3)
        assert word["probability"] == pytest.approx(logp[t, tokens[t]].exp().item(), abs=1e-4)
        assert all(a["probability"] <= logp[t].exp().max().item() + 1e-4 for a in word["alternatives"])
        assert set(word["gates"]) == {"input", "forget", "output"} and len(word["cell"]) == 16


def test_gradient_norms_of_a_linear_recurrence_are_its_jacobian_products():
    torch.manual_seed(3)
    w, a = torch.randn(4, 4) * 0.5, torch.randn(4)
    h = torch.randn(2, 4, requires_grad=True)
    states = []
    for _ in range(5):
        h = h @ w.T  # h_{k+1} = W h_k: dh_t/dh_k = W^(t-k)
        states.append(h)
    losses = torch.stack([s @ a for s in states], dim=1)  # (B, T): L_t = a . h_t
    norms = gradient_norms(losses, states)
    for t in range(5):
        for k in range(5):
            expected = (torch.linalg.matrix_power(w.T, t - k) @ a).norm().item() if k <= t else 0.0
            assert norms[:, t, k].tolist() == pytest.approx([expected] * 2, rel=1e-5, abs=1e-7)


def test_decoder_gradients_through_time_match_autograd_through_the_fused_lstm():
    decoder = tiny_decoder(layers=1)
    features, ids = torch.randn(2, 36), torch.randint(3, 12, (2, 6))
    memory, state = decoder.start(features)
    record = {}
    logits, _ = decoder.run(ids[:, :-1], state, memory, trace=record)
    targets = ids[:, 1:]
    losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T)
    norms = gradient_norms(losses, record["hidden"])
    # Independently: the fused nn.LSTM run on from (h_k, c_k), differentiated by autograd.
    queries, _, _ = run_layer(decoder.word_lstm, decoder.embed(ids[:, :-1]), state.word_h, state.word_c)
    contexts = decoder.attention(queries, memory.keys, state.context[0], state.coverage[0])[0]
    inputs = torch.cat([queries, contexts], dim=-1).detach()
    for t in range(5):
        for k in range(t + 1):
            h_k = record["hidden"][k].detach().requires_grad_()
            c_k = record["cell"][:, k].detach()
            out = h_k if k == t else run_layer(decoder.language_lstm, inputs[:, k + 1 : t + 1], h_k[None], c_k[None])[0][:, -1]
            loss = F.cross_entropy(decoder.out(out), targets[:, t], reduction="sum")
            (grad,) = torch.autograd.grad(loss, h_k)
            torch.testing.assert_close(norms[:, t, k], grad.norm(dim=1), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("scale, grows", [(0.5, False), (1.5, True)])
def test_a_plain_rnns_gradients_decay_or_grow_with_its_largest_singular_value(scale, grows):
    torch.manual_seed(4)
    module = recurrent_layer("rnn", 3, 8).eval()
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(8, 8))
        module.weight_hh_l0.copy_(scale * q)  # every singular value is `scale`
        module.weight_ih_l0.zero_(), module.bias_ih_l0.zero_(), module.bias_hh_l0.zero_()
    record = {}
    h0 = 1e-4 * torch.randn(1, 4, 8)  # small: tanh stays in its linear part, its slope ~1
    unroll(module, torch.zeros(4, 12, 3), h0, torch.zeros_like(h0), record)
    losses = torch.stack([h.sum(1) for h in record["hidden"]], dim=1)  # (B, T)
    curve = by_distance(gradient_norms(losses, record["hidden"]), torch.ones(4, 12, dtype=torch.bool), min_pairs=1)
    ratios = [b / a for a, b in zip(curve["mean_norm"], curve["mean_norm"][1:])]
    assert curve["distance"] == list(range(12))
    assert all(r == pytest.approx(scale, rel=0.05) for r in ratios)
    assert (curve["mean_norm"][-1] > 10 * curve["mean_norm"][0]) == grows


def test_word_properties():
    words = "a red circle left of a blue square and the blue square is above a star".split()
    values = word_properties(words)
    assert values["position in the caption (words read)"][:3] == [1.0, 2.0, 3.0]
    assert values["inside the second clause (after 'and')"] == [0.0] * 8 + [1.0] * 8
    assert values["after a relation word, up to its object's shape"] == [0] * 3 + [1] * 5 + [0] * 5 + [1] * 3
    assert values["the next word is a colour"] == [1.0] + [0.0] * 4 + [1.0, 0, 0, 0, 1.0] + [0.0] * 6


@pytest.mark.slow  # trains a model and inspects it, per cell: several seconds
@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_other_cells_train_save_load_and_caption(cell, tmp_path, shapes_json, shapes, feature_cache):
    train(tiny_config(shapes_json, tmp_path / cell, feature_cache, cell=cell, epochs=1))
    model = Captioner.load(tmp_path / cell / "model.pt")
    assert isinstance(model.decoder.language_lstm, {"gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell])
    (captions,) = model.caption([shapes.split("test")[0].path], mode="beam", beam_size=2)
    assert captions[0]["text"] and model.name.endswith(cell)
    metrics = [json.loads(line) for line in (tmp_path / cell / "metrics.jsonl").read_text().splitlines()]
    assert 0.0 <= metrics[0]["clip_rate"] <= 1.0
    out = tmp_path / "inspect"
    argv = ["inspect", str(tmp_path / cell / "model.pt"), str(shapes.split("test")[0].path), "--data", str(shapes_json),
            "--output", str(out), "--gradient-captions", "4"]  # fmt: skip
    assert main(argv) == 0
    split = json.loads((out / "split.json").read_text())
    assert set(split["saturation"]) == ({"reset", "update"} if cell == "gru" else set())
    assert (out / "saturation.png").exists() == (cell == "gru")  # a plain RNN has no gates to saturate
    assert split["gradients"]["mean_norm"][0] > 0 and (out / "cells.png").exists()


@pytest.mark.slow  # the whole command: matplotlib, every figure, gradients through time; several seconds
def test_inspect_command_writes_figures_and_numbers(tmp_path, trained_run, shapes_json, shapes, capsys):
    images = [str(r.path) for r in shapes.split("test")[:2]]
    out = tmp_path / "inspect"
    argv = ["inspect", str(trained_run / "model.pt"), *images, "--data", str(shapes_json), "--output", str(out),
            "--mode", "beam", "--beam-size", "2", "--gradient-captions", "4"]  # fmt: skip
    assert main(argv) == 0
    names = {p.name for p in out.iterdir()}
    assert {"cells.png", "saturation.png", "gradients.png", "split.json"} <= names
    assert sum(n.startswith("words-") and n.endswith(".png") for n in names) == 2
    words = json.loads(next(out.glob("words-01-*.json")).read_text())
    assert words["caption"] and words["words"][0]["attention"] is None  # the tiny model has one cell: no attention
    assert 0 < words["words"][0]["probability"] <= 1 and len(words["words"][0]["gates"]["forget"]) == 48
    split = json.loads((out / "split.json").read_text())
    assert all(0 <= v <= 1 for v in split["saturation"]["forget"]["left"]) and len(split["saturation"]["input"]["right"]) == 48
    assert split["gradients"]["distance"][0] == 0 and all(v >= 0 for v in split["gradients"]["mean_norm"])
    assert split["shown"] and all(-1 <= p[0]["r"] <= 1 for p in split["properties"].values())
    assert split["training"][0]["grad_norm"] > 0
    assert str(out / "gradients.png") in capsys.readouterr().out
