"""scripts/recipe_gpu.sh, the real-data recipe, run end to end on tiny stand-ins: the Flickr8k
fixture in Karpathy's format for the data, a word2vec binary written by gensim here for the
GoogleNews vectors, and a saved ResNet state_dict for the ImageNet weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from gensim.models import Word2Vec
from PIL import Image

from captioner.data.datasets import load_dataset
from captioner.data.vocab import tokenize
from captioner.metrics import caption_metrics
from captioner.models.captioner import Captioner

from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # the recipe script trains, evaluates and plots in subprocesses: a minute

FLICKR8K = Path(__file__).parent / "fixtures" / "datasets" / "flickr8k"


def test_recipe_trains_evaluates_and_plots_with_stand_in_files(tmp_path):
    dataset = load_dataset(FLICKR8K / "dataset_flickr8k.json")
    sentences = [tokenize(c) for r in dataset.records for c in r.captions]
    vectors = tmp_path / "GoogleNews-stand-in.bin"
    Word2Vec(sentences, vector_size=300, min_count=1, seed=0, workers=1).wv.save_word2vec_format(str(vectors), binary=True)
    weights = tmp_path / "resnet18-stand-in.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    out = tmp_path / "run"
    env = {
        **os.environ,
        "DATA": str(FLICKR8K / "dataset_flickr8k.json"),
        "IMAGES": str(FLICKR8K / "Flicker8k_Dataset"),
        "VECTORS": str(vectors),
        "WEIGHTS": str(weights),
        "OUT": str(out),
        "ENCODER": "resnet18",
        "IMAGE_SIZE": "64",
        "HIDDEN": "32",
        "EPOCHS": "2",
        "BATCH": "4",
        "MIN_COUNT": "1",
        "DEVICE": "cuda" if torch.cuda.is_available() else "cpu",
        "WORKERS": "0",
        "PYTHON": sys.executable,
        "CAPTIONER_CACHE": str(tmp_path / "cache"),
    }
    result = subprocess.run(["bash", "scripts/recipe_gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    model = Captioner.load(out / "model.pt")
    assert model.encoder.weights == f"file:{weights.name}"
    assert model.embedding["file"] == vectors.name and model.embedding["dim"] == 300
    # The stand-in vectors were trained on every caption, so they hold every word of the vocabulary.
    assert model.embedding["coverage_words"] == 1.0
    assert model.encoder.config.name == "resnet18" and model.decoder.config.hidden_size == 32
    report = json.loads((out / "test-report.json").read_text())
    assert report["split"] == "test" and report["images"] == 1
    results = json.loads((out / "test-captions.json").read_text())
    test = dataset.split("test")
    assert [r["image_id"] for r in results] == [r.image_id for r in test]
    # The report scores the saved captions.
    scores = caption_metrics(
        {r["image_id"]: r["caption"] for r in results}, {r.image_id: list(r.captions) for r in test},
        tokenizer=report["tokenizer"], meteor=False,
    )
    for name in ("bleu_4", "cider", "rouge_l"):
        assert report[name] == pytest.approx(scores[name], abs=1e-9), name
    with Image.open(out / "curves.png") as curves:
        assert curves.size == (1100, 750)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2

