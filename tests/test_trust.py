"""Trust (#45): scoring given captions, the confidence of generated ones, unfamiliar photographs,
and the calibration behind them (captioner/trust.py, Captioner.score, captioner score,
captioner calibrate-trust)."""

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from captioner.checkpoint import read_checkpoint, save_checkpoint
from captioner.consensus import CaptionMemory
from captioner.errors import CaptionerError
from captioner.evaluation import calibrate_trust
from captioner.features import cached_features
from captioner.models.captioner import Captioner
from captioner.trust import (
    UNFAMILIAR_SCORE,
    Head,
    TrustCalibration,
    auc,
    caption_tokens,
    dev_pairs,
    fit_logistic,
    kendall_tau,
    reliability,
)

from tests.helpers import assert_one_line_error, noise, run, write_flickr_slice

FLICKR8K = Path(os.environ.get("FLICKR8K_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "flickr8k"))
needs_flickr8k = pytest.mark.skipif(
    not (FLICKR8K / "Flickr8k.token.txt").is_file(), reason=f"no Flickr8k at {FLICKR8K} (set FLICKR8K_DIR)"
)


def finite(value) -> bool:
    """Every number in a record (nested) is finite."""
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, list):
        return all(finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


# --- the numbers behind a calibration ---------------------------------------------------------


def test_auc_counts_ties_half_and_kendall_tau_agrees_with_hand_counts():
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5
    assert math.isnan(auc([1, 2], [1, 1]))  # no negatives: not a number to report, not a crash
    assert kendall_tau([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # 5 concordant, 1 discordant pair of 6: (5 - 1) / 6.
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)


def test_a_logistic_fit_recovers_the_direction_and_is_calibrated_on_its_own_data():
    generator = np.random.default_rng(0)
    x = generator.normal(size=(4000, 2))
    y = (generator.random(4000) < 1 / (1 + np.exp(-(2 * x[:, 0] - 0.5)))).astype(float)  # x[:, 1] is noise
    weights, bias, mean, scale = fit_logistic(x, y)
    assert weights[0] / scale[0] == pytest.approx(2.0, rel=0.15) and abs(weights[1]) < 0.15
    head = Head(("log_prob", "contrast"), weights, bias, mean, scale)
    table = reliability(head.probability(x), y)
    assert sum(row["pairs"] for row in table) == 4000
    assert all(abs(row["predicted"] - row["observed"]) < 0.1 for row in table if row["pairs"] > 100)


def test_dev_pairs_give_each_photograph_its_own_references_and_others_near_and_far():
    features = torch.nn.functional.normalize(torch.randn(12, 8), dim=1)
    pairs = dev_pairs(features @ features.T, [5] * 12, near=3, far=2, nearest=5, seed=1)
    assert len(pairs) == 12 * 10
    for image in range(12):
        mine = [p for p in pairs if p.image == image]
        assert sorted(p.caption for p in mine if p.kind == "own") == [0, 1, 2, 3, 4]
        assert all(p.source != image for p in mine if p.kind != "own") and sum(p.kind == "near" for p in mine) == 3
    assert {p.label for p in pairs if p.kind == "own"} == {1} and {p.label for p in pairs if p.kind != "own"} == {0}
    with pytest.raises(CaptionerError, match="too few"):
        dev_pairs(features[:4] @ features[:4].T, [5] * 4)


def test_a_calibration_refuses_numbers_that_do_not_fit():
    good = dict(signals=("log_prob",), weights=(1.0,), bias=0.0, mean=(0.0,), scale=(1.0,))
    Head(**good)
    for bad in (dict(signals=("nonsense",)), dict(weights=(1.0, 2.0)), dict(scale=(0.0,)), dict(bias=float("nan"))):
        with pytest.raises(CaptionerError):
            Head(**{**good, **bad})
    calibration = TrustCalibration(Head(**good), None, 0.5, "x")
    assert TrustCalibration.from_dict(calibration.to_dict()) == calibration
    with pytest.raises(CaptionerError, match="does not fit"):
        TrustCalibration.from_dict({**calibration.to_dict(), "extra": 1})
    with pytest.raises(CaptionerError, match="does not fit"):
        TrustCalibration.from_dict({"threshold": 0.5, "encoder": "x"})


def test_parity_is_the_share_of_references_a_caption_does_as_well_as():
    from captioner.evaluation import parity

    references = [[r.split() for r in ("a dog runs on grass", "a brown dog runs", "a dog running on the grass")],
                  [r.split() for r in ("a man rides a bike", "a cyclist on a road", "a man on a bicycle")]]  # fmt: skip
    scores = parity(["a dog runs on the grass".split(), "a cat sleeps".split(), "a man rides a bicycle".split()], [0, 0, 1], references)
    assert scores[0] > 0.5 and scores[1] == 0.0 and scores[2] > 0.5
    assert all(0 <= s <= 1 for s in scores)


# --- scoring given captions with the tiny shapes model ---------------------------------------


@pytest.fixture(scope="module")
def tiny(trained_run):
    return Captioner.load(trained_run / "model.pt")


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, trained_run, shapes, tiny):
    """The tiny model calibrated on its training split's 48 images (the shapes world has too few
    dev images for pairs; the mechanics are the same), saved and read back."""
    records = shapes.split("train")
    features = torch.cat([tiny.encode(tiny.images_to_batch([Image.open(r.path).convert("RGB") for r in records]))])
    calibration, report = calibrate_trust(tiny, records, features, seed=0)
    state = read_checkpoint(trained_run / "model.pt")
    state["trust"] = calibration.to_dict()
    path = tmp_path_factory.mktemp("calibrated") / "model.pt"
    save_checkpoint(state, path)
    return path, report


def test_oov_words_are_read_as_unk_and_listed_never_a_nan(tiny, shapes):
    image = shapes.split("val")[0].path
    [scored] = tiny.score([image], ["a red zebra plays the xylophone"])
    assert scored["unknown_words"] == ["zebra", "plays", "xylophone"]
    assert [w["word"] for w in scored["words"]] == ["a", "red", "zebra", "plays", "the", "xylophone", "<end>"]
    assert all(0 < w["prob"] <= 1 for w in scored["words"])
    assert scored["log_prob"] == pytest.approx(sum(math.log(w["prob"]) for w in scored["words"]), rel=1e-5)
    assert scored["truncated"] is False and finite(scored)
    # Nothing known at all, and nothing at all, are scored too.
    for caption in ("qwerty zxcvb", "", "?!"):
        [scored] = tiny.score([image], [caption])
        assert finite(scored) and scored["words"][-1]["word"] == "<end>" and scored["perplexity"] >= 1


def test_a_long_caption_is_cut_at_the_limit_and_says_so(tiny, shapes):
    image = shapes.split("val")[0].path
    long = " ".join(["a red circle left of a blue square"] * 40)  # 320 words
    [scored] = tiny.score([image], [long], max_words=50)
    assert scored["truncated"] is True and len(scored["words"]) == 50 and scored["words"][-1]["word"] != "<end>"
    assert finite(scored)
    [short] = tiny.score([image], ["a red circle"])
    assert short["truncated"] is False


def test_scores_are_the_teacher_forced_probabilities_of_generation(tiny, shapes):
    """A generated caption given back to score has the log-probability generation gave it."""
    image = shapes.split("val")[1].path
    [[generated]] = tiny.caption([image])
    [scored] = tiny.score([image], [generated["text"]])
    # A caption cut at max_length has no <end>; scored, the caption is given whole and ends.
    said = scored["words"] if generated["finished"] else scored["words"][:-1]
    assert sum(math.log(w["prob"]) for w in said) == pytest.approx(generated["log_prob"], abs=1e-3)
    assert scored["unknown_words"] == []


def test_a_model_without_memory_says_it_cannot_tell_and_an_uncalibrated_one_does_not_guess(tiny, shapes):
    assert tiny.memory is None and tiny.trust is None  # a checkpoint from before trust loads as it was
    image = shapes.split("val")[0].path
    [scored] = tiny.score([image], ["a red circle"])
    assert scored["unfamiliar"] is None and scored["familiarity"] is None and scored["score"] is None
    assert "calibrate-trust" in scored["trust_note"]
    [[caption]] = tiny.caption([image])
    assert caption["confidence"] is None and caption["unfamiliar"] is None and caption["trust_note"]


def test_a_calibrated_checkpoint_loads_plain_and_its_scores_rank_own_references_first(calibrated, shapes):
    path, report = calibrated
    state = torch.load(path, map_location="cpu", weights_only=True)  # plain data
    assert state["trust"]["score"]["signals"] == ["log_prob", "contrast"]  # no memory, no concepts
    assert state["trust"]["confidence"]["signals"] == ["log_prob"]
    assert state["trust"]["threshold"] is None and state["trust"]["fitted_on"]["images"] == 48
    assert state["trust"]["fitted_on"]["generated"] == 2 * 48  # each image's greedy and beam caption
    model = Captioner.load(path)
    assert model.trust is not None and model.trust.to_dict() == state["trust"]
    # The tiny model reads little of its images (that own references rank first is the photo
    # model's test, below); here the report's shape, and scores in [0, 1].
    held_out = report["score"]["held_out"]
    assert held_out["images"] == 24 and set(held_out["auc"]) == {"log_prob", "contrast", "score"}
    assert sum(b["pairs"] for b in held_out["reliability"]) == held_out["pairs"] == 24 * 10
    generated = report["confidence"]["held_out"]
    assert generated["captions"] == 48 and set(generated["kendall_tau_with_cider"]) == {"log_prob", "contrast", "score", "confidence"}
    records = shapes.split("val")
    own = model.score([r.path for r in records], [r.captions[0] for r in records])
    assert all(0 <= s["score"] <= 1 for s in own)
    # Without a memory it still cannot tell whether a photograph is unfamiliar, and says so.
    assert all(s["unfamiliar"] is None and "no training photographs" in s["trust_note"] for s in own)
    [[caption]] = model.caption([records[0].path])
    assert 0 <= caption["confidence"] <= 1 and caption["unfamiliar"] is None


def test_an_unfamiliar_photograph_is_flagged_and_its_score_capped(calibrated, shapes, tiny):
    """The rule on its own: a memory of the training images, a threshold above one image's familiarity."""
    path, _ = calibrated
    model = Captioner.load(path)
    train = shapes.split("train")
    grid = model.encode(model.images_to_batch([Image.open(r.path).convert("RGB") for r in train]))
    model.memory = CaptionMemory.from_features(grid, model.decoder.config.cells, [[c.split() for c in r.captions] for r in train], 5)
    [seen] = model.score([train[0].path], [train[0].captions[0]])
    assert seen["familiarity"] == pytest.approx(1.0, abs=1e-3)  # a training image is its own nearest
    model.trust = replace(model.trust, threshold=1.5)  # every image is now below it
    [unseen] = model.score([train[0].path], [train[0].captions[0]])
    assert unseen["unfamiliar"] is True and unseen["score"] <= UNFAMILIAR_SCORE
    [[caption]] = model.caption([train[0].path])
    assert caption["unfamiliar"] is True and caption["confidence"] <= UNFAMILIAR_SCORE
    model.trust = replace(model.trust, threshold=0.0)
    [familiar] = model.score([train[0].path], [train[0].captions[0]])
    assert familiar["unfamiliar"] is False


def test_caption_tokens_cut_and_list_unknown_words(tiny):
    tokens = caption_tokens("A Red circle, a unicorn!", tiny.vocab, max_words=3)
    assert tokens.words == ["a", "red", "circle"] and tokens.truncated and tokens.ids[-1] != tiny.vocab.end
    tokens = caption_tokens("a unicorn", tiny.vocab)
    assert tokens.unknown == ["unicorn"] and tokens.ids == [tiny.vocab.index["a"], tiny.vocab.unk, tiny.vocab.end]


# --- the command line -------------------------------------------------------------------------


def pairs_file(path: Path, records, fmt: str) -> Path:
    rows = [(str(r.path), caption) for r in records for caption in r.captions[:2]]
    if fmt == "csv":
        import csv

        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "caption"])
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps({"image": image, "caption": caption}) + "\n" for image, caption in rows))
    return path


