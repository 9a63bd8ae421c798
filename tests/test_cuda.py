"""The CUDA paths agree with the CPU: generation in every mode, the CNN (fp16 on a GPU), the int8
refusal, and the service's model process. Skipped without a CUDA device, as in CI; on a GPU machine:
``scripts/test.sh tests/test_cuda.py``."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioner.errors import CaptionerError
from captioner.models.captioner import Captioner
from captioner.options import DecodeOptions
from service import create_app

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MODES = {
    "greedy": DecodeOptions(),
    "beam": DecodeOptions(mode="beam", beam_size=3, num_captions=2),
    "sample": DecodeOptions(mode="sample", num_captions=2, seed=1, top_p=0.9),
    "explain": DecodeOptions(explain=True),
}


@pytest.fixture(scope="module")
def images(shapes):
    return [Image.open(r.path).convert("RGB") for r in shapes.split("test") + shapes.split("train")[:26]]


@pytest.mark.parametrize("mode", MODES)
def test_the_decoder_on_cuda_says_what_it_says_on_the_cpu(trained_run, images, mode):
    cpu, gpu = Captioner.load(trained_run / "model.pt", "cpu"), Captioner.load(trained_run / "model.pt", "cuda")
    features = cpu.encode(cpu.images_to_batch(images))  # the same features for both: the decoder alone
    expected = cpu.describe(cpu.generate(features, MODES[mode]))
    got = gpu.describe(gpu.generate(features.to("cuda"), MODES[mode]))
    assert [[c["text"] for c in row] for row in got] == [[c["text"] for c in row] for row in expected]
    log_probs = [c["log_prob"] for row in expected for c in row]
    assert [c["log_prob"] for row in got for c in row] == pytest.approx(log_probs, rel=1e-4, abs=1e-4)
    if mode == "explain":  # each word's attention: rows x columns of the cell grid

        def weights(described):
            return [x for row in described for c in row for w in c["words"] for line in w["attention"] for x in line]

        assert weights(got) == pytest.approx(weights(expected), abs=1e-4)


def test_the_cnn_on_cuda_reads_images_as_on_the_cpu(trained_run, images):
    cpu, gpu = Captioner.load(trained_run / "model.pt", "cpu"), Captioner.load(trained_run / "model.pt", "cuda")
    batch = cpu.images_to_batch(images)
    expected, got = cpu.encode(batch), gpu.encode(batch.to("cuda")).cpu()  # float16 on the GPU
    assert got.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(got, expected).min() > 0.999


def test_int8_on_cuda_is_refused_before_calibration_is_asked_for(trained_run):
    with pytest.raises(CaptionerError, match="CPU only"):
        Captioner.load(trained_run / "model.pt", "cuda", cnn="int8")


def test_the_service_model_process_runs_on_cuda(trained_run, shapes):
    model_path = trained_run / "model.pt"
    app = create_app({"MODEL_PATH": str(model_path), "DEVICE": "cuda", "LOG_LEVEL": "WARNING"})
    model_process = app.extensions["captioner"].model_process
    try:
        assert model_process.wait_ready(120), model_process.load_error
        client = app.test_client()
        assert client.get("/v1/model").get_json()["device"] == "cuda:0"
        uploads = [Path(r.path).read_bytes() for r in shapes.split("test")]
        # One at a time, each a batch of one: the model's own captions of each image on the GPU.
        direct = Captioner.load(model_path, "cuda")
        for upload in uploads:
            response = client.post("/v1/captions?mode=beam&beam_size=3", data=upload, content_type="image/png")
            assert response.status_code == 200, response.get_json()
            [[expected]] = direct.caption([upload], mode="beam", beam_size=3)
            assert response.get_json()["captions"][0]["text"] == expected["text"]
        # At once: batched on the GPU, every request answered.
        with ThreadPoolExecutor(len(uploads)) as pool:
            answers = list(pool.map(lambda data: client.post("/v1/captions", data=data, content_type="image/png"), uploads))
        assert [a.status_code for a in answers] == [200] * len(uploads)
        assert all(a.get_json()["captions"][0]["text"] for a in answers)
    finally:
        model_process.stop()
