import json
from dataclasses import replace
import math
import shutil
from pathlib import Path

import pytest
import torch

import captioner.training as training
from captioner.checkpoint import read_checkpoint
from captioner.data.datasets import load_dataset
from captioner.errors import CaptionerError
from captioner.models.captioner import Captioner
from captioner.models.decoder import AttentionDecoder
from captioner.evaluation import encode_captions, evaluate_loss
from captioner.options import TrainConfig
from captioner.training import Run, train, train_one_epoch

from tests.helpers import tiny_config


def test_run_writes_metrics_every_epoch_and_keeps_the_best(trained_run):
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ("train_loss", "train_perplexity", "val_loss", "val_perplexity", "grad_norm", "val_bleu_4", "val_cider"):
            assert isinstance(r[key], float)
        assert r["train_perplexity"] == pytest.approx(math.exp(r["train_loss"]))
        assert r["val_perplexity"] == pytest.approx(math.exp(r["val_loss"]))
    assert all(0.0 <= r["val_truthfulness"] <= 1.0 for r in rows)  # the shapes world knows its scenes
    best = max(rows, key=lambda r: r["val_cider"])
    assert read_checkpoint(trained_run / "model.pt")["metrics"]["epoch"] == best["epoch"]
    last = read_checkpoint(trained_run / "last.pt")
    assert last["training"]["epoch"] == 3 and "optimizer" in last["training"]


def test_trained_model_has_lower_validation_perplexity_than_untrained(trained_run, shapes, feature_cache):
    model = Captioner.load(trained_run / "model.pt")
    from captioner.features import cached_features

    val = shapes.split("val")
    features = cached_features(model.encoder, [r.path for r in val], cache_dir=feature_cache, device=torch.device("cpu"))
    captions = encode_captions(val, model.vocab, 30)
    torch.manual_seed(0)
    untrained = AttentionDecoder(model.decoder.config, model.decoder.embed.weight, model.vocab.pad)
    args = dict(pad=model.vocab.pad, batch_size=64, device=torch.device("cpu"))
    trained_ppl = evaluate_loss(model.decoder, features, captions, **args)["perplexity"]
    untrained_ppl = evaluate_loss(untrained, features, captions, **args)["perplexity"]
    assert trained_ppl < 0.8 * untrained_ppl
    # The validation perplexity logged for the best epoch is that of the model saved for it.
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    best_epoch = read_checkpoint(trained_run / "model.pt")["metrics"]["epoch"]
    assert trained_ppl == pytest.approx(rows[best_epoch - 1]["val_perplexity"], rel=1e-5)

def lone_run(dataset, records, features, captions, optimizer, **options) -> Run:
    """A run of one process on the CPU in float32 whose epochs step ``optimizer`` on ``records`` of
    ``dataset`` (their ``features`` and encoded ``captions``; no validation images), with ``options``
    (batch_size, clip_norm) in its config."""
    config = TrainConfig(data=str(dataset.source), out="unused", progress=False, **options)
    return replace(Run.alone(config, optimizer, features, captions), dataset=dataset, train_records=records)


def test_frozen_embedding_and_encoder_do_not_change_in_training(trained_run, shapes, feature_cache):
    model = Captioner.load(trained_run / "model.pt")
    embedding = model.decoder.embed.weight.clone()
    encoder = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    out_weight = model.decoder.out.weight.clone()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p is not model.decoder.embed.weight for p in params)
    from captioner.features import cached_features

    train_records = shapes.split("train")
    features = cached_features(model.encoder, [r.path for r in train_records], cache_dir=feature_cache, device=torch.device("cpu"))
    captions = encode_captions(train_records, model.vocab, 30)
    optimizer = torch.optim.Adam(params, lr=1e-2)
    run = lone_run(shapes, train_records, features, captions, optimizer, batch_size=16, clip_norm=5.0)
    train_one_epoch(model.decoder, features, captions, run, pad=model.vocab.pad, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.decoder.embed.weight, embedding)
    assert all(torch.equal(v, encoder[k]) for k, v in model.encoder.state_dict().items())
    assert not torch.equal(model.decoder.out.weight, out_weight)  # the rest did train


def test_gradient_norm_is_logged_before_clipping_and_clipped(trained_run, shapes, feature_cache):
    model = Captioner.load(trained_run / "model.pt")
    from captioner.features import cached_features

    records = shapes.split("train")[:8]
    features = cached_features(model.encoder, [r.path for r in records], cache_dir=feature_cache, device=torch.device("cpu"))
    params = [p for p in model.decoder.parameters() if p.requires_grad]
    before = torch.cat([p.detach().flatten().clone() for p in params])
    optimizer = torch.optim.SGD(params, lr=1.0)  # the step is minus the (clipped) gradient
    captions = encode_captions(records, model.vocab, 30)
    run = lone_run(shapes, records, features, captions, optimizer, batch_size=1000, clip_norm=1e-3)
    stats = train_one_epoch(
        model.decoder, features, captions, run, pad=model.vocab.pad, generator=torch.Generator().manual_seed(0)
    )
    step = torch.cat([p.detach().flatten() for p in params]) - before
    assert stats["grad_norm"] > 1e-3
    assert step.norm().item() == pytest.approx(1e-3, rel=1e-3)
    assert stats["clip_rate"] == 1.0  # the one step was clipped
    run = lone_run(shapes, records, features, captions, optimizer, batch_size=4, clip_norm=1e9)
    stats = train_one_epoch(
        model.decoder, features, captions, run, pad=model.vocab.pad, generator=torch.Generator().manual_seed(0)
    )
    assert stats["clip_rate"] == 0.0


