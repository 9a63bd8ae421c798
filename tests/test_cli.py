import json
import subprocess
import sys

import numpy as np
import pytest
from gensim.models import KeyedVectors
from PIL import Image

from captioner.cli import main

from tests.helpers import TINY, assert_one_line_error, run


def test_caption_writes_one_json_line_per_image_and_keeps_going_past_bad_ones(capsys, tmp_path, trained_run, shapes):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for i, record in enumerate(shapes.split("test")[:3]):
        Image.open(record.path).save(folder / "sub" / f"{i}.png")
    (folder / "broken.jpg").write_text("this is not a JPEG")
    listing = tmp_path / "list.txt"
    listing.write_text("in/sub/0.png\n# a comment\n\nin/sub/2.png\n")
    code, out, err = run(capsys, "caption", trained_run / "model.pt", folder, listing, "--mode", "beam", "--num-captions", "2")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["image"].split("/")[-1] for r in records] == ["broken.jpg", "0.png", "1.png", "2.png", "0.png", "2.png"]
    assert records[0]["error"]["code"] == "unsupported_format"
    for r in records[1:]:
        assert len(r["captions"]) == 2
        assert {"text", "log_prob", "perplexity"} <= set(r["captions"][0])
    assert records[1]["captions"] == records[4]["captions"]  # same image, same beams


def test_caption_output_file_and_sampling_seed(capsys, tmp_path, trained_run, shapes):
    image = shapes.split("test")[0].path
    outputs = []
    for name in ("a.jsonl", "b.jsonl"):
        code, _, err = run(capsys, "caption", trained_run / "model.pt", image, "--mode", "sample", "--num-captions", "3",
                           "--seed", "4", "--top-k", "5", "--output", tmp_path / name)
        assert code == 0, err
        outputs.append((tmp_path / name).read_text())
    assert outputs[0] == outputs[1] and len(json.loads(outputs[0])["captions"]) == 3


def test_caption_errors(capsys, tmp_path, trained_run, shapes):
    image = shapes.split("test")[0].path
    assert_one_line_error(*run(capsys, "caption", tmp_path / "absent.pt", image)[::2], "model file not found")
    assert_one_line_error(*run(capsys, "caption", trained_run / "model.pt", tmp_path / "nope.png")[::2], "input not found")
    assert_one_line_error(*run(capsys, "caption", trained_run / "model.pt", image, "--mode", "sample", "--temperature", "0")[::2], "temperature")
    with pytest.raises(SystemExit) as exit_info:
        main(["caption", str(trained_run / "model.pt"), str(image), "--mode", "nucleus"])
    assert exit_info.value.code == 2


