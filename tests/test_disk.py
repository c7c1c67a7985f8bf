"""Disk faults: a full disk and a read-only file system make a write fail with one message naming the
path, leave what was there before complete and loadable, and a re-run once the disk is writable again
finishes exactly like an uninterrupted run.

A full disk is simulated with RLIMIT_FSIZE in a child process (a write past the limit fails with EFBIG,
as it would with ENOSPC; no mount needed, so this runs anywhere, as root too). A read-only directory
needs a read-only mount (root ignores file permissions): a tmpfs is mounted when that is permitted,
otherwise those tests are skipped.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdft_cli.artifacts import DiskWriteError, RunLock, atomic_dir, atomic_write_text, verify_manifest

# The writes a run makes, by the same functions: a checkpoint directory whose student (safetensors) or
# trainer state (torch.save) is large, and a JSON file.
WRITES = r"""
import torch
from safetensors.torch import save_file
from sdft_cli.artifacts import atomic_dir, atomic_write_json, write_manifest

def write(root, case, step, n):
    def checkpoint(model, state):
        with atomic_dir(root / "checkpoint") as tmp:
            save_file({"w": torch.full((model,), float(step))}, str(tmp / "model.safetensors"))
            torch.save({"step": step, "exp_avg": torch.zeros(state)}, tmp / "trainer_state.pt")
            write_manifest(tmp, {"step": step})

    if case == "results":
        atomic_write_json(root / "results.json", {"step": step, "pad": "x" * n})
    else:
        checkpoint(n, 8) if case == "model" else checkpoint(8, n)
"""
# In a child: from here on the disk is full, a write past the limit fails (EFBIG, with no signal).
CHILD = (
    WRITES
    + r"""
import json, resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.RLIM_INFINITY))
try:
    write(Path(sys.argv[1]), sys.argv[2], 2, 100_000)
except Exception as e:
    print(json.dumps({"type": type(e).__name__, "message": str(e)}))
else:
    print(json.dumps({"type": None}))
"""
)


def files(root: Path) -> dict[str, bytes]:
    """Every file under ``root``, hidden ones (temporaries) included."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "case, target", [("model", "checkpoint"), ("trainer_state", "checkpoint"), ("results", "results.json")]
)
def test_a_full_disk_fails_naming_the_path_and_keeps_the_previous_state(tmp_path, case, target):
    scope: dict = {}
    exec(WRITES, scope)
    scope["write"](tmp_path, case, 1, 8)
    before = files(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), case], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    failed = json.loads(out.stdout.splitlines()[-1])
    assert failed["type"] == "DiskWriteError", failed
    assert failed["message"].startswith(f"cannot write {tmp_path / target}: ")
    if case != "trainer_state":  # torch.save reports a short write, not the errno
        assert "File too large" in failed["message"] or "os error 27" in failed["message"]
    assert files(tmp_path) == before  # the previous state as it was, no temporary left behind
    if target == "checkpoint":
        from safetensors.torch import load_file

        assert verify_manifest(tmp_path / "checkpoint")["step"] == 1
        assert load_file(str(tmp_path / "checkpoint" / "model.safetensors"))["w"].tolist() == [1.0] * 8
        assert torch.load(tmp_path / "checkpoint" / "trainer_state.pt")["step"] == 1
    scope["write"](tmp_path, case, 2, 100_000)  # space freed: the same write goes through
    assert files(tmp_path) != before


