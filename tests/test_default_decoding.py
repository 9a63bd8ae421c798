"""A model carries the decoding it was chosen with: every entry point starts from it, and a
request's options win."""

import json
import shutil

import pytest

from captioner.errors import CaptionerError
from captioner.models.captioner import Captioner
from captioner.options import DecodeOptions, TrainConfig, parse_decoding
from tests.helpers import run


def test_a_request_overrides_the_default_and_drops_what_its_mode_does_not_use():
    default = {"mode": "beam", "beam_size": 8, "concept_boost": 1.0}
    assert DecodeOptions.resolve(default, {}) == DecodeOptions(mode="beam", beam_size=8, concept_boost=1.0)
    assert DecodeOptions.resolve(default, {"beam_size": 4}).beam_size == 4
    greedy = DecodeOptions.resolve(default, {"mode": "greedy"})  # beam_size does not apply: dropped
    assert (greedy.mode, greedy.beam_size, greedy.concept_boost) == ("greedy", DecodeOptions().beam_size, 1.0)
    assert DecodeOptions.resolve(None, {}) == DecodeOptions()


def test_a_default_decoding_is_parsed_typed_and_checked():
    assert parse_decoding("mode=beam,beam_size=16,concept_boost=1") == {"mode": "beam", "beam_size": 16, "concept_boost": 1.0}
    assert parse_decoding(None) == parse_decoding("") == {}
    for bad, said in (("mode=fast", "unknown mode"), ("beam_size=wide", "must be a int"), ("width=3", "name=value pairs")):
        with pytest.raises(CaptionerError, match=said):
            parse_decoding(bad)
    with pytest.raises(CaptionerError, match="beam_size must be between"):
        TrainConfig(data="d", out="o", decoding="mode=beam,beam_size=99")


def test_the_default_is_read_from_the_checkpoint_and_a_request_wins(trained_run, shapes, tmp_path, capsys):
    path = tmp_path / "model.pt"
    shutil.copy(trained_run / "model.pt", path)
    image = shapes.split("val")[0].path
    code, out, _ = run(capsys, "decoding", path, "--set", "mode=beam,beam_size=4")
    assert code == 0 and json.loads(out) == {"mode": "beam", "beam_size": 4}
    model = Captioner.load(path)
    assert model.default_decoding == {"mode": "beam", "beam_size": 4}
    assert len(model.caption([image], num_captions=3)[0]) == 3  # beam by default: three captions
    with pytest.raises(CaptionerError, match="at most 4 captions"):
        model.caption([image], num_captions=5)
    greedy = model.caption([image], mode="greedy")[0]
    assert greedy == Captioner.load(trained_run / "model.pt").caption([image])[0]  # as the plain model's default
    code, out, _ = run(capsys, "caption", path, image, "--num-captions", "2")
    assert code == 0 and len(json.loads(out.splitlines()[0])["captions"]) == 2  # the command line starts from it too
    code, out, _ = run(capsys, "decoding", path, "--set", "")
    assert code == 0 and json.loads(out) == {}
    assert Captioner.load(path).default_decoding == {}
