"""Atomic writes, manifests and the run lock, tried against the faults they guard against."""

import os
import subprocess
import sys
import time

import pytest

from sdft_cli.artifacts import (
    RunLayout,
    RunLock,
    atomic_dir,
    atomic_write_text,
    is_complete,
    read_manifest,
    sha256_file,
    write_manifest,
)
from sdft_cli.errors import RunDirError


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a" / "f.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert [q.name for q in p.parent.iterdir()] == ["f.txt"]
    assert oct(p.stat().st_mode & 0o777) != oct(0o600)  # usual permissions, not mkstemp's


def test_atomic_dir_keeps_old_content_when_the_block_fails(tmp_path):
    d = tmp_path / "model"
    with atomic_dir(d) as tmp:
        (tmp / "w").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(d) as tmp:
            (tmp / "w").write_text("half")
            raise RuntimeError("killed")
    assert (d / "w").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_manifest_marks_completion_and_lists_checksums(tmp_path):
    stage = tmp_path / "stage"
    (stage / "sub").mkdir(parents=True)
    (stage / "sub" / "x.bin").write_bytes(b"abc")
    assert not is_complete(stage)
    write_manifest(stage, {"stage": 1})
    m = read_manifest(stage)
    assert is_complete(stage) and m["stage"] == 1
    assert m["files"]["sub/x.bin"] == {"bytes": 3, "sha256": sha256_file(stage / "sub" / "x.bin")}


def test_layout_names():
    lay = RunLayout("/r")
    assert str(lay.train(2, "facts")) == "/r/t02_facts/train"
    assert str(lay.base_eval()) == "/r/t00_base/eval"
    assert str(lay.model(1, "mcq")) == "/r/t01_mcq/train/model"


HOLD = """
import sys, time
from sdft_cli.artifacts import RunLock
with RunLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_second_process_is_refused_with_owner_and_dead_owner_releases(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=rf"in use by host=\S+ pid={proc.pid}"):
            with RunLock(tmp_path):
                pass
    finally:
        proc.kill()  # SIGKILL: no cleanup runs, the owner file stays behind
        proc.wait()
    time.sleep(0.1)
    with RunLock(tmp_path):  # the kernel dropped the dead process's lock: no stale lock
        assert f"pid={os.getpid()}" in (tmp_path / ".lock.owner").read_text()
