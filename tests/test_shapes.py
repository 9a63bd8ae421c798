"""Tests for the synthetic shapes world: scenes, rendering, captions, checker, data set files."""

import json
import random
from pathlib import Path

import numpy as np
import pytest

from captioner.errors import CaptionerError
from captioner.shapes import (
    COLOURS,
    GRID,
    SHAPES,
    SIZES,
    Scene,
    check_caption,
    describe_scene,
    grammar,
    parse_holdout,
    render,
    render_scene,
    sample_scene,
    world,
    write_shapes_dataset,
)

from tests.helpers import SCENE, scene_object


def _scenes(count, seed=0, **kwargs):
    rng = random.Random(seed)
    return [sample_scene(rng, **kwargs) for _ in range(count)]


@pytest.mark.parametrize("max_objects", [3, 7])
def test_sampled_scenes_respect_the_world_rules(max_objects):
    counts = set()
    for scene in _scenes(500, max_objects=max_objects):
        objects = scene.objects
        counts.add(len(objects))
        assert len({(o.row, o.col) for o in objects}) == len(objects)
        assert len({(o.colour, o.shape) for o in objects}) == len(objects)
        for o in objects:
            half = world.EXTENT[o.size] / GRID / 2
            assert o.col / GRID <= o.x - half and o.x + half <= (o.col + 1) / GRID
            assert o.row / GRID <= o.y - half and o.y + half <= (o.row + 1) / GRID
        assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
    assert counts == set(range(1, max_objects + 1))


def test_bad_object_counts_are_refused():
    for bad in (0, GRID * GRID + 1):
        with pytest.raises(CaptionerError, match="a scene holds 1 to 9 objects"):
            sample_scene(random.Random(0), max_objects=bad)


def test_every_reference_caption_is_grammatical_and_true():
    rng = random.Random(1)
    without_size = 0
    for scene in _scenes(400, seed=1):
        captions = describe_scene(scene, rng)
        assert len(set(captions)) == 5
        for caption in captions:
            assert caption == caption.lower() and caption == " ".join(caption.split())
            assert caption.replace(" ", "").isalpha()
            check = check_caption(caption, scene)
            assert check.grammatical and check.truthful, (caption, check)
            # one fact per object plus one relation per pair described
            assert check.facts == 2 * len(scene.objects) - 1
            assert check.false_facts == ()
            assert all(ok for _, ok in check.attributes)
            assert set(check.mentions) == {(o.colour, o.shape) for o in scene.objects}
            without_size += not any(w in caption.split() for w in grammar._SIZE_OF_WORD)
    assert 0.1 < without_size / 2000 < 0.3


def test_describe_scene_reaches_its_limit_on_a_one_object_scene():
    scene = Scene((scene_object("circle", "red", "large", 1, 1),))
    assert len(set(describe_scene(scene, random.Random(0), n=8))) == 8
    with pytest.raises(CaptionerError, match="1 to 8"):
        describe_scene(scene, random.Random(0), n=9)


@pytest.mark.parametrize(
    "caption",
    [
        "a red circle",
        "there is a big red circle",
        "a large red circle in the picture",
        "A  Red Circle ",
        "a red circle left of a blue square",
        "a red circle is to the left of a small blue square",
        "there is a little blue square right of a red circle",
        "a blue square to the right of a red circle",
        "a green star below a red circle",
        "a green star is under a little blue square",
        "a red circle above a green star",
        "a red circle left of a blue square and a green star is below the red circle",
        "a red circle left of a blue square and the blue square is above a big green star",
        "a red circle left of a blue square and there is a green star under the blue square",
    ],
)
def test_true_paraphrases_pass(caption):
    check = check_caption(caption, SCENE)
    assert check.grammatical and check.truthful, check


def test_wrong_colour_is_a_false_fact_aligned_to_the_right_object():
    check = check_caption("a large blue circle", SCENE)
    assert check.grammatical and not check.truthful
    assert check.false_facts == ("no large blue circle",)
    assert check.attributes == (("shape", True), ("colour", False), ("size", True))
    assert check.mentions == (("blue", "circle"),)


def test_wrong_size_and_absent_shape():
    check = check_caption("a small red circle left of a yellow triangle", SCENE)
    assert check.facts == 3
    assert check.false_facts == (
        "no small red circle",
        "no yellow triangle",
        "small red circle is not left of yellow triangle",
    )
    # no object shares the yellow triangle's shape or colour
    assert check.attributes == (
        ("shape", True),
        ("colour", True),
        ("size", False),
        ("shape", False),
        ("colour", False),
    )


def test_wrong_relation():
    check = check_caption("a red circle is right of a blue square", SCENE)
    assert check.grammatical and not check.truthful
    assert check.facts == 3
    assert check.false_facts == ("red circle is not right of blue square",)
    # the relation needs two distinct objects
    assert check_caption("a red circle left of a red circle", SCENE).false_facts == (
        "red circle is not left of red circle",
    )