@pytest.mark.slow  # three trainings: several seconds
def test_interrupted_run_resumes_to_the_same_model(tmp_path, shapes_json, feature_cache, trained_run, monkeypatch):
    out = tmp_path / "run"
    real = training.train_one_epoch
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if stopped during epoch 3
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(shapes_json, out, feature_cache))
    monkeypatch.setattr(training, "train_one_epoch", real)
    with pytest.raises(CaptionerError, match="already holds a run"):
        train(tiny_config(shapes_json, out, feature_cache))
    train(tiny_config(shapes_json, out, feature_cache, resume=True))
    resumed = read_checkpoint(out / "last.pt")
    straight = read_checkpoint(trained_run / "last.pt")
    for key, value in straight["decoder"]["state_dict"].items():
        assert torch.equal(resumed["decoder"]["state_dict"][key], value), key
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_self_critical_epochs_continue_a_finished_run(tmp_path, shapes_json, feature_cache, trained_run, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    train(tiny_config(shapes_json, out, feature_cache, resume=True, self_critical_epochs=2, self_critical_lr=1e-4))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    for row in rows[3:]:
        assert row["lr"] == 1e-4 and "train_perplexity" not in row
        assert 0.0 < row["train_reward"] and row["grad_norm"] > 0 and math.isfinite(row["val_cider"])
    trained, tuned = (read_checkpoint(run / "last.pt")["decoder"]["state_dict"] for run in (trained_run, out))
    assert any(not torch.equal(trained[key], tuned[key]) for key in trained)
    assert "epoch 5/5: self-critical, train CIDEr-D" in capsys.readouterr().err


def test_nothing_to_resume_is_a_clear_error(tmp_path, shapes_json, feature_cache):
    with pytest.raises(CaptionerError, match="nothing to resume"):
        train(tiny_config(shapes_json, tmp_path / "new", feature_cache, resume=True))


def test_bfloat16_training_runs_its_steps_in_bfloat16_and_keeps_float32_weights(tmp_path, shapes_json, feature_cache, monkeypatch):
    seen = []  # autocast's state at every training step's loss

    def recorded(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return real_loss(*args, **kwargs)

    real_loss = training.caption_loss
    monkeypatch.setattr(training, "caption_loss", recorded)
    train(tiny_config(shapes_json, tmp_path / "bf16", feature_cache, precision="bfloat16"))
    history = [json.loads(line) for line in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert seen and set(seen) == {torch.bfloat16}
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(math.isfinite(row["val_perplexity"]) for row in history)
    state = read_checkpoint(tmp_path / "bf16" / "last.pt")
    assert {t.dtype for t in state["decoder"]["state_dict"].values() if t.is_floating_point()} == {torch.float32}
    assert not state["training"]["scaler"]  # no loss scaling: bfloat16 has float32's range
    # On the CPU, auto is float32, and float16 (whose loss scaling is CUDA's) is refused before any work.
    assert training.autocast_dtype("auto", torch.device("cpu")) is None
    with pytest.raises(CaptionerError, match="float16 needs CUDA"):
        train(tiny_config(shapes_json, tmp_path / "fp16", feature_cache, precision="float16", device="cpu"))
    assert not (tmp_path / "fp16" / "metrics.jsonl").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_precision_training_on_cuda_learns_and_loads_on_cpu(tmp_path, shapes_json, feature_cache, trained_run):
    best = train(tiny_config(shapes_json, tmp_path / "gpu", feature_cache, device="cuda"))
    history = [json.loads(line) for line in (tmp_path / "gpu" / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0 for row in history)
    assert read_checkpoint(tmp_path / "gpu" / "last.pt")["training"]["scaler"]  # float16 loss scaling was on
    model = Captioner.load(tmp_path / "gpu" / "model.pt", "cpu")  # a GPU-trained model serves on a CPU
    test = load_dataset(shapes_json).split("test")
    captions = model.caption([r.path for r in test])
    assert [len(c) for c in captions] == [1] * len(test) and all(c["text"] for [c] in captions), captions
    assert best["val_perplexity"] > 1


def test_a_csv_without_a_split_column_trains_and_says_how_it_held_images_out(shapes, tmp_path, capsys):
    rows = [(r.path, c) for r in shapes.split("train") for c in r.captions[:2]]
    csv = tmp_path / "captions.csv"
    csv.write_text("image,caption\n" + "".join(f"{path},{caption}\n" for path, caption in rows))
    config = tiny_config(csv, tmp_path / "run", tmp_path / "cache", epochs=1, progress=True, val_fraction=0.2)
    train(config)
    said = capsys.readouterr().err
    images = Captioner.load(tmp_path / "run" / "model.pt").data["images"]
    assert images["val"] >= 1 and images["train"] + images["val"] == len(shapes.split("train"))
    assert f"{images['val']} of its {len(shapes.split('train'))} training images are held out for validation" in said
    assert "'split' column" in said