@pytest.fixture
def tmpfs(tmp_path):
    """A fresh tmpfs mounted at ``tmp_path/fs``; ``remount(mode)`` makes it ``ro`` or ``rw``."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: a read-only directory cannot be made (root ignores permissions)")
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True)
    if out.returncode:
        pytest.skip(
            "mounting a tmpfs is not permitted here (needs CAP_SYS_ADMIN) and root ignores file "
            f"permissions, so no read-only directory can be made: {out.stderr.decode().strip()}"
        )

    def remount(mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(mnt)], check=True)

    try:
        yield mnt, remount
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_read_only_file_system_fails_naming_the_path_and_changes_nothing(tmpfs):
    root, remount = tmpfs
    run = root / "run"
    with RunLock(run):
        with atomic_dir(run / "stage") as tmp:
            (tmp / "w").write_text("v1")
        atomic_write_text(run / "results.json", "v1")
    remount("ro")
    before = files(root)
    for path, write in (
        (run / "results.json", lambda: atomic_write_text(run / "results.json", "v2")),
        (run / "stage", lambda: atomic_dir(run / "stage").__enter__()),
        (run / ".lock", lambda: RunLock(run).__enter__()),
        (root / "new" / ".lock", lambda: RunLock(root / "new").__enter__()),
    ):
        with pytest.raises(DiskWriteError, match=f"cannot write {path}: Read-only file system"):
            write()
    assert files(root) == before
    remount("rw")
    atomic_write_text(run / "results.json", "v2")
    assert (run / "results.json").read_text() == "v2"


def test_a_failed_log_append_names_the_file(tmpfs):
    from sdft_cli.logger import append_jsonl

    root, remount = tmpfs
    log = root / "metrics.jsonl"
    append_jsonl(log, {"step": 1})
    remount("ro")
    with pytest.raises(DiskWriteError, match=f"cannot append to {log}: Read-only file system"):
        append_jsonl(log, {"step": 2})
    remount("rw")
    assert log.read_text() == '{"step": 1}\n'


# ----------------------------------------------------------------------------- whole runs (slow)


@pytest.fixture(scope="module")
def crash(tmp_path_factory, tiny_model_dir):
    from crash_harness import Harness

    harness = Harness(tmp_path_factory.getbasetemp() / "crash")
    harness.make_reference(reuse=True)
    return harness


@pytest.mark.slow
def test_a_disk_full_while_a_task_is_saved_keeps_its_checkpoint_and_a_rerun_matches(crash):
    from crash_harness import Fault, compare
    from safetensors.torch import load_file

    run = crash.work / "disk_full"
    shutil.rmtree(run, ignore_errors=True)
    full = Fault("disk", "sdft_cli.checkpoint:save_final", 1, "fsize")
    res = crash.launch(run, full, env={**crash.env, "CRASH_FSIZE": "4096"})
    train = run / "t01_facts" / "train"
    assert res.rc == 2, res.output[-3000:]
    assert f"sdft: error: cannot write {train / 'model'}: " in res.output
    assert "Traceback" not in res.output
    (ckpt,) = (train / "checkpoints").glob("step_*")  # the previous state: complete and loadable
    assert verify_manifest(ckpt)["step"] == 1
    assert load_file(str(ckpt / "model" / "model.safetensors")) and (ckpt / "trainer_state.pt").is_file()
    assert verify_manifest(run / "t00_base" / "eval")
    assert not (train / "model").exists() and not (train / ".model.tmp").exists()

    again = crash.launch(run)  # space freed
    assert again.rc == 0, again.output[-3000:]
    assert f"resuming from {ckpt}" in again.output
    assert compare(run, crash.reference) == ([], [])


@pytest.mark.slow
def test_a_read_only_run_directory_is_refused_unchanged_and_resumes_when_writable(crash, tmpfs):
    from crash_harness import Fault, compare

    root, remount = tmpfs
    run = root / "run"
    killed = crash.launch(run, Fault("manifest", "sdft_cli.artifacts:write_manifest", 4))
    assert killed.killed, killed.output[-3000:]
    remount("ro")
    before = files(run)
    res = crash.launch(run)
    assert res.rc != 0 and "Read-only file system" in res.output, res.output[-3000:]
    assert str(run) in res.output
    assert files(run) == before
    remount("rw")
    again = crash.launch(run)
    assert again.rc == 0, again.output[-3000:]
    assert compare(run, crash.reference) == ([], [])
