"""Captioning on Ray Data (``--engine ray``): a local Ray instance with 2 CPUs, tiny images.

Image files, Parquet (bytes or paths) and WebDataset shards in; the same captions as the
single-process command out, as JSONL or Parquet shards; bad images as error rows; an actor killed
by SIGKILL mid-run and every image still written exactly once.
"""

import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import assert_one_line_error, assert_same_captions, run

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="Ray Data is an optional extra: pip install 'captioner[ray]'"
)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory, shapes):
    """24 images (the tiny world's test split, copied) and one undecodable, third from last."""
    root = tmp_path_factory.mktemp("ray-images")
    sources = [r.path for r in shapes.split("test")]
    for i in range(24):
        shutil.copy(sources[i % len(sources)], root / f"{i:03d}.png")
    (root / "021.png").write_bytes(b"\x89PNG\r\n\x1a\n torn")
    return root


def single_process(capsys, model, inputs, *options):
    """The records of the single-process command."""
    code, out, err = run(capsys, "caption", model, *inputs, *options)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def ray_jsonl(capsys, model, inputs, out, *options):
    code, _, err = run(capsys, "caption", model, *inputs, "--engine", "ray", "--output", out, *options)
    assert code == 0, err
    return [json.loads(line) for line in Path(out).read_text().splitlines()]


BEAM = ("--mode", "beam", "--num-captions", "2", "--batch-size", "4")


@needs_ray
@pytest.mark.slow  # starts Ray
def test_image_files_give_the_single_process_commands_records_and_resume(capsys, tmp_path, ray_cluster, trained_run, images):
    model = trained_run / "model.pt"
    expected = single_process(capsys, model, [images], *BEAM)
    # As an interrupted run leaves its file: 8 whole records and a torn one. The Ray run goes on after them.
    out = tmp_path / "captions.jsonl"
    lines = [json.dumps(e) + "\n" for e in expected]
    out.write_text("".join(lines[:8]) + lines[8][:20])
    got = ray_jsonl(capsys, model, [images], out, *BEAM)
    assert_same_captions(got, expected)
    assert got[21]["error"]["code"] == "corrupt_image" and len(got) == 24
    # Sampled with a seed: each image's samples are its own, whatever batch it came in. To
    # standard output: the records alone, Ray's progress and logs go to standard error.
    sampled = ("--mode", "sample", "--num-captions", "3", "--seed", "7", "--top-k", "5", "--batch-size", "5")
    expected = single_process(capsys, model, [images], *sampled)
    assert_same_captions(single_process(capsys, model, [images], "--engine", "ray", *sampled), expected)


