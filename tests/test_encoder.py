import urllib.error

import pytest
import torch
import torchvision

from captioner.errors import CaptionerError
from captioner.features import cached_features
from captioner.models.encoder import Encoder, EncoderConfig
from captioner.options import BACKBONES

# The deepest ResNets take a second or more each to build with random weights: the full suite's.
BACKBONE_PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n in ("resnet101", "resnet152") else n for n in BACKBONES]


@pytest.mark.parametrize("name", BACKBONE_PARAMS)
def test_every_backbone_gives_finite_features_of_its_size(name):
    torch.manual_seed(0)
    encoder = Encoder(EncoderConfig(name=name, image_size=64)).freeze()
    with torch.inference_mode():
        features = encoder.forward_features(torch.randn(2, 3, 64, 64))
    assert features.shape == (2, encoder.feature_dim)
    assert torch.isfinite(features).all()


@pytest.mark.parametrize("name", BACKBONE_PARAMS)
def test_channels_last_gives_the_same_features(name):
    # The layout the CPU runs fp32 CNNs in (Captioner.load): the same arithmetic in another
    # order, so the features agree to float rounding, never more.
    torch.manual_seed(0)
    encoder = Encoder(EncoderConfig(name=name, image_size=64, pool_grid=2)).freeze()
    images = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        before = encoder(images)
        after = encoder.use_channels_last()(images)
    assert next(encoder.trunk().parameters()).is_contiguous(memory_format=torch.channels_last)
    # Random deep ResNets reach activations of 1e7: rounding is relative to the largest.
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()


def test_a_loaded_model_runs_channels_last_and_saves_what_it_read(trained_run, tmp_path):
    from captioner.checkpoint import content_digest, read_checkpoint, save_checkpoint
    from captioner.models.captioner import Captioner

    model = Captioner.load(trained_run / "model.pt")
    assert next(model.encoder.trunk().parameters()).is_contiguous(memory_format=torch.channels_last)
    assert model.encoder.cnn == "eager"
    # Its checkpoint is the file's, whatever the weights' layout in memory (calibrate saves so).
    save_checkpoint(model.to_checkpoint(), tmp_path / "again.pt")
    original = read_checkpoint(trained_run / "model.pt")
    again = read_checkpoint(tmp_path / "again.pt")
    for part in ("encoder", "decoder"):
        assert content_digest(again[part]["state_dict"]) == content_digest(original[part]["state_dict"])


def test_pool_grid_keeps_layout():
    encoder = Encoder(EncoderConfig(name="resnet18", image_size=64, pool_grid=2)).freeze()
    assert encoder.feature_dim == 512 * 4
    assert encoder(torch.randn(1, 3, 64, 64)).shape == (1, 2048)


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(CaptionerError, match="unknown encoder 'resnet9'.*resnet18"):
        EncoderConfig(name="resnet9")


def test_state_dict_file_loads_into_backbone(tmp_path):
    # Stands in for a downloaded ImageNet file: a full torchvision state_dict, classifier included.
    torch.manual_seed(1)
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    encoder = Encoder(EncoderConfig(name="resnet18"))
    assert encoder.load_weights(str(tmp_path / "resnet18.pth")) == "file:resnet18.pth"
    assert torch.equal(encoder.backbone.conv1.weight, reference.conv1.weight)
    assert torch.equal(encoder.backbone.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)


