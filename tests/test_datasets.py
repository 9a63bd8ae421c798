"""Tests for captioner.data.datasets: every published layout, detection and the error messages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from captioner.data.datasets import Dataset, ImageRecord, detect_format, load_dataset
from captioner.errors import CaptionerError

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"

# What the hand-written Flickr8k fixtures say, image by image.
FLICKR8K = {
    "9000000001_00000000a1.jpg": (
        "A child in a pink dress is climbing up a set of stairs in an entry way .",
        "A girl going into a wooden building .",
    ),
    "9000000002_00000000a2.jpg": (
        "A black dog and a spotted dog are fighting",
        "A black dog and a white dog with brown spots are staring at each other in the street .",
    ),
    "9000000003_00000000a3.jpg": (
        "A little girl, covered in paint, sits in front of a painted rainbow .",
        "A little girl is sitting in front of a large painted rainbow .",
    ),
    "9000000004_00000000a4.jpg": (
        "A man lays on a bench while his dog sits by him .",
        "A man lays on the bench to which a white dog is also tied .",
    ),
    "9000000005_00000000a5.jpg": (
        "A man in an orange hat starring at something .",
        "A man wears an orange hat and glasses .",
    ),
}
FLICKR30K = {
    "9100000001.jpg": (
        "Two young guys with shaggy hair look at their hands while hanging out in the yard .",
        "Two young , White males are outside near many bushes .",
    ),
    "9100000002.jpg": (
        "Several men in hard hats are operating a giant pulley system .",
        "Workers look down from up above on a piece of equipment .",
    ),
    "9100000003.jpg": (
        "A child in a pink dress is climbing up a set of stairs in an entry way .",
        "A little girl in a pink dress going into a wooden cabin .",
    ),
}
COCO = {
    "42": ("A dog sitting on a bench next to a bicycle.", "A brown dog rests near a parked bike."),
    "73": ("A plate of food with broccoli and rice.", "Some rice and vegetables on a white plate."),
}

TOKEN_FILE = FIXTURES / "flickr8k" / "Flickr8k.token.txt"
KARPATHY_FLICKR8K = FIXTURES / "flickr8k" / "dataset_flickr8k.json"
KAGGLE_CAPTIONS = FIXTURES / "kaggle_flickr8k" / "captions.txt"
TOKEN_FILE_30K = FIXTURES / "flickr30k" / "results_20130124.token"
KAGGLE_RESULTS = FIXTURES / "kaggle_flickr30k" / "flickr30k_images" / "results.csv"
COCO_CAPTIONS = FIXTURES / "coco" / "annotations" / "captions_val2014.json"
KARPATHY_COCO = FIXTURES / "coco" / "dataset_coco.json"
SHAPES = FIXTURES / "shapes" / "dataset.json"


def table(dataset: Dataset) -> list[tuple[str, tuple[str, ...], str]]:
    return [(r.image_id, r.captions, r.split) for r in dataset.records]


def expected(captions: dict[str, tuple[str, ...]], splits: dict[str, str] | str) -> list:
    return [(i, c, splits if isinstance(splits, str) else splits[i]) for i, c in captions.items()]


def error(path, **kwargs) -> str:
    with pytest.raises(CaptionerError) as info:
        load_dataset(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def write(tmp_path: Path, name: str, content: str) -> Path:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return path


# --- each layout -------------------------------------------------------------------------


def test_flickr8k_token_file_uses_split_lists_and_misspelt_image_folder():
    dataset = load_dataset(TOKEN_FILE)
    splits = {
        "9000000001_00000000a1.jpg": "train",
        "9000000002_00000000a2.jpg": "train",
        "9000000003_00000000a3.jpg": "val",  # from Flickr_8k.devImages.txt
        "9000000004_00000000a4.jpg": "test",
        "9000000005_00000000a5.jpg": "unassigned",  # in no list
    }
    assert table(dataset) == expected(FLICKR8K, splits)
    assert (dataset.format, dataset.name, dataset.missing, dataset.meta) == ("flickr", "flickr8k", (), {})
    assert dataset.source == TOKEN_FILE.resolve()
    first = dataset.records[0]
    assert first.path == (FIXTURES / "flickr8k" / "Flicker8k_Dataset" / "9000000001_00000000a1.jpg").resolve()
    assert first.path.is_absolute() and first.scene is None


def test_karpathy_flickr8k_matches_token_file_with_restval_as_train():
    dataset = load_dataset(KARPATHY_FLICKR8K)
    token = load_dataset(TOKEN_FILE)
    assert (dataset.format, dataset.name, dataset.meta) == ("karpathy", "flickr8k", {})
    assert [r.captions for r in dataset.records] == [r.captions for r in token.records]
    assert [r.path for r in dataset.records] == [r.path for r in token.records]  # found Flicker8k_Dataset/
    assert dataset.records[-1].split == "train"  # "restval" in the file
    assert [r.split for r in dataset.records[:4]] == ["train", "train", "val", "test"]


def test_kaggle_flickr8k_captions_txt_groups_rows_and_unquotes_commas():
    dataset = load_dataset(KAGGLE_CAPTIONS)
    assert table(dataset) == expected(FLICKR8K, "train")
    assert (dataset.format, dataset.name) == ("csv", "captions")
    assert dataset.records[0].path.parent == (FIXTURES / "kaggle_flickr8k" / "Images").resolve()


def test_flickr30k_token_file_and_kaggle_pipe_csv_give_the_same_records():
    token = load_dataset(TOKEN_FILE_30K)
    kaggle = load_dataset(KAGGLE_RESULTS)
    assert table(token) == table(kaggle) == expected(FLICKR30K, "train")
    assert (token.format, kaggle.format) == ("flickr", "csv")
    # Kaggle nests the images: flickr30k_images/results.csv beside flickr30k_images/flickr30k_images/.
    assert kaggle.records[0].path == (KAGGLE_RESULTS.parent / "flickr30k_images" / "9100000001.jpg").resolve()
    assert token.records[0].path.parent.name == "flickr30k-images"


def test_coco_captions_json_groups_annotations_and_takes_split_from_file_name():
    dataset = load_dataset(COCO_CAPTIONS)
    assert table(dataset) == expected(COCO, "val")  # image 74 has no caption and is left out
    assert (dataset.format, dataset.name) == ("coco", "captions_val2014")
    assert dataset.meta["info"]["year"] == 2014 and "licenses" not in dataset.meta
    # annotations/ sits beside val2014/, as in the COCO download.
    assert dataset.records[0].path == (FIXTURES / "coco" / "val2014" / "COCO_val2014_000000000042.jpg").resolve()


def test_coco_captions_split_and_images_arguments_override(tmp_path):
    shutil.copytree(FIXTURES / "coco" / "val2014", tmp_path / "pictures")
    dataset = load_dataset(COCO_CAPTIONS, split="test", images=tmp_path / "pictures")
    assert [r.split for r in dataset.records] == ["test", "test"]
    assert dataset.records[1].path == tmp_path / "pictures" / "COCO_val2014_000000000073.jpg"
    renamed = write(tmp_path, "captions.json", COCO_CAPTIONS.read_text())
    assert {r.split for r in load_dataset(renamed, images=tmp_path / "pictures").records} == {"train"}


def test_karpathy_coco_uses_cocoid_filepath_and_restval():
    dataset = load_dataset(KARPATHY_COCO)
    assert table(dataset) == expected(COCO, {"42": "val", "73": "train"})  # 74 has no sentences
    assert dataset.name == "coco"
    assert dataset.records[0].path == (FIXTURES / "coco" / "val2014" / "COCO_val2014_000000000042.jpg").resolve()


def test_karpathy_shapes_keeps_scene_meta_and_falls_back_to_tokens():
    dataset = load_dataset(SHAPES)
    assert table(dataset) == [
        ("000000.png", ("a blue square", "there is a blue square"), "train"),
        ("000001.png", ("a green triangle left of a red square",), "val"),  # no "raw": tokens joined
        ("000002.png", ("a red circle",), "holdout"),
    ]
    assert dataset.name == "shapes"
    assert dataset.meta == {"shapes_world": json.loads(SHAPES.read_text())["shapes_world"]}
    assert dataset.records[2].scene["objects"][0]["shape"] == "circle"
    assert dataset.records[0].path == (FIXTURES / "shapes" / "images" / "000000.png").resolve()


def test_csv_with_other_column_names_tabs_and_a_split_column(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes((FIXTURES / "shapes" / "images" / "000000.png").read_bytes())
    path = write(
        tmp_path,
        "refs.tsv",
        "file_name\ttext\tsplit\na.png\tone\trestval\nb.png\ttwo\tholdout\na.png\tthree\t\n\nc.png\tfour\t\n",
    )
    assert detect_format(path) == "csv"
    assert table(load_dataset(path)) == [
        ("a.png", ("one", "three"), "train"),
        ("b.png", ("two",), "holdout"),
        ("c.png", ("four",), "train"),
    ]
    assert load_dataset(path, split="val").split("val")[0].image_id == "c.png"


def test_pipe_csv_with_a_quoted_caption_after_the_space(tmp_path):
    (tmp_path / "a.jpg").write_bytes((FIXTURES / "coco" / "val2014" / "COCO_val2014_000000000042.jpg").read_bytes())
    path = write(tmp_path, "results.csv", 'image_name| comment_number| comment\na.jpg| 0| "A sign reads | stop | ."\n')
    assert table(load_dataset(path)) == [("a.jpg", ("A sign reads | stop | .",), "train")]


def test_token_file_without_split_lists_uses_train_or_the_split_argument():
    assert {r.split for r in load_dataset(TOKEN_FILE_30K).records} == {"train"}
    assert {r.split for r in load_dataset(TOKEN_FILE_30K, split="test").records} == {"test"}


# --- detection and forced formats ----------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "fmt"),
    [
        (KARPATHY_FLICKR8K, "karpathy"),
        (KARPATHY_COCO, "karpathy"),
        (SHAPES, "karpathy"),
        (COCO_CAPTIONS, "coco"),
        (TOKEN_FILE, "flickr"),
        (TOKEN_FILE_30K, "flickr"),
        (KAGGLE_CAPTIONS, "csv"),  # a .txt file, told apart by content
        (KAGGLE_RESULTS, "csv"),
    ],
)
def test_detect_format(path, fmt):
    assert detect_format(path) == fmt
    assert load_dataset(path, format=fmt).format == fmt


@pytest.mark.parametrize(
    ("path", "fmt", "says"),
    [
        (COCO_CAPTIONS, "karpathy", "is not Karpathy split JSON: images[0] has no 'sentences' list"),
        (KARPATHY_COCO, "coco", "is not COCO captions JSON: no top-level 'annotations' list"),
        (TOKEN_FILE, "coco", "is not valid JSON"),
        (KARPATHY_COCO, "flickr", "line 1: expected 'name.jpg#0<TAB>caption'"),
        (TOKEN_FILE, "csv", "has no image column: expected a header naming one of image, image_name"),
    ],
)
def test_forcing_the_wrong_format_says_what_is_missing(path, fmt, says):
    message = error(path, format=fmt)
    assert says in message
    assert message.startswith(str(path))


# --- malformed files -------------------------------------------------------------------------


NOT_A_DATASET = (
    "is not a caption data set: expected Karpathy split JSON (images[].sentences), COCO captions JSON "
    "(images[] + annotations[]), a Flickr token file (name.jpg#0<TAB>caption) or a CSV with image and caption columns"
)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ('{"images": [', "data is not valid JSON: Expecting value (line 1, column 13)"),
        ("[1, 2, 3]", f"data {NOT_A_DATASET} (found a JSON list)"),
        ('{"lr": 0.001, "epochs": 10}', f"data {NOT_A_DATASET} (found a JSON object with keys 'lr', 'epochs')"),
        ('{"images": [{"id": 1, "file_name": "a.jpg"}]}', "(found a JSON object with keys 'images')"),
        ("just some notes\n", f"data {NOT_A_DATASET} (found first line 'just some notes')"),
        ("", "data is empty"),
        (" \n\n", "data is empty"),
    ],
)
def test_malformed_files(tmp_path, content, says):
    path = write(tmp_path, "data", content)
    assert says in error(path)
    with pytest.raises(CaptionerError, match="data is|not a caption data set"):
        detect_format(path)


def test_token_line_without_tab_names_its_line_number(tmp_path):
    path = write(tmp_path, "Flickr8k.token.txt", "a.jpg#0\tA dog .\n\na.jpg#1 A cat .\n")
    assert error(path) == f"{path} line 3: expected 'name.jpg#0<TAB>caption', got 'a.jpg#1 A cat .'"


def test_csv_without_caption_column(tmp_path):
    path = write(tmp_path, "labels.csv", "image,label\na.jpg,dog\n")
    assert "is not a caption data set" in error(path)
    message = error(path, format="csv")
    assert message == (
        f"{path} has no caption column: expected a header naming one of caption, comment, caption_text, "
        "text, sentence (header: 'image,label')"
    )


def test_csv_row_with_a_missing_field_names_its_line(tmp_path):
    # The shape of the known bad row in Kaggle's Flickr30k results.csv.
    path = write(tmp_path, "results.csv", "image_name| comment_number| comment\na.jpg| 0| A dog .\na.jpg| 4 A cat .\n")
    assert error(path) == f"{path} line 3 has 2 fields but the header has 3 (quote captions that contain '|')"


def test_coco_annotation_for_an_unlisted_image(tmp_path):
    data = {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 2, "id": 5, "caption": "x"}]}
    path = write(tmp_path, "captions.json", json.dumps(data))
    assert "annotations[0] refers to image_id 2, which images[] does not list" in error(path)


def test_missing_file_folder_and_unknown_format(tmp_path):
    assert error(tmp_path / "nope.json") == f"data-set file {tmp_path / 'nope.json'} does not exist"
    assert "is a folder" in error(tmp_path)
    assert error(KARPATHY_COCO, format="yaml") == (
        "unknown data-set format 'yaml': expected auto, karpathy, coco, flickr, csv"
    )
    assert "not UTF-8 text" in error(FIXTURES / "shapes" / "images" / "000000.png")
    assert error(KARPATHY_COCO, images=tmp_path / "pics") == f"image folder {tmp_path / 'pics'} does not exist"


def test_images_without_captions_are_dropped_but_all_empty_is_an_error(tmp_path):
    data = {"images": [{"filename": "a.jpg", "split": "train", "sentences": []}] * 2, "dataset": "x"}
    path = write(tmp_path, "dataset.json", json.dumps(data))
    assert error(path) == f"{path} lists 2 images but none has a caption"
    assert error(write(tmp_path, "empty.json", '{"images": []}')).endswith("empty.json lists no images")


# --- missing images ------------------------------------------------------------------------------


def test_missing_images_fail_unless_skipped(tmp_path):
    shutil.copytree(FIXTURES / "flickr8k", tmp_path / "flickr8k")
    images = tmp_path / "flickr8k" / "Flicker8k_Dataset"
    for name in ("9000000002_00000000a2.jpg", "9000000004_00000000a4.jpg"):
        (images / name).unlink()
    token = tmp_path / "flickr8k" / "Flickr8k.token.txt"
    assert error(token) == (
        f"2 of 5 images listed in {token} are missing from {images}: "
        "9000000002_00000000a2.jpg, 9000000004_00000000a4.jpg; pass --skip-missing to leave them out"
    )
    dataset = load_dataset(token, skip_missing=True)
    assert dataset.missing == ("9000000002_00000000a2.jpg", "9000000004_00000000a4.jpg")
    assert [r.image_id for r in dataset.records] == [
        "9000000001_00000000a1.jpg",
        "9000000003_00000000a3.jpg",
        "9000000005_00000000a5.jpg",
    ]


def test_missing_images_message_shows_three_names(tmp_path):
    shutil.copytree(FIXTURES / "kaggle_flickr8k", tmp_path / "k")
    for path in sorted((tmp_path / "k" / "Images").iterdir())[:4]:
        path.unlink()
    message = error(tmp_path / "k" / "captions.txt")
    assert "4 of 5 images" in message
    assert "9000000003_00000000a3.jpg, ...; pass --skip-missing" in message
    assert "9000000004_00000000a4.jpg" not in message


def test_no_image_found_at_all_points_at_the_image_folder(tmp_path):
    path = write(tmp_path, "captions.txt", KAGGLE_CAPTIONS.read_text())
    for skip in (False, True):
        message = error(path, skip_missing=skip)
        assert message.startswith(f"none of the 5 images listed in {path} is under {tmp_path}")
        assert message.endswith("check the image folder")


def test_karpathy_images_argument_overrides_the_json_folder(tmp_path):
    shutil.copytree(FIXTURES / "flickr8k" / "Flicker8k_Dataset", tmp_path / "elsewhere")
    dataset = load_dataset(KARPATHY_FLICKR8K, images=tmp_path / "elsewhere")
    assert {r.path.parent for r in dataset.records} == {tmp_path / "elsewhere"}


# --- Dataset.split ---------------------------------------------------------------------------


def test_split_returns_records_or_names_the_splits_that_exist():
    dataset = load_dataset(TOKEN_FILE)
    assert [r.image_id for r in dataset.split("val")] == ["9000000003_00000000a3.jpg"]
    assert all(isinstance(r, ImageRecord) for r in dataset.split("train"))
    with pytest.raises(CaptionerError) as info:
        dataset.split("holdout")
    assert str(info.value) == (
        "data set 'flickr8k' has no 'holdout' images; its splits are: train (2), val (1), test (1), unassigned (1) "
        "(name each image's split in a 'split' column of a CSV, or in the data set file)"
    )


def _csv_dataset(tmp_path: Path, names: list[str]) -> Dataset:
    (tmp_path / "captions.csv").write_text("image,caption\n" + "".join(f"{n},a caption of {n}\n" for n in names))
    for n in names:
        (tmp_path / n).write_bytes(b"")
    return load_dataset(tmp_path / "captions.csv")


def test_a_data_set_without_validation_images_holds_a_seeded_stable_share_out(tmp_path):
    names = [f"photo{i:03d}.jpg" for i in range(200)]
    dataset = _csv_dataset(tmp_path, names)
    with pytest.raises(CaptionerError, match="no 'val' images.*'split' column"):
        dataset.split("val")
    split, moved = dataset.with_validation(0.1, seed=0)
    val = {r.image_id for r in split.split("val")}
    assert moved == len(val) and 10 <= moved <= 30 and len(split.split("train")) == 200 - moved
    assert split.with_validation(0.1, seed=0) == (split, 0)  # one with validation images is kept as it is
    again, _ = dataset.with_validation(0.1, seed=0)
    assert {r.image_id for r in again.split("val")} == val  # seeded: the same every time
    assert {r.image_id for r in dataset.with_validation(0.1, seed=1)[0].split("val")} != val
    # Stable: rows added, removed or reordered leave every other image on its side.
    (tmp_path / "more").mkdir()
    more = _csv_dataset(tmp_path / "more", names[::-1][:150] + ["new.jpg"])
    kept = {r.image_id for r in more.with_validation(0.1, seed=0)[0].split("val")}
    assert kept - {"new.jpg"} == val & set(names[::-1][:150])


def test_a_data_set_of_one_training_image_cannot_hold_one_out(tmp_path):
    with pytest.raises(CaptionerError, match="at least 2 are needed"):
        _csv_dataset(tmp_path, ["only.jpg"]).with_validation(0.1, seed=0)