@pytest.mark.slow  # METEOR JVMs for the test and held-out splits
def test_evaluate_reports_metrics_and_truthfulness(capsys, tmp_path, trained_run, shapes_json, shapes):
    code, out, err = run(
        capsys, "evaluate", trained_run / "model.pt", "--data", shapes_json,
        "--output", tmp_path / "r.json", "--save-captions", tmp_path / "captions.json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert report == json.loads((tmp_path / "r.json").read_text())
    for key in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider", "perplexity", "truthfulness", "grammaticality"):
        assert isinstance(report[key], float), key
    assert report["split"] == "test" and report["images"] == 6
    assert 0 <= report["truthfulness"] <= report["grammaticality"] <= 1
    # The held-out combinations are scored apart, on their own split.
    held = report["holdout"]
    assert held["pairs"] == ["green:triangle"] and held["images"] == len(shapes.split("holdout"))
    assert 0 <= held["held_out_named"] <= 1 and isinstance(held["truthfulness"], float)
    assert "held_out_named" not in report  # no test image shows a held-out pair
    # A short table for people on standard error, one row per part.
    table = err.strip().splitlines()[-3:]
    assert table[0].split()[:2] == ["split", "images"] and "truthfulness" in table[0]
    assert table[1].split()[:2] == ["test", "6"] and table[2].split()[:2] == ["holdout", str(held["images"])]
    assert f"{report['bleu_4']:.3f}" in table[1]

    # COCO results format, which anyone can re-score with pycocoevalcap itself.
    results = json.loads((tmp_path / "captions.json").read_text())
    test = shapes.split("test")
    assert [r["image_id"] for r in results] == [r.image_id for r in test]
    assert all(set(r) == {"image_id", "caption"} and r["caption"] for r in results)
    # The truth report is that of these very captions against the test scenes.
    from captioner.evaluation import shapes_report

    truth = shapes_report({r.image_id: c["caption"] for r, c in zip(test, results)}, test)
    assert {key: report[key] for key in truth} == truth
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({r.image_id: [{"caption": c} for c in r.captions] for r in test})
    res = tokenizer.tokenize({r["image_id"]: [{"caption": r["caption"]}] for r in results})
    assert Bleu(4).compute_score(gts, res, verbose=0)[0][3] == pytest.approx(report["bleu_4"], abs=1e-6)
    assert Cider().compute_score(gts, res)[0] == pytest.approx(report["cider"], abs=1e-6)


def test_coco_results_use_integer_ids_where_coco_has_them():
    from captioner.evaluation import coco_results

    assert coco_results({"391895": "a man", "a.jpg": "a dog"}) == [
        {"image_id": 391895, "caption": "a man"},
        {"image_id": "a.jpg", "caption": "a dog"},
    ]


@pytest.mark.slow  # matplotlib's first import: seconds
def test_plot_draws_the_training_curves(capsys, tmp_path, trained_run):
    code, out, err = run(capsys, "plot", trained_run, "--output", tmp_path / "curves.png")
    assert code == 0, err
    assert out.strip() == str(tmp_path / "curves.png")
    image = np.asarray(Image.open(tmp_path / "curves.png").convert("L"), dtype=float)
    assert image.shape == (750, 1100) and image.std() > 10  # drawn, not blank
    # The picture comes from metrics.jsonl: the same numbers draw the same picture, others another.
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    pictures = []
    for folder, bump in (("same", 0), ("changed", 1)):
        run_dir = tmp_path / folder / trained_run.name  # the run's name is the title
        run_dir.mkdir(parents=True)
        changed = [{**r, "train_loss": r["train_loss"] + bump * (r["epoch"] == 2)} for r in rows]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in changed))
        assert run(capsys, "plot", run_dir)[0] == 0
        pictures.append(np.asarray(Image.open(run_dir / "curves.png").convert("L"), dtype=float))
    assert np.array_equal(pictures[0], image)
    assert (pictures[1] != image).sum() > 100


def test_plot_errors_are_one_line(capsys, tmp_path):
    assert_one_line_error(*run(capsys, "plot", tmp_path)[::2], "no metrics.jsonl")
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 2.0}\nnot json\n')
    assert_one_line_error(*run(capsys, "plot", tmp_path)[::2], "line 2")


def _train_args(data, out, cache, **extra):
    args = ["train", "--data", data, "--out", out, "--feature-cache", cache, "--epochs", "1"]
    options = {**TINY, **extra}
    options.pop("progress")
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", value]
    return args + ["--no-progress"]


def test_train_errors_are_one_line(capsys, tmp_path, shapes_json, feature_cache):
    out = tmp_path / "run"
    assert_one_line_error(*run(capsys, *_train_args(tmp_path / "absent.json", out, feature_cache))[::2], "absent.json")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"learning_rate": 0.1, "layers": [1, 2]}))
    assert_one_line_error(*run(capsys, *_train_args(config, out, feature_cache))[::2], "not a caption data set")
    assert_one_line_error(*run(capsys, *_train_args(shapes_json, out, feature_cache, encoder="resnet9"))[::2], "unknown encoder")
    vectors = tmp_path / "vectors.bin"
    kv = KeyedVectors(vector_size=8)
    kv.add_vectors(["red", "circle"], np.ones((2, 8), dtype=np.float32))
    kv.save_word2vec_format(str(vectors), binary=True)
    assert_one_line_error(
        *run(capsys, *_train_args(shapes_json, out, feature_cache, word2vec=vectors, embed_dim=300))[::2],
        "8-dimensional vectors but --embed-dim is 300",
    )


def test_synth_errors_are_one_line(capsys, tmp_path):
    assert_one_line_error(*run(capsys, "synth", tmp_path / "s", "--holdout", "mauve:blob")[::2], "mauve")


@pytest.mark.slow  # a Python process that imports torch
def test_no_traceback_reaches_the_user_of_the_real_command(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "captioner", "caption", str(tmp_path / "absent.pt"), str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr == f"captioner: error: model file not found: {tmp_path / 'absent.pt'}\n"
