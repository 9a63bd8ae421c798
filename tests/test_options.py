import argparse
from dataclasses import MISSING, fields

import pytest

from captioner.cli import COMMANDS, build_parser
from captioner.errors import CaptionerError
from captioner.options import DecodeOptions, TrainConfig, add_dataclass_arguments, field_types, from_args


def test_every_option_of_every_command_has_help():
    for name, (_, _, classes) in COMMANDS.items():
        for cls in classes:
            for f in fields(cls):
                assert f.metadata.get("help"), f"{name}: {cls.__name__}.{f.name} has no help"


def test_train_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for f in fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in text
        assert " ".join(f.metadata["help"].split()) in text
        if f.default not in (MISSING, None):
            assert f"{' '.join(f.metadata['help'].split())} (default: {f.default})" in text


def test_parsed_defaults_are_the_dataclass_defaults():
    args = build_parser().parse_args(["caption", "model.pt", "a.png"])
    assert from_args(DecodeOptions, args) == DecodeOptions()
    args = build_parser().parse_args(["train", "--data", "d.json", "--out", "run"])
    assert from_args(TrainConfig, args) == TrainConfig(data="d.json", out="run")


def test_types_booleans_choices_and_required_come_from_the_fields():
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, TrainConfig)
    config = from_args(TrainConfig, parser.parse_args(["--data", "d", "--out", "o", "--lr", "0.5", "--no-progress", "--image-size", "32"]))
    assert (config.lr, config.progress, config.image_size, config.encoder) == (0.5, False, 32, None)
    for bad in (["--data", "d"], ["--data", "d", "--out", "o", "--epochs", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    decoding = argparse.ArgumentParser()
    add_dataclass_arguments(decoding, DecodeOptions)
    assert from_args(DecodeOptions, decoding.parse_args(["--mode", "sample", "--seed", "3"])) == DecodeOptions(mode="sample", seed=3)
    with pytest.raises(SystemExit):
        decoding.parse_args(["--mode", "nucleus"])
    with pytest.raises(CaptionerError, match="temperature"):
        from_args(DecodeOptions, decoding.parse_args(["--temperature", "0"]))


def test_field_types_unwrap_optional_and_list():
    assert field_types(DecodeOptions) == {
        "mode": str, "num_captions": int, "temperature": float, "top_k": int,
        "top_p": float, "beam_size": int, "max_length": int, "seed": int, "rerank": int, "explain": bool,
        "concept_boost": float,
    }


def test_the_photo_preset_sets_its_options_unless_they_are_given():
    from captioner.cli import main  # noqa: F401  (the parser the preset rule reads)
    from captioner.cli import given_options
    from captioner.options import PRESETS

    config = TrainConfig(data="d", out="o", preset="photos")
    assert {name: getattr(config, name) for name in PRESETS["photos"]} == PRESETS["photos"]
    argv = ["train", "--data", "d", "--out", "o", "--preset", "photos", "--epochs", "12", "--lr", "1e-3"]
    assert given_options(argv, "train") == {"data", "out", "preset", "epochs", "lr"}
    args = build_parser().parse_args(argv)
    assert (args.epochs, args.lr) == (12, 1e-3)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data", "d", "--out", "o", "--preset", "nope"])
