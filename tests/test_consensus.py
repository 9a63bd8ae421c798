"""Consensus re-ranking: beam search's captions re-ranked by the captions of the training images
most like the image, kept in the model (captioner/consensus.py)."""

import io

import pytest
import torch
from PIL import Image

from captioner.checkpoint import read_checkpoint
from captioner.consensus import CaptionMemory, neighbours_for
from captioner.decoding import Hypothesis
from captioner.errors import CaptionerError
from captioner.models.captioner import Captioner
from captioner.options import MAX_BEAM_SIZE, MAX_CAPTIONS, DecodeOptions
from captioner.training import train
from service.app import create_app, stop_app
from tests.helpers import tiny_config

WORDS = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "runs", "on", "grass", "man", "rides", "bike"]
DOG = [["a", "dog", "runs", "on", "grass"], ["a", "dog", "runs"]]
MAN = [["a", "man", "rides", "a", "bike"], ["a", "man", "rides"]]


def hypothesis(text: str, log_prob: float) -> Hypothesis:
    return Hypothesis([WORDS.index(w) for w in text.split()] + [2], log_prob)


def test_the_caption_the_nearest_images_people_would_write_comes_first():
    # Two training images, one of a dog and one of a man, with features along different axes
    # (one cell: the feature is its channels).
    memory = CaptionMemory(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), [DOG, MAN], neighbours=1)
    beam = [hypothesis("a man rides a bike", -2.0), hypothesis("a dog runs on grass", -6.0)]
    near_the_dog, near_the_man = torch.tensor([[0.9, 0.2]]), torch.tensor([[0.1, 1.0]])
    first = memory.rerank(near_the_dog, 1, [beam], WORDS, end=2, neighbours=1)[0][0]
    assert WORDS[first.tokens[1]] == "dog"
    first = memory.rerank(near_the_man, 1, [beam], WORDS, end=2, neighbours=1)[0][0]
    assert WORDS[first.tokens[1]] == "man"
    # Both images as neighbours: agreement is even, and the likelier caption wins.
    first = memory.rerank(near_the_dog, 1, [beam], WORDS, end=2, neighbours=2)[0][0]
    assert WORDS[first.tokens[1]] == "man"


def test_the_memory_averages_each_images_cells_and_refuses_another_encoders_features():
    # Two cells, channel-major: channel 0 is (1, 3) over the cells, channel 1 is (0, 0).
    memory = CaptionMemory.from_features(torch.tensor([[1.0, 3.0, 0.0, 0.0], [0.0, 0.0, 2.0, 2.0]]), 2, [DOG, MAN], 1)
    assert torch.allclose(memory.features.float(), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(CaptionerError, match="do not match this encoder"):
        memory.rerank(torch.zeros(1, 3), 1, [[hypothesis("a dog", -1.0)]], WORDS, end=2, neighbours=1)
    with pytest.raises(CaptionerError, match="cannot re-rank by 3 neighbours"):
        CaptionMemory(torch.eye(2), [DOG, MAN], neighbours=3)
    with pytest.raises(CaptionerError, match="one feature and one list of captions per training image"):
        CaptionMemory(torch.eye(3), [DOG, MAN], neighbours=1)
    with pytest.raises(CaptionerError, match="finite"):
        CaptionMemory(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), [DOG, MAN], neighbours=1)


@pytest.mark.parametrize(
    "mode, rerank, memory, expected",
    [
        ("beam", None, (30, 6000), 30),  # the model's own
        ("beam", 5, (30, 6000), 5),
        ("beam", 0, (30, 6000), 0),  # off
        ("beam", None, None, 0),  # a model without a memory ranks by probability
        ("greedy", None, (30, 6000), 0),  # one caption: nothing to re-rank
    ],
)
def test_one_rule_says_how_many_images_re_rank(mode, rerank, memory, expected):
    assert neighbours_for(mode, rerank, memory) == expected


def test_re_ranking_that_cannot_be_done_is_refused_in_one_line():
    with pytest.raises(CaptionerError, match="keeps no training captions"):
        neighbours_for("beam", 5, None)
    with pytest.raises(CaptionerError, match="at most 48, the training images this model keeps"):
        neighbours_for("beam", 49, (30, 48))
    with pytest.raises(CaptionerError, match="rerank must be 0"):
        DecodeOptions(mode="beam", rerank=-1)
    with pytest.raises(CaptionerError, match="rerank does not apply to greedy"):
        DecodeOptions(rerank=5)


@pytest.fixture(scope="module")
def reranking_run(tmp_path_factory, shapes_json, feature_cache):
    """A tiny shapes model that keeps its 48 training images' captions and re-ranks by 5; its
    self-critical epoch takes its reward from the same captions."""
    out = tmp_path_factory.mktemp("rerank") / "run"
    train(tiny_config(shapes_json, out, feature_cache, rerank=5, self_critical_epochs=1))
    return out