def test_score_writes_one_record_per_pair_and_a_bad_image_is_an_error_record(capsys, tmp_path, calibrated, shapes):
    model, _ = calibrated
    records = shapes.split("val")
    pairs = pairs_file(tmp_path / "pairs.jsonl", records, "jsonl")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n torn")
    with open(pairs, "a") as f:
        f.write(json.dumps({"image": "broken.png", "caption": "a red circle"}) + "\n")  # relative to the file
    code, out, err = run(capsys, "score", model, pairs)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 2 * len(records) + 1
    assert lines[-1]["error"]["code"] == "corrupt_image" and lines[-1]["image"] == str(broken)
    assert all(0 <= r["score"] <= 1 and r["words"][-1]["word"] == "<end>" for r in lines[:-1])


def test_bad_pairs_files_are_one_line_and_a_non_zero_exit(capsys, tmp_path, calibrated):
    model, _ = calibrated
    (tmp_path / "no-columns.csv").write_text("picture,text\na.png,a dog\n")
    (tmp_path / "not-json.jsonl").write_text('{"image": "a.png", "caption": "a dog"}\nnot json\n')
    (tmp_path / "no-caption.jsonl").write_text('{"image": "a.png"}\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    for name, fragment in (
        ("no-columns.csv", "image and caption columns"),
        ("not-json.jsonl", "line 2: not JSON"),
        ("no-caption.jsonl", "line 1: needs an image name and a caption"),
        ("empty.jsonl", "no (image, caption) pairs"),
        ("absent.jsonl", "pairs file not found"),
    ):
        code, _, err = run(capsys, "score", model, tmp_path / name)
        assert_one_line_error(code, err, fragment)
    code, _, err = run(capsys, "score", model, tmp_path / "empty.jsonl", "--max-words", "0")
    assert_one_line_error(code, err, "max_words")
    code, _, err = run(capsys, "calibrate-trust", model, "--data", tmp_path / "x.json", "--split", "test")
    assert_one_line_error(code, err, "test split is held back")


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_scoring_run_resumes_after_its_last_whole_record(capsys, tmp_path, calibrated, shapes, fmt):
    model, _ = calibrated
    records = shapes.split("train")[:10]
    pairs = pairs_file(tmp_path / f"pairs.{fmt}", records, fmt)
    whole = tmp_path / f"whole.{fmt}"
    code, _, err = run(capsys, "score", model, pairs, "--output", whole, "--format", fmt, "--batch-size", "3")
    assert code == 0, err
    expected = whole.read_text()
    assert len(expected.splitlines()) == 20 + (fmt == "csv")
    # A kill after 7 records, mid-way through the 8th; the same command goes on from there.
    lines = expected.splitlines(keepends=True)
    kept = 7 + (fmt == "csv")
    resumed = tmp_path / f"resumed.{fmt}"
    resumed.write_text("".join(lines[:kept]) + lines[kept][:15])
    code, _, err = run(capsys, "score", model, pairs, "--output", resumed, "--format", fmt, "--batch-size", "3")
    assert code == 0, err
    assert len(resumed.read_text().splitlines()) == len(expected.splitlines())
    if fmt == "jsonl":
        got, want = map(lambda text: [json.loads(line) for line in text.splitlines()], (resumed.read_text(), expected))
        assert [(r["image"], r["caption"]) for r in got] == [(r["image"], r["caption"]) for r in want]
        assert [r["score"] for r in got] == pytest.approx([r["score"] for r in want], rel=1e-4)
    else:
        header = expected.splitlines()[0].split(",")
        assert header[:3] == ["image", "caption", "score"] and header[-2:] == ["error_code", "error_message"]
        assert resumed.read_text().splitlines()[0] == expected.splitlines()[0]
        assert [line.split(",")[:2] for line in resumed.read_text().splitlines()] == [line.split(",")[:2] for line in expected.splitlines()]
    # Another job's pairs are refused, not appended to.
    other = pairs_file(tmp_path / f"other.{fmt}", shapes.split("val"), fmt)
    code, _, err = run(capsys, "score", model, other, "--output", resumed, "--format", fmt)
    assert_one_line_error(code, err, "other images")