def write_parquet(path, images, *, as_bytes: bool):
    """The images as a Parquet file: an id column and a bytes column, or a path column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(images.glob("*.png"))
    if as_bytes:
        table = pa.table({"key": [f.name for f in files], "jpg": [f.read_bytes() for f in files], "label": [1] * len(files)})
    else:
        table = pa.table({"path": [str(f) for f in files], "label": [1] * len(files)})
    pq.write_table(table, path, row_group_size=7)


def write_shards(folder, images, per_shard=10):
    """The images as WebDataset shards (``KEY.png`` with a ``KEY.txt`` beside it); one sample
    without any image member."""
    files = sorted(images.glob("*.png"))
    folder.mkdir()
    for s in range(0, len(files), per_shard):
        with tarfile.open(folder / f"shard-{s // per_shard:03d}.tar", "w") as tar:
            for f in files[s : s + per_shard]:
                for name, data in ((f"{f.stem}.png", f.read_bytes()), (f"{f.stem}.txt", b"a caption")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    with tarfile.open(folder / "shard-999.tar", "w") as tar:
        info = tarfile.TarInfo("lonely.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    return folder


@needs_ray
@pytest.mark.slow  # starts Ray
def test_parquet_and_webdataset_inputs_give_the_same_captions(capsys, tmp_path, ray_cluster, trained_run, images):
    model = trained_run / "model.pt"
    expected = single_process(capsys, model, [images], *BEAM)
    by_name = {Path(e["image"]).name: e for e in expected}
    write_parquet(tmp_path / "bytes.parquet", images, as_bytes=True)
    write_parquet(tmp_path / "paths.parquet", images, as_bytes=False)
    shards = write_shards(tmp_path / "shards", images)

    # All three in one run (one pool of actors to start): records in input order, input by input.
    inputs = [tmp_path / "bytes.parquet", tmp_path / "paths.parquet", f"{shards}/*.tar"]
    got = ray_jsonl(capsys, model, inputs, tmp_path / "captions.jsonl", *BEAM)
    with_bytes, with_paths, from_shards = got[:24], got[24:48], got[48:]
    assert [g["image"] for g in with_bytes] == list(by_name)  # the key column names them, in order
    assert_same_captions(with_bytes, [{**e, "image": name} for name, e in by_name.items()])
    assert_same_captions(with_paths, expected)
    assert [g["image"] for g in from_shards] == [Path(e["image"]).stem for e in expected] + ["lonely"]
    assert from_shards[-1]["error"]["code"] == "empty_image"  # a sample without an image member
    assert_same_captions(from_shards[:-1], [{**e, "image": Path(e["image"]).stem} for e in expected])


@needs_ray
@pytest.mark.slow  # starts Ray
def test_parquet_output_one_row_per_image_with_errors_in_their_columns(capsys, tmp_path, ray_cluster, trained_run, images):
    import pyarrow.parquet as pq

    model = trained_run / "model.pt"
    expected = single_process(capsys, model, [images], *BEAM)
    out = tmp_path / "captions"
    code, _, err = run(capsys, "caption", model, images, "--engine", "ray", "--format", "parquet", "--output", out, *BEAM)
    assert code == 0, err
    assert all(p.suffix == ".parquet" for p in out.iterdir())
    rows = sorted(pq.read_table(out).to_pylist(), key=lambda r: r["image"])
    assert [r["image"] for r in rows] == [e["image"] for e in expected]  # each image once
    assert rows[21]["error_code"] == "corrupt_image" and rows[21]["captions"] is None and rows[21]["error_message"]
    records = [
        {"image": r["image"], "captions": r["captions"]} if r["error_code"] is None else
        {"image": r["image"], "error": {"code": r["error_code"], "message": r["error_message"]}}
        for r in rows
    ]
    assert_same_captions(records, expected)
    assert set(rows[0]["captions"][0]) == {"text", "log_prob", "perplexity"}
    code, _, err = run(capsys, "caption", model, images, "--engine", "ray", "--format", "parquet", "--output", out)
    assert_one_line_error(code, err, "not an empty folder")  # never mixed with another run's shards


@needs_ray
@pytest.mark.slow  # starts Ray, kills an actor
def test_an_actor_killed_mid_run_is_replaced_and_each_image_written_once(
    capsys, monkeypatch, tmp_path, ray_cluster, trained_run, images
):
    from captioner.batch_ray import local_actor_pids

    # Records come out a whole input block at a time: with the default blocks of 128, 300 images
    # arrived as 128 and then the rest 20 ms later, and the kill, which waits for 40 records, came
    # after the run in 5 of 12 tries. Blocks of 16 write records all through the run.
    monkeypatch.setattr("captioner.batch_ray.BLOCK_ROWS", 16)
    model = trained_run / "model.pt"
    many = tmp_path / "many"
    many.mkdir()
    for i in range(300):  # enough that the kill comes mid-run
        shutil.copy(images / f"{i % 24:03d}.png", many / f"{i:04d}.png")
    expected = single_process(capsys, model, [many], "--mode", "beam", "--batch-size", "4")
    out = tmp_path / "captions.jsonl"
    killed = []

    def kill_an_actor_mid_run():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            pids = local_actor_pids()
            if pids and out.exists() and len(out.read_bytes().splitlines()) >= 40:
                os.kill(min(pids), signal.SIGKILL)
                killed.append((min(pids), len(out.read_bytes().splitlines())))
            time.sleep(0.02)

    killer = threading.Thread(target=kill_an_actor_mid_run)
    killer.start()
    got = ray_jsonl(capsys, model, [many], out, "--mode", "beam", "--batch-size", "4")
    killer.join()
    assert killed and killed[0][1] < 300, "the run ended before an actor could be killed"
    assert_same_captions(got, expected)  # none lost, none twice, in order


@needs_ray
@pytest.mark.slow  # starts Ray
def test_on_cpus_each_actor_decodes_its_own_images_one_actor_per_cpu(ray_cluster, trained_run, images):
    from captioner.batch_ray import _pool_size, caption_dataset, read_images
    from captioner.options import DecodeOptions

    # Fused: no decoding worker process beside the actors, no pixels through the object store
    # (on 2 cores, 1.05 to 1.36 times the single process's steady throughput, against 0.73 to 0.93
    # for one actor beside decoding tasks: docs/ray.md).
    files = read_images([str(images)])
    ds = caption_dataset(files, trained_run / "model.pt", DecodeOptions(), reads_in_tasks=False).materialize()
    assert "MapBatches(decode_images)->MapBatches(CaptionActor)" in ds.stats()
    assert ds.count() == 24
    assert _pool_size(0, 1.0, 0.0, reads_in_tasks=False) == 2 and _pool_size(0, 2.0, 0.0, reads_in_tasks=False) == 1
    # Parquet or shards are listed and read by tasks of a CPU each: the actors leave them one.
    assert _pool_size(0, 1.0, 0.0, reads_in_tasks=True) == 1 and _pool_size(2, 1.0, 0.0, reads_in_tasks=True) == 1


# The command as a user runs it, saying at the end whether its process (Ray's driver) imported torch.
DRIVER = """
import sys
from captioner.cli import main
code = main(sys.argv[1:])
print("driver imported torch:", "torch" in sys.modules, file=sys.stderr)
sys.exit(code)
"""


@needs_ray
@pytest.mark.slow  # starts two Ray jobs
def test_the_driver_never_imports_torch_and_a_damaged_model_is_one_line(tmp_path, ray_cluster, trained_run, images):
    """The driver leaves torch to the workers (importing it would delay every actor by seconds); a
    model file that the actors cannot load ends the command with the loader's message (the driver
    asks a Ray task why): no traceback of Ray's, no record, no output file."""
    env = os.environ | {"RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}

    def command(model, *options):
        args = [sys.executable, "-c", DRIVER, "caption", str(model), str(images), "--engine", "ray", *options]
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)

    done = command(trained_run / "model.pt", "--output", str(tmp_path / "captions.jsonl"))
    assert done.returncode == 0, done.stderr
    assert "driver imported torch: False" in done.stderr
    assert len((tmp_path / "captions.jsonl").read_text().splitlines()) == 24
    damaged = tmp_path / "model.pt"
    damaged.write_bytes((trained_run / "model.pt").read_bytes()[:5000])
    failed = command(damaged, "--format", "csv")
    assert failed.returncode == 1 and failed.stdout == ""  # not even the CSV's header
    assert "Traceback" not in failed.stderr and " ERROR " not in failed.stderr, failed.stderr  # Ray Data's stack traces
    last = failed.stderr.splitlines()[-2:]
    assert last == ["captioner: error: model.pt is damaged or not a captioner model: it cannot be read as a checkpoint", "driver imported torch: False"]
    failed = command(damaged, "--output", str(tmp_path / "not-written.jsonl"))
    assert failed.returncode == 1 and not (tmp_path / "not-written.jsonl").exists()
    # From Python, the model file given by its path is checked before the dataset is made.
    from captioner.batch_ray import caption_dataset, read_images
    from captioner.errors import CaptionerError
    from captioner.options import DecodeOptions

    with pytest.raises(CaptionerError, match="model.pt is damaged"):
        caption_dataset(read_images([str(images)]), damaged, DecodeOptions())


def test_ray_options_need_the_ray_engine(capsys, trained_run, images):
    model = trained_run / "model.pt"
    assert_one_line_error(*run(capsys, "caption", model, images, "--num-actors", "2")[::2], "--num-actors", "--engine ray")
    assert_one_line_error(*run(capsys, "caption", model, images, "--format", "parquet")[::2], "--engine ray")
    args = ("caption", model, images, "--engine", "ray", "--format", "parquet")
    assert_one_line_error(*run(capsys, *args)[::2], "--output")