@pytest.mark.parametrize(
    ("caption", "truthful"),
    [
        ("a red circle above a blue square", True),
        ("a blue square left of a red circle", False),  # same column
        ("a blue square right of a red circle", False),
        ("a blue square below a green star", False),  # same row
        ("a green star above a blue square", False),
        ("a green star is right of a blue square", True),
        ("a green star under a red circle", True),
    ],
)
def test_relations_are_read_from_cells(caption, truthful):
    scene = Scene(
        (
            scene_object("circle", "red", "small", 0, 1),
            scene_object("square", "blue", "large", 2, 1),
            scene_object("star", "green", "large", 2, 2),
        )
    )
    assert check_caption(caption, scene).truthful == truthful


def test_re_mention_with_the():
    scene = Scene(
        (
            scene_object("circle", "red", "large", 1, 0),
            scene_object("square", "blue", "small", 1, 2),
            scene_object("star", "green", "large", 0, 2),
        )
    )
    good = "a red circle is left of a blue square and a green star is above the blue square"
    check = check_caption(good, scene)
    assert check.truthful and check.facts == 5
    assert check.mentions == (("red", "circle"), ("blue", "square"), ("green", "star"))
    wrong = check_caption(good.replace("above the", "below the"), scene)
    assert wrong.false_facts == ("green star is not below blue square",)
    # the re-mention inherits its antecedent's size, so a false size spreads to the relation
    inherited = check_caption(good.replace("a blue square", "a large blue square"), scene)
    assert inherited.false_facts == (
        "no large blue square",
        "red circle is not left of large blue square",
        "green star is not above large blue square",
    )
    for bad in (
        "the red circle is left of a blue square",  # nothing to re-mention yet
        "a red circle is left of a blue square and a green star is above the yellow star",
        "a red circle is left of a blue square and there is the blue square below a green star",
        "a red circle is left of a blue square and a green star is above the large blue square",
    ):
        assert not check_caption(bad, scene).grammatical, bad


@pytest.mark.parametrize(
    "caption",
    [
        "",
        "   ",
        "a red circle is left of a",
        "a red circle is left of",
        "a red circle is",
        "a red",
        "a red circle and",
        "a red circle and a blue square",
        "a red circle in the picture and a red circle left of a blue square",
        "a red circle left of a blue square and a green star",
        "a circle red",
        "red circle",
        "a big large red circle",
        "there is a red circle in the picture",
        "a red circle, left of a blue square",
        "a red circle left of a blue square <end>",
        "colorless green ideas sleep furiously",
        "a a a a a",
    ],
)
def test_ungrammatical_captions_are_never_true(caption):
    check = check_caption(caption, SCENE)
    assert not check.grammatical and not check.truthful
    assert check.facts == 0 and check.attributes == ()


def test_mentions_are_found_even_in_broken_captions():
    assert check_caption("a green triangle left of a", SCENE).mentions == (("green", "triangle"),)


def test_checker_never_raises_on_noise():
    rng = random.Random(2)
    vocabulary = ["a", "the", "is", "there", "and", "in", "picture", "of", "to", "left", "above"]
    vocabulary += [*COLOURS, *SHAPES, *SIZES]
    for _ in range(2000):
        caption = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(0, 12)))
        check = check_caption(caption, SCENE)
        assert check.grammatical or not check.truthful
    for scene in _scenes(50, seed=3):
        words = describe_scene(scene, rng, n=1)[0].split()
        for end in range(len(words) + 1):
            check = check_caption(" ".join(words[:end]), scene)
            assert check.grammatical or not check.truthful
        assert check.grammatical and check.truthful  # the whole caption


def test_parse_holdout():
    assert parse_holdout(["green:triangle", "Red:Star"]) == {("green", "triangle"), ("red", "star")}
    assert parse_holdout([]) == frozenset()
    for bad in ("green", "pink:circle", "green:hexagon", "green:triangle:x"):
        with pytest.raises(CaptionerError, match="cyan.*diamond"):
            parse_holdout([bad])


def test_holdout_sampling():
    holdout = frozenset({("green", "triangle"), ("red", "star")})
    for scene in _scenes(300, holdout=holdout):
        assert not {(o.colour, o.shape) for o in scene.objects} & holdout
    for scene in _scenes(300, holdout=holdout, require_holdout=True):
        assert {(o.colour, o.shape) for o in scene.objects} & holdout
    with pytest.raises(CaptionerError, match="no pairs are held out"):
        sample_scene(random.Random(0), require_holdout=True)