# --- photographs: a photo model trained on a slice of Flickr8k --------------------------------


def page_of_text() -> Image.Image:
    page = Image.new("RGB", (224, 300), "white")
    draw = ImageDraw.Draw(page)
    for row, y in enumerate(range(6, 290, 12)):
        draw.text((6, y), f"{row:02d} the quick brown fox jumps over the lazy dog", fill="black")
    return page


@pytest.fixture(scope="module")
def photo_model(tmp_path_factory):
    """A photo model trained for an epoch on 200 Flickr8k training photographs (with concepts and
    a caption memory), calibrated on 40 dev photographs; and those photographs' records."""
    from captioner.data.datasets import load_dataset
    from captioner.options import TrainConfig
    from captioner.training import train

    root = tmp_path_factory.mktemp("flickr-trust")
    write_flickr_slice(root, FLICKR8K)
    data, cache = root / "Flickr8k.token.txt", root / "cache"
    config = TrainConfig(
        data=str(data), images=str(FLICKR8K / "images"), out=str(root / "run"), epochs=1, hidden_size=64, embed_dim=32,
        min_count=2, progress=False, feature_cache=str(cache),
    )  # fmt: skip
    train(config)
    model = Captioner.load(root / "run" / "model.pt")
    records = load_dataset(data, images=FLICKR8K / "images").split("val")
    features = cached_features(model.encoder, [r.path for r in records], cache_dir=cache, device=model.device)
    calibration, report = calibrate_trust(model, records, features, seed=0)
    model.trust = calibration
    return model, records, report


