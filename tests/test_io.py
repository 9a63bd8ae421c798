import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from captioner.checkpoint import save_checkpoint
from captioner.errors import CaptionerError
from captioner.io import atomic_write, remove_temporaries, strict_json
from captioner.records import RecordFormat


def test_writes_the_content_and_leaves_nothing_else_in_the_folder(tmp_path):
    with atomic_write(tmp_path / "a.bin") as f:
        f.write(b"\x00\x01 bytes")
    with atomic_write(tmp_path / "b.json", "w") as f:
        f.write('{"caption": "un cercle rouge à gauche"}\n')
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01 bytes"
    assert (tmp_path / "b.json").read_text(encoding="utf-8") == '{"caption": "un cercle rouge à gauche"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.json"]


def test_replaces_an_existing_file_whole(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old and much longer than the new content\n")
    with atomic_write(path, "w") as f:
        f.write("new\n")
    assert path.read_text() == "new\n"
    assert os.listdir(tmp_path) == ["report.json"]


def test_an_exception_mid_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"old checkpoint")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_write(path) as f:
            f.write(b"half of a new chec")
            assert path.read_bytes() == b"old checkpoint"  # nothing reaches the target while writing
            raise RuntimeError("disk on fire")
    assert path.read_bytes() == b"old checkpoint"
    assert os.listdir(tmp_path) == ["model.pt"]


def test_an_exception_leaves_no_file_where_there_was_none(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(tmp_path / "new.json", "w") as f:
            f.write("{")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_a_killed_writer_never_tears_the_target(tmp_path):
    path = tmp_path / "index.json"
    path.write_text("old")
    child = textwrap.dedent(
        f"""
        import os, sys
        from captioner.io import atomic_write
        with atomic_write({str(path)!r}, "w") as f:
            f.write("half of the new")
            f.flush()
            print("written", flush=True)
            sys.stdin.readline()  # killed while waiting here
            f.write(" content")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env) as proc:
        try:
            assert proc.stdout.readline() == "written\n"
        finally:
            proc.kill()
    assert path.read_text() == "old"
    (leftover,) = [p for p in tmp_path.iterdir() if p != path]  # what a SIGKILL leaves: hidden, .tmp
    assert leftover.name.startswith(".index.json.") and leftover.name.endswith(".tmp")
    assert leftover.read_text() == "half of the new"


def test_the_file_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync folder" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with atomic_write(tmp_path / "x", "wb") as f:
        f.write(b"x")
    assert events == ["fsync file", "replace", "fsync folder"]


def test_permissions_follow_the_umask_like_a_plain_open(tmp_path):
    old = os.umask(0o027)
    try:
        with open(tmp_path / "plain", "w"):
            pass
        with atomic_write(tmp_path / "atomic", "w"):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "atomic").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_errors_name_the_target_and_only_whole_file_modes_are_accepted(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        with atomic_write(tmp_path / "absent" / "r.json", "w"):
            pass
    assert info.value.filename == str(tmp_path / "absent" / "r.json")
    with pytest.raises(ValueError, match="whole files"):
        with atomic_write(tmp_path / "log", "a"):
            pass


def test_concurrent_writers_each_leave_a_whole_file(tmp_path):
    path = tmp_path / "shared"

    def write(n):
        for _ in range(20):
            with atomic_write(path) as f:
                f.write(bytes([n]) * 100_000)

    threads = [threading.Thread(target=write, args=(n,)) for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = path.read_bytes()
    assert data in (b"\x01" * 100_000, b"\x02" * 100_000)
    assert os.listdir(tmp_path) == ["shared"]


def test_a_checkpoint_that_fails_to_save_leaves_the_old_one(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint({"epoch": 1, "weights": torch.ones(3)}, path)
    with pytest.raises(Exception):
        save_checkpoint({"epoch": 2, "weights": torch.zeros(3), "bad": lambda: None}, path)  # a lambda cannot pickle
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == 1 and torch.equal(state["weights"], torch.ones(3))
    assert os.listdir(tmp_path) == ["model.pt"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_json_output_refuses_nan_and_infinity_in_one_line(bad):
    assert strict_json({"log_prob": -1.5}) == '{"log_prob": -1.5}'
    with pytest.raises(CaptionerError, match="not a number"):
        strict_json({"captions": [{"log_prob": bad}]})
    with pytest.raises(CaptionerError, match="not a number"):
        RecordFormat("jsonl", 1).line({"image": "a.png", "captions": [{"text": "", "log_prob": bad, "perplexity": 1.0}]})


def test_remove_temporaries_removes_only_what_atomic_write_leaves(tmp_path):
    left = tmp_path / ".model.pt.0123456789ab.tmp"
    left.write_bytes(b"torn")
    keep = [tmp_path / "notes.tmp", tmp_path / ".model.pt.tmp", tmp_path / "model.pt"]
    for path in keep:
        path.write_bytes(b"mine")
    assert remove_temporaries(tmp_path, older_than=3600) == []  # too young: perhaps a write in progress
    assert remove_temporaries(tmp_path, of="last.pt") == []
    assert remove_temporaries(tmp_path, of="model.pt") == [left]
    assert sorted(tmp_path.iterdir()) == sorted(keep)
