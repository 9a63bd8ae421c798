"""Tests for captioner.metrics: agreement with pycocoevalcap used directly, and the no-Java paths.

METEOR loads for several seconds per call, so only two tests start it (ours and the direct one,
run side by side); the rest pass meteor=False or run without Java.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pycocoevalcap.meteor.meteor as meteor_module
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from captioner import metrics
from captioner.errors import CaptionerError
from captioner.metrics import METRIC_NAMES, caption_metrics, java_available, simple_tokenize

needs_java = pytest.mark.skipif(not java_available(), reason="needs Java (PTB tokenizer, METEOR)")

# Five images, int and str ids, 2-5 references each; candidates from exact to unrelated.
REFERENCES = {
    1: [
        "A brown dog runs across the grass.",
        "A dog is running on a lawn.",
        "The brown dog sprints through a green field!",
        "A puppy running outside.",
        "Dog running in the park",
    ],
    2: ["Two children play soccer on a field.", "Kids playing football outdoors."],
    "img_3": [
        "A man rides a bicycle down the street.",
        "Someone cycling on a city road.",
        "A cyclist in a red jacket on the road.",
    ],
    4: [
        "A plate of pasta with tomato sauce.",
        "Spaghetti and sauce served on a white plate.",
        "A bowl of noodles, with red sauce.",
        "Italian food on a dinner plate.",
    ],
    "img_5": ["A cat sleeping on a couch.", "The cat's asleep on the sofa, curled up."],
}
CANDIDATES = {
    1: "A brown dog runs across the grass.",  # identical to a reference
    2: "Two kids are playing soccer on a grass-covered field.",  # good paraphrase
    "img_3": "A man riding a bike.",  # short, partly right
    4: "A plate of food on a table.",  # vague
    "img_5": "A red car parked near a building.",  # wrong
}


def _reference_scores(candidates, references) -> dict[str, float]:
    """pycocoevalcap called directly, as COCOEvalCap.evaluate does."""
    gts = {i: [{"caption": c} for c in refs] for i, refs in references.items()}
    res = {i: [{"caption": candidates[i]}] for i in references}
    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)  # verbose only prints
    meteor = Meteor()
    try:
        meteor_score, _ = meteor.compute_score(gts, res)
    finally:
        metrics._stop_meteor(meteor)
    scores = dict(zip(("bleu_1", "bleu_2", "bleu_3", "bleu_4"), bleu))
    scores["meteor"] = meteor_score
    scores["rouge_l"] = Rouge().compute_score(gts, res)[0]
    scores["cider"] = Cider().compute_score(gts, res)[0]
    return scores


@pytest.fixture()
def meteor_spy(monkeypatch):
    """Records every Meteor that caption_metrics starts, to check its JVM is gone afterwards."""
    started = []

    class SpyMeteor(Meteor):
        def __init__(self):
            super().__init__()
            started.append(self)

    monkeypatch.setattr(metrics, "Meteor", SpyMeteor)
    return started


@pytest.fixture()
def no_java(monkeypatch, tmp_path):
    """PATH without java, and java_available re-evaluated now and again after the test."""
    monkeypatch.setenv("PATH", str(tmp_path))
    java_available.cache_clear()
    yield
    java_available.cache_clear()


@pytest.mark.slow  # two METEOR JVMs
@needs_java
def test_ptb_matches_pycocoevalcap_directly(meteor_spy, capfd):
    # Each METEOR JVM takes seconds to load; start the direct one alongside ours.
    with ThreadPoolExecutor(1) as pool:
        direct_run = pool.submit(_reference_scores, CANDIDATES, REFERENCES)
        ours = caption_metrics(CANDIDATES, REFERENCES, tokenizer="ptb")
        direct = direct_run.result()

    assert capfd.readouterr().out == ""  # nothing on stdout, where the CLI writes its JSON
    [scorer] = meteor_spy
    assert scorer.meteor_p.returncode is not None  # its JVM was stopped, not left to the GC
    assert scorer.meteor_p.stdout.closed and scorer.meteor_p.stderr.closed
    assert not scorer.lock.locked()

    assert list(ours) == list(METRIC_NAMES)  # all computed: no "meteor_unavailable"
    assert all(type(v) is float for v in ours.values())
    # PTB keeps "grass-covered" whole where simple_tokenize splits it: proof PTB really ran.
    simple = caption_metrics(CANDIDATES, REFERENCES, tokenizer="simple", meteor=False)
    assert ours["bleu_4"] != pytest.approx(simple["bleu_4"], abs=1e-6)

    for name in METRIC_NAMES:
        assert ours[name] == pytest.approx(direct[name], abs=1e-6), name

    # Pinned once from pycocoevalcap 1.2, so a silent change in its behaviour shows up here.
    assert ours["bleu_4"] == pytest.approx(0.3713524703, abs=1e-6)
    assert ours["meteor"] == pytest.approx(0.3467739940, abs=1e-6)
    assert ours["cider"] == pytest.approx(1.1130454439, abs=1e-6)


@needs_java
def test_ptb_keeps_captions_aligned_across_unusual_line_breaks():
    # Java's tokenizer would split "\r" into a second line, shifting every caption after it.
    candidates = {1: "a dog\rruns", 2: "a cat sleeps"}
    references = {1: ["a dog runs"], 2: ["a cat sleeps"]}
    scores = caption_metrics(candidates, references, tokenizer="ptb", meteor=False)
    assert scores["bleu_1"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("tokenizer", ["simple", pytest.param("ptb", marks=needs_java)])
def test_perfect_candidate_scores_high_and_bad_one_low(tokenizer):
    exact = {i: refs[0] for i, refs in REFERENCES.items()}
    unrelated = {i: "a red car parked near a building" for i in REFERENCES}
    perfect = caption_metrics(exact, REFERENCES, tokenizer=tokenizer, meteor=False)
    bad = caption_metrics(unrelated, REFERENCES, tokenizer=tokenizer, meteor=False)

    assert perfect["bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["rouge_l"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["cider"] > 2.0
    assert bad["cider"] < 0.2 * perfect["cider"]
    assert bad["bleu_4"] < 0.1
    assert perfect["meteor"] is None and bad["meteor"] is None
    assert "meteor=False" in perfect["meteor_unavailable"]


def test_without_java_simple_scores_everything_but_meteor(no_java, meteor_spy):
    scores = caption_metrics(CANDIDATES, REFERENCES, tokenizer="simple")

    assert meteor_spy == []
    assert scores["meteor"] is None  # unknown, not 0
    assert "Java" in scores["meteor_unavailable"]
    # The scores are pycocoevalcap's own on the simply tokenized captions.
    gts = {i: [simple_tokenize(c) for c in refs] for i, refs in REFERENCES.items()}
    res = {i: [simple_tokenize(CANDIDATES[i])] for i in REFERENCES}
    expected = dict(zip(("bleu_1", "bleu_2", "bleu_3", "bleu_4"), Bleu(4).compute_score(gts, res, verbose=0)[0]))
    expected |= {"rouge_l": Rouge().compute_score(gts, res)[0], "cider": Cider().compute_score(gts, res)[0]}
    for name, value in expected.items():
        assert type(scores[name]) is float and scores[name] == pytest.approx(value, abs=1e-9), name
    assert scores["cider"] > 0  # the candidates share words with their references


def test_without_java_ptb_says_what_to_do(no_java):
    with pytest.raises(CaptionerError, match=r'(?s)install Java.*tokenizer="simple"'):
        caption_metrics(CANDIDATES, REFERENCES, tokenizer="ptb")


@needs_java
def test_meteor_jvm_failure_is_reported_not_scored_zero(monkeypatch, meteor_spy):
    # A jar that does not exist makes the JVM exit at once, like one that cannot start.
    monkeypatch.setattr(meteor_module, "METEOR_JAR", "missing.jar")
    scores = caption_metrics(CANDIDATES, REFERENCES, tokenizer="simple")

    assert scores["meteor"] is None
    assert "METEOR's Java process failed" in scores["meteor_unavailable"]
    # The other scores are kept, as if METEOR had not been asked for.
    without = caption_metrics(CANDIDATES, REFERENCES, tokenizer="simple", meteor=False)
    for name in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider"):
        assert scores[name] == without[name], name
    assert scores["cider"] > 0
    assert meteor_spy[0].meteor_p.returncode is not None
    assert not meteor_spy[0].lock.locked()  # else Meteor.__del__ would deadlock


@pytest.mark.parametrize(
    ("candidates", "references", "message"),
    [
        ({}, {}, "non-empty"),
        ({1: "a dog"}, {}, "non-empty"),
        (
            {1: "a dog", 2: "a cat"},
            {1: ["a dog"], 3: ["x"], 4: ["y"]},
            r"2 without a candidate \(3, 4\); 1 without references \(2\)",
        ),
        ({"1": "a dog"}, {1: ["a dog"]}, r"without a candidate \(1\).*without references \('1'\)"),
        ({1: "a dog"}, {1: "a dog"}, "non-empty list of strings"),
        ({1: "a dog"}, {1: []}, "non-empty list of strings"),
        ({1: ["a dog"]}, {1: ["a dog"]}, "must be one string"),
    ],
)
def test_bad_input_is_a_captioner_error(candidates, references, message):
    with pytest.raises(CaptionerError, match=message):
        caption_metrics(candidates, references, tokenizer="simple", meteor=False)


def test_unknown_tokenizer_is_a_captioner_error():
    with pytest.raises(CaptionerError, match="unknown tokenizer 'nltk'"):
        caption_metrics({1: "a"}, {1: ["a"]}, tokenizer="nltk")


def test_mismatch_message_shows_only_a_few_ids():
    references = {i: ["a dog"] for i in range(10)}
    with pytest.raises(CaptionerError, match=r"10 without a candidate \(0, 1, 2, \.\.\. 7 more\)"):
        caption_metrics({"x": "a dog"}, references, tokenizer="simple")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A Dog, running!", "a dog running"),
        ("  The cat's   asleep...\n", "the cat s asleep"),
        ("black-and-white (photo); 2 dogs?", "black and white photo 2 dogs"),
        ("Café «chez» Nous", "café chez nous"),
        ("snake_case", "snake case"),
        ("?!.", ""),
    ],
)
def test_simple_tokenize(text, expected):
    assert simple_tokenize(text) == expected
