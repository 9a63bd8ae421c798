"""The int8 CNN: calibrated on training images, rebuilt from a checkpoint, close to fp32."""

import io
import json
import shutil
import time

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from captioner import evaluation, metrics
from captioner.checkpoint import read_checkpoint, save_checkpoint
from captioner.cli import main
from captioner.errors import CaptionerError
from captioner.models.captioner import Captioner
from captioner.models.encoder import Encoder, EncoderConfig
from service import create_app


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    # Smooth random images (blurred noise), nearer to real pictures than white noise.
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 3, size // 4, size // 4, generator=generator)
    return F.interpolate(noise, size=size, mode="bilinear", align_corners=False)


def _random_encoder(name: str, size: int) -> Encoder:
    """Random weights, with batch norm's statistics taken from images: activations of a trained
    network's scale (a random mobilenet's otherwise fade to 1e-9, where int8 rounds all to 0)."""
    torch.manual_seed(0)
    encoder = Encoder(EncoderConfig(name=name, image_size=size))
    for module in encoder.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average over the batches below
    with torch.no_grad():
        encoder.train()
        for batch in _images(16, size, seed=0).split(8):
            encoder.forward_features(batch)
    return encoder.freeze()


# Depthwise convolutions, hardswish and squeeze-excitation lose more to int8 than a ResNet does.
@pytest.mark.parametrize(
    ("name", "cosine"),
    [("resnet18", 0.98), pytest.param("mobilenet_v3_small", 0.9, marks=pytest.mark.slow)],  # the second: seconds more
)
def test_int8_features_follow_fp32_and_run_int8_kernels(name, cosine):
    encoder = _random_encoder(name, 64)
    encoder.calibrate(_images(8, 64, seed=1).split(4))
    images = _images(4, 64, seed=2)
    with torch.inference_mode():
        fp32 = encoder.forward_features(images)
        int8 = encoder.use_int8().forward_features(images)
        again = encoder.use_int8(False).forward_features(images)
    assert torch.equal(again, fp32)  # switching back is exact
    assert not torch.equal(int8, fp32)  # the int8 path really ran
    assert F.cosine_similarity(fp32, int8).min() > cosine
    quantized = [m for m in encoder.use_int8()._int8_trunk.modules() if "quantized" in type(m).__module__]
    assert quantized, "no quantized modules in the int8 trunk"


@pytest.mark.slow  # two int8 conversions (FX tracing) of the model's CNN: seconds
def test_the_calibration_travels_in_the_checkpoint_and_rebuilds_the_same_int8_cnn(trained_run, tmp_path):
    model = Captioner.load(trained_run / "model.pt")
    model.encoder.calibrate(_images(8, 32, seed=3).split(4))
    images = _images(4, 32, seed=4)
    with torch.inference_mode():
        expected = model.encoder.use_int8().forward_features(images)
    rebuilt = Captioner.from_checkpoint(model.to_checkpoint())
    with torch.inference_mode():
        assert torch.equal(rebuilt.encoder.use_int8().forward_features(images), expected)
    assert "_int8_trunk" not in str(list(rebuilt.state_dict()))  # weights stay fp32 in checkpoints


def test_int8_needs_a_calibration_that_fits(trained_run):
    model = Captioner.load(trained_run / "model.pt")
    with pytest.raises(CaptionerError, match="no int8 calibration.*captioner calibrate"):
        model.encoder.use_int8()
    other = Encoder(EncoderConfig(name="mobilenet_v3_small", image_size=32)).freeze()
    other.calibrate([_images(2, 32, seed=5)])
    model.encoder.int8_calibration = other.int8_calibration
    with pytest.raises(CaptionerError, match="does not fit"):
        model.encoder.use_int8()


@pytest.mark.slow  # three commands in process, each loading the model and running the CNN
def test_calibrate_command_then_caption_and_evaluate_with_int8(capsys, tmp_path, trained_run, shapes_json, shapes, monkeypatch):
    # Scored without Java: the int8 CNN is what this checks, and the JVMs of the PTB tokenizer and
    # METEOR (13 s of its 15 on 2 cores) have tests of their own (test_metrics, test_cli).
    monkeypatch.setattr(evaluation, "java_available", lambda: False)
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    model_path = tmp_path / "model.pt"
    shutil.copy(trained_run / "model.pt", model_path)
    assert main(["caption", str(model_path), str(shapes.split("test")[0].path), "--cnn", "int8"]) == 1
    assert "captioner calibrate" in capsys.readouterr().err
    assert main(["calibrate", str(model_path), "--data", str(shapes_json), "--count", "8"]) == 0
    said = capsys.readouterr().out
    assert "calibrated on 8 train images" in said and "cosine similarity" in said
    assert read_checkpoint(model_path)["encoder"]["int8_calibration"]
    test = [str(r.path) for r in shapes.split("test")]
    assert main(["caption", str(model_path), *test, "--cnn", "int8"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == len(test) and all(r["captions"][0]["text"] for r in records)
    assert main(["evaluate", str(model_path), "--data", str(shapes_json), "--cnn", "int8"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == len(test)


@pytest.mark.slow  # starts a model process
def test_the_service_serves_an_int8_cnn(tmp_path, trained_run):
    model = Captioner.load(trained_run / "model.pt")
    model.encoder.calibrate([_images(8, 32, seed=6)])
    save_checkpoint(model.to_checkpoint(), tmp_path / "int8.pt")
    with pytest.raises(CaptionerError, match="CNN must be one of eager, int8"):
        create_app({"MODEL_PATH": str(tmp_path / "int8.pt"), "CNN": "fp16"})
    app = create_app({"MODEL_PATH": str(tmp_path / "int8.pt"), "CNN": "int8"})
    try:
        client = app.test_client()
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/v1/model").get_json()["cnn"] == "int8"
        image = io.BytesIO()
        Image.new("RGB", (32, 32), "red").save(image, "PNG")
        response = client.post("/v1/captions", data=image.getvalue(), content_type="image/png")
        assert response.status_code == 200 and response.get_json()["captions"][0]["text"]
    finally:
        app.extensions["captioner"].model_process.stop()