def test_training_keeps_the_training_captions_and_the_checkpoint_carries_them(reranking_run, shapes):
    model = Captioner.load(reranking_run / "model.pt")
    train_records = shapes.split("train")
    assert model.memory.summary == (5, len(train_records))
    last = read_checkpoint(reranking_run / "last.pt")["training"]["history"][-1]
    assert last["epoch"] == 4 and 0 < last["train_reward"] <= 10  # CIDEr-D's scale
    assert model.memory.features.shape == (len(train_records), model.encoder.feature_dim)  # one cell
    assert [" ".join(words) for words in model.memory.captions[0]] == [c.lower().rstrip(".") for c in train_records[0].captions]
    # A memory that does not fit together is a clear error, not a model that half works.
    for damage in (
        lambda memory: memory.update(captions=memory["captions"][:-1]),  # an image without captions
        lambda memory: memory.update(features=memory["features"][:, :-1]),  # not this encoder's features
        lambda memory: memory.update(features=memory["features"] * float("inf")),
        lambda memory: memory.update(captions=[[7] * 5] * len(memory["captions"])),  # not text
    ):
        state = read_checkpoint(reranking_run / "model.pt")
        damage(state["caption_memory"])
        with pytest.raises(CaptionerError, match="does not fit together"):
            Captioner.from_checkpoint(state)


def test_beam_search_re_ranks_its_own_captions_by_the_memory(reranking_run):
    model = Captioner.load(reranking_run / "model.pt")
    image = Image.new("RGB", (32, 32), "black")
    features = model.encode(model.images_to_batch([image]))
    by_probability = model.generate(features, DecodeOptions(mode="beam", num_captions=3, rerank=0))[0]
    assert len({tuple(h.tokens) for h in by_probability}) == 3
    # The image's nearest training image said, in all its captions, the beam's least likely
    # caption; the other one (the opposite feature) something else: that caption comes first.
    last = [model.vocab.words[t] for t in by_probability[-1].tokens if t != model.vocab.end]
    pooled = features.view(1, -1, model.decoder.config.cells).mean(2)
    model.memory = CaptionMemory(torch.cat([pooled, -pooled]), [[last] * 5, [["something", "else"]] * 5], neighbours=1)
    reranked = model.generate(features, DecodeOptions(mode="beam", num_captions=3))[0]
    assert reranked[0].tokens == by_probability[-1].tokens
    assert sorted(h.tokens for h in reranked) == sorted(h.tokens for h in by_probability)
    # One caption asked for: the best of the whole beam after re-ranking, not of one.
    assert model.generate(features, DecodeOptions(mode="beam"))[0][0].tokens == by_probability[-1].tokens
    assert model.generate(features, DecodeOptions(mode="beam", rerank=0))[0][0].tokens == by_probability[0].tokens
    # A beam wider than the most captions one may ask for is re-ranked whole all the same.
    widest = model.generate(features, DecodeOptions(mode="beam", beam_size=MAX_BEAM_SIZE))[0]
    assert MAX_BEAM_SIZE > MAX_CAPTIONS and [h.tokens for h in widest] == [by_probability[-1].tokens]


def test_the_service_names_the_memory_and_refuses_what_the_model_cannot_do(reranking_run, trained_run):
    png = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(png, format="PNG")
    for run, card in ((reranking_run, {"neighbours": 5, "images": 48}), (trained_run, None)):
        app = create_app({"MODEL_PATH": str(run / "model.pt"), "TESTING": True})
        try:
            assert app.extensions["captioner"].model_process.wait_ready(60)
            client = app.test_client()
            assert client.get("/v1/model").get_json()["decoding"]["rerank"] == card
            answer = client.post("/v1/captions?mode=beam&rerank=3", data=png.getvalue(), content_type="image/png")
            if card:
                assert answer.status_code == 200, answer.get_json()
                # The widest beam, wider than the most captions one may ask for (was a 500).
                widest = f"/v1/captions?mode=beam&beam_size={MAX_BEAM_SIZE}&num_captions={MAX_CAPTIONS}"
                answer = client.post(widest, data=png.getvalue(), content_type="image/png")
                assert answer.status_code == 200 and len(answer.get_json()["captions"]) == MAX_CAPTIONS, answer.get_json()
            else:
                assert answer.status_code == 400
                assert answer.get_json()["error"]["code"] == "invalid_option"
                assert "keeps no training captions" in answer.get_json()["error"]["message"]
            too_many = client.post("/v1/captions?mode=beam&rerank=49", data=png.getvalue(), content_type="image/png")
            assert too_many.status_code == 400
        finally:
            stop_app(app)