def test_rendered_objects_are_visible_in_their_colour():
    rng = random.Random(4)
    for scene in _scenes(30, seed=4):
        image = render_scene(scene, 64, rng)
        assert image.size == (64, 64) and image.mode == "RGB"
        pixels = np.asarray(image, dtype=int)
        for o in scene.objects:
            centre = pixels[int(o.y * 64), int(o.x * 64)]
            assert np.abs(centre - render._RGB[o.colour]).max() <= render._COLOUR_JITTER + 1, (o, centre)
        occupied = {(o.row, o.col) for o in scene.objects}
        cell = 64 // GRID
        for row in range(GRID):
            for col in range(GRID):
                if (row, col) not in occupied:
                    assert pixels[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell].mean() < 50
    with pytest.raises(CaptionerError, match="at least 32"):
        render_scene(SCENE, 16, rng)


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_is_left_right_symmetric(shape):
    # CNN pretraining takes a mirrored image for a new scene: true only for symmetric shapes.
    outline = np.array(render._outline(shape, 10.0, 10.0, 4.0))
    mirrored = outline * [-1, 1] + [20, 0]
    by_position = lambda points: points[np.lexsort(points.round(6).T)]  # noqa: E731
    assert np.allclose(by_position(outline), by_position(mirrored), atol=1e-6)


def test_scene_from_dict_rejects_malformed_input():
    good = SCENE.to_dict()
    assert Scene.from_dict(good) == SCENE
    broken = [
        None,
        {},
        {"objects": []},
        {"objects": [{**good["objects"][0], "shape": "hexagon"}]},
        {"objects": [{**good["objects"][0], "row": "0"}]},
        {"objects": [{**good["objects"][0], "x": 0.9}]},
        {"objects": [good["objects"][0], {**good["objects"][1], "row": 0, "col": 0}]},
        {"objects": [good["objects"][0], {**good["objects"][0], "row": 1, "y": 0.5}]},
    ]
    for d in broken:
        with pytest.raises(CaptionerError, match="malformed scene"):
            Scene.from_dict(d)


def _write(out_dir, **kwargs):
    return write_shapes_dataset(out_dir, **{"num_images": 30, "image_size": 32, **kwargs})


def _files(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_dataset_json_has_karpathy_structure(tmp_path):
    path = _write(tmp_path, holdout=["green:triangle"], captions_per_image=3)
    assert path == tmp_path / "dataset.json"
    data = json.loads(path.read_text())
    assert data["dataset"] == "shapes"
    assert data["shapes_world"] == {
        "version": 1,
        "seed": 0,
        "num_images": 30,
        "image_size": 32,
        "holdout": ["green:triangle"],
        "captions_per_image": 3,
        "shapes": list(SHAPES),
        "colours": list(COLOURS),
        "sizes": list(SIZES),
        "grid": GRID,
    }
    images = data["images"]
    assert [i["split"] for i in images] == ["train"] * 24 + ["val"] * 3 + ["test"] * 3 + ["holdout"] * 20
    sentids = []
    for imgid, image in enumerate(images):
        assert image["imgid"] == imgid and image["filepath"] == "images"
        assert image["filename"] == f"{imgid:06d}.png" and (tmp_path / "images" / image["filename"]).is_file()
        assert image["sentids"] == [s["sentid"] for s in image["sentences"]]
        scene = Scene.from_dict(image["scene"])
        for sentence in image["sentences"]:
            assert sentence["imgid"] == imgid and sentence["tokens"] == sentence["raw"].split()
            assert check_caption(sentence["raw"], scene).truthful
        sentids += image["sentids"]
    assert sentids == list(range(50 * 3))
    assert not list(tmp_path.glob("*.tmp"))


def test_dataset_holdout_split(tmp_path):
    data = json.loads(_write(tmp_path, num_images=200, holdout=["green:triangle", "red:star"]).read_text())
    held = {("green", "triangle"), ("red", "star")}
    splits = {"train": 0, "val": 0, "test": 0, "holdout": 0}
    for image in data["images"]:
        pairs = {(o["colour"], o["shape"]) for o in image["scene"]["objects"]}
        assert bool(pairs & held) == (image["split"] == "holdout")
        splits[image["split"]] += 1
    assert splits == {"train": 160, "val": 20, "test": 20, "holdout": 20}


def test_dataset_is_deterministic(tmp_path):
    first = _files(_write(tmp_path / "a", holdout=["red:star"]).parent)
    assert first == _files(_write(tmp_path / "b", holdout=["red:star"]).parent)
    other = _files(_write(tmp_path / "c", holdout=["red:star"], seed=1).parent)
    assert first.keys() == other.keys()
    for name in (Path("dataset.json"), Path("images/000000.png")):
        assert first[name] != other[name]


def test_rerun_is_idempotent_and_conflicts_are_refused(tmp_path):
    path = _write(tmp_path)
    image = tmp_path / "images" / "000000.png"
    image.unlink()  # a regeneration would bring it back
    assert _write(tmp_path) == path
    assert not image.exists()
    with pytest.raises(CaptionerError, match="another directory"):
        _write(tmp_path, seed=1)
    path.write_text("{broken")
    with pytest.raises(CaptionerError, match="another directory"):
        _write(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_images": 9}, "at least 10 images"),
        ({"image_size": 16}, "at least 32"),
        ({"captions_per_image": 0}, "1 to 8"),
        ({"holdout": ["green"]}, "bad held-out pair"),
    ],
)
def test_dataset_argument_errors(tmp_path, kwargs, message):
    with pytest.raises(CaptionerError, match=message):
        _write(tmp_path, **kwargs)
    assert not (tmp_path / "dataset.json").exists()