def test_weights_of_another_architecture_or_file_are_refused(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(CaptionerError, match="do not fit resnet34"):
        Encoder(EncoderConfig(name="resnet34")).load_weights(str(tmp_path / "r18.pth"))
    (tmp_path / "junk.pth").write_text("not a tensor file")
    with pytest.raises(CaptionerError, match="not a PyTorch state_dict"):
        Encoder(EncoderConfig(name="resnet18")).load_weights(str(tmp_path / "junk.pth"))
    with pytest.raises(CaptionerError, match="not found"):
        Encoder(EncoderConfig(name="resnet18")).load_weights(str(tmp_path / "absent.pth"))


def test_imagenet_weights_offline_say_how_to_pass_a_local_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached download to fall back on

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(CaptionerError) as error:
        Encoder(EncoderConfig(name="resnet18")).load_weights("imagenet")
    message = str(error.value)
    assert "resnet18-f37072fd.pth" in message and "--encoder-weights /path/to/" in message


def test_feature_cache_computes_each_image_once(tmp_path, shapes):
    encoder = Encoder(EncoderConfig(name="resnet18", image_size=32)).freeze()
    paths = [r.path for r in shapes.records[:6]]
    calls = []
    encoder.pool.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    device = torch.device("cpu")
    first = cached_features(encoder, paths, cache_dir=tmp_path, device=device, batch_size=4)
    assert sum(calls) == 6
    again = cached_features(encoder, paths[::-1], cache_dir=tmp_path, device=device, batch_size=4)
    assert sum(calls) == 6  # all from the cache
    assert torch.equal(again, first.flip(0))
    with torch.no_grad():
        encoder.backbone.conv1.weight.mul_(2)  # other weights: another cache entry
    cached_features(encoder, paths[:2], cache_dir=tmp_path, device=device)
    assert sum(calls) == 8


def shapes_encoder():
    from captioner.shapes.pretraining import CELL_CLASSES, COLOUR_CLASSES

    torch.manual_seed(0)
    config = EncoderConfig(
        name="mobilenet_v3_small", image_size=96, pool_grid=3, cell_classes=CELL_CLASSES,
        colour_group=CELL_CLASSES.index(COLOUR_CLASSES),
    )  # fmt: skip
    return Encoder(config).eval()


def test_the_colour_path_sees_one_pixel_at_a_time():
    # Shuffling the pixels inside each cell destroys every outline but no colour: the colour
    # readings stay, so they cannot depend on shape, and no (colour, shape) pair can be entangled.
    # (The path reads every second pixel: images of 2 x 2 blocks, shuffled block by block.)
    encoder = shapes_encoder()
    blocks = torch.randn(2, 3, 48, 48)
    cells = blocks.view(2, 3, 3, 16, 3, 16).permute(0, 1, 2, 4, 3, 5).reshape(2, 3, 3, 3, 16 * 16)
    mixed = cells[..., torch.randperm(16 * 16)].view(2, 3, 3, 3, 16, 16).permute(0, 1, 2, 4, 3, 5).reshape(2, 3, 48, 48)
    images, shuffled = (x.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2) for x in (blocks, mixed))
    start, end = len(encoder.config.cell_classes[0]), sum(encoder.config.group_sizes[:2])
    with torch.inference_mode():
        colour, colour_shuffled = (encoder.cell_logits(x)[..., start:end] for x in (images, shuffled))
    assert torch.allclose(colour, colour_shuffled, atol=1e-5)
    assert not torch.equal(shuffled, images)


def test_the_backbone_of_a_colour_path_encoder_sees_no_colour():
    # The same scene in two colours looks the same to the backbone: its view is a foreground mask.
    import random

    from captioner.shapes import Scene, ShapeObject, render_scene

    encoder = shapes_encoder()
    views = []
    for colour in ("green", "red"):
        scene = Scene((ShapeObject("triangle", colour, "large", 1, 1, 0.5, 0.5),))
        image = encoder.transform(render_scene(scene, 96, random.Random(0)))
        views.append(encoder.colour_free(image.unsqueeze(0)))
    green, red = (view[0, 0] * encoder.config.std[0] + encoder.config.mean[0] for view in views)  # masks in [0, 1]
    assert green.max() == pytest.approx(1.0) and green.min() == pytest.approx(0.0)  # a shape on a background
    assert (green == 1).sum() > 300  # a large triangle's inside (0.8 of a 32-pixel cell wide)
    # Inside and outside alike; only some antialiased edge pixels, which mix fill and background,
    # differ a little with the fill's brightness.
    assert ((green - red).abs() > 0.05).float().mean() < 0.02 and (green - red).abs().max() < 0.35


def test_batch_and_service_preprocess_a_large_photo_alike(tmp_path):
    # The service decodes with the model's input size as target (a JPEG at reduced scale);
    # batch captioning and the feature cache load files through the same preprocessing.
    import numpy as np
    from PIL import Image

    from captioner.data.images import decode_image

    rng = np.random.default_rng(0)
    photo = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 255, (1200, 1600, 3), dtype=np.uint8)).save(photo, quality=90)
    transform = Encoder(EncoderConfig(name="resnet18", image_size=64)).transform
    as_served = transform.resize(decode_image(photo.read_bytes(), target_size=64).image)
    assert torch.equal(transform.load(photo), as_served)
    assert not torch.equal(transform.resize(decode_image(photo).image), as_served)  # a full decode differs


def test_a_batch_normalised_at_once_equals_its_images_normalised_one_by_one(tmp_path):
    # Files are loaded as uint8 pixels and normalised a batch at a time (Captioner.encode_pixels);
    # a PIL image goes through the whole transform on its own (images_to_batch). The same floats.
    import numpy as np
    from PIL import Image

    from captioner.data.images import decode_image

    rng = np.random.default_rng(1)
    paths = []
    for i, size in enumerate([(50, 70), (64, 64), (300, 200)]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(paths[-1])
    transform = Encoder(EncoderConfig(name="resnet18", image_size=64)).transform
    pixels = torch.stack([transform.load(p) for p in paths])
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 3, 64, 64)
    one_by_one = torch.stack([transform(decode_image(p, target_size=64).image) for p in paths])
    assert torch.equal(transform.normalize(pixels), one_by_one)