@needs_flickr8k
@pytest.mark.slow
def test_a_photo_model_ranks_own_references_first_and_flags_what_is_no_photograph(photo_model, tmp_path):
    from captioner.shapes import write_shapes_dataset

    model, records, report = photo_model
    own, model.trust = model.trust, None  # as trained: scored with the packaged default, and it says so
    [uncalibrated] = model.score([records[0].path], [records[0].captions[0]])
    model.trust = own
    assert 0 <= uncalibrated["score"] <= 1 and "uncalibrated" in uncalibrated["trust_note"]
    assert model.memory is not None and model.trust.score.signals == ("log_prob", "contrast", "consensus", "concepts")
    assert model.trust.confidence.signals == ("log_prob", "consensus", "concepts", "familiarity")
    held_out = report["score"]["held_out"]
    assert held_out["auc"]["score"] > 0.65 and held_out["auc_far"]["score"] > 0.7
    assert report["flagged_images"] <= 1  # of 40 dev photographs
    own = model.score([r.path for r in records], [r.captions[0] for r in records])
    other = model.score([r.path for r in records], [records[(i + 7) % len(records)].captions[1] for i in range(len(records))])
    assert np.mean([a["score"] > b["score"] for a, b in zip(own, other)]) > 0.6
    assert sum(s["unfamiliar"] for s in own) <= 1

    shapes = write_shapes_dataset(tmp_path / "shapes", num_images=12, seed=0, image_size=96).parent / "images"
    strange = {
        "noise": noise((224, 224)),
        "blank": Image.new("RGB", (224, 224), (255, 255, 255)),
        "page of text": page_of_text(),
        "shapes scene": Image.open(sorted(shapes.iterdir())[0]).convert("RGB"),
    }
    scored = model.score(list(strange.values()), ["a dog runs through the grass"] * len(strange))
    for name, record in zip(strange, scored):
        assert record["unfamiliar"] is True, (name, record["familiarity"], model.trust.threshold)
        assert record["score"] <= UNFAMILIAR_SCORE
    captions = model.caption(list(strange.values()))
    assert all(c[0]["unfamiliar"] is True and c[0]["confidence"] <= UNFAMILIAR_SCORE for c in captions)
