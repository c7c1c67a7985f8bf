"""Run-directory layout, the user cache, atomic writes, stage manifests and the run lock.

Every path under a run directory, and the cache root, is built here. A stage is complete only when
its ``manifest.json`` exists; the manifest is written last, atomically, after every file it lists.
Re-running a command therefore skips complete stages and redoes (or resumes) the rest, with no
signal handling needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from sdft_cli.errors import RunDirError

MANIFEST = "manifest.json"


def cache_dir() -> Path:
    """The user cache (models built or converted once, judge verdicts, generated QA sets):
    ``$SDFT_CACHE``, default ``~/.cache/sdft_cli``."""
    return Path(os.environ.get("SDFT_CACHE", Path.home() / ".cache" / "sdft_cli")).expanduser()


# ----------------------------------------------------------------------------- atomic writes


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class DiskWriteError(RunDirError, OSError):
    """A file or directory of the run could not be written (disk full, quota, file size limit, read-only
    file system); the message names it. What was there before is left as it was."""


def _raise_write_failed(path: Path, e: BaseException) -> None:
    """Re-raise ``e`` as a ``DiskWriteError`` naming ``path`` when it is a failed write: an ``OSError``,
    or a native writer's message (safetensors: "os error N"; torch.save: a short write); else as it is."""
    text = str(e)
    if not isinstance(e, OSError) and not any(
        m in text for m in ("os error", "file write failed", "unexpected pos")
    ):
        raise e
    reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {text}"
    raise DiskWriteError(f"cannot write {path}: {reason} (its previous content is unchanged)") from e


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        _raise_write_failed(path, e)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        _raise_write_failed(path, e)
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a log written by ``append_jsonl`` ([] when it does not exist); a torn last line
    of an interrupted write is left out."""
    out, path = [], Path(path)
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``path`` only if the block finishes.

    An interrupted block leaves ``path`` as it was (a stale ``.tmp`` sibling is removed on the next try).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as e:
        _raise_write_failed(path, e)
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_write_failed(path, e)
    for f in tmp.rglob("*"):  # durable contents before the rename makes them visible
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    old = path.with_name(f".{path.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old.exists():
        shutil.rmtree(old)


# ----------------------------------------------------------------------------- manifests


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(
    stage_dir: str | Path, info: dict | None = None, checksums: bool = True, exclude: tuple[str, ...] = ()
) -> Path:
    """Mark ``stage_dir`` complete: list its files (size, sha256) and write ``manifest.json`` last.

    Hidden paths and the top-level entries named in ``exclude`` are not part of the stage.
    """
    stage_dir = Path(stage_dir)
    files = {}
    for p in sorted(stage_dir.rglob("*")):
        rel_parts = p.relative_to(stage_dir).parts
        if rel_parts[0] in exclude or any(part.startswith(".") for part in rel_parts):
            continue
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(stage_dir).as_posix()
            files[rel] = {"bytes": p.stat().st_size, **({"sha256": sha256_file(p)} if checksums else {})}
    manifest = {"completed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(info or {}), "files": files}
    return atomic_write_json(stage_dir / MANIFEST, manifest)


def is_complete(stage_dir: str | Path) -> bool:
    return (Path(stage_dir) / MANIFEST).is_file()


def read_manifest(stage_dir: str | Path) -> dict:
    return read_json(Path(stage_dir) / MANIFEST)


class CorruptArtifactError(RunDirError):
    """A stage or checkpoint does not match its manifest (truncated, altered or missing file, or a
    manifest that is not valid JSON); the message names the file."""


def verify_manifest(stage_dir: str | Path, checksums: bool = True) -> dict:
    """The manifest of ``stage_dir``, after checking that every file it lists exists with its size and
    (``checksums``) its sha256; raises ``CorruptArtifactError`` naming the first file that does not."""
    stage_dir = Path(stage_dir)
    path = stage_dir / MANIFEST
    try:
        manifest = read_json(path)
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CorruptArtifactError(f"{path} is not a valid manifest ({type(e).__name__}: {e})") from None
    for rel, meta in files.items():
        p = stage_dir / rel
        if not p.is_file():
            raise CorruptArtifactError(f"{p} is listed in {path} but missing")
        size = p.stat().st_size
        if not isinstance(meta, dict) or size != meta.get("bytes"):
            want = meta.get("bytes") if isinstance(meta, dict) else meta
            raise CorruptArtifactError(f"{p} has {size} bytes, {path} lists {want} (truncated or replaced)")
        if checksums and "sha256" in meta and sha256_file(p) != meta["sha256"]:
            raise CorruptArtifactError(f"{p} does not match the sha256 in {path} (corrupted)")
    return manifest


def invalidate(stage_dir: str | Path) -> None:
    """Mark a stage incomplete so it is redone; its manifest is kept as ``.manifest.json.corrupt``."""
    stage_dir = Path(stage_dir)
    try:
        os.replace(stage_dir / MANIFEST, stage_dir / f".{MANIFEST}.corrupt")
    except FileNotFoundError:
        pass


def verified(stage_dir: str | Path, checksums: bool = True) -> bool:
    """Whether ``stage_dir`` is complete and intact. A complete stage that does not match its manifest is
    reported (with the file) and marked incomplete: it is redone rather than trusted."""
    if not is_complete(stage_dir):
        return False
    try:
        verify_manifest(stage_dir, checksums)
    except CorruptArtifactError as e:
        print(f"[sdft] {e}; {stage_dir} will be redone", flush=True)
        invalidate(stage_dir)
        return False
    return True


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run. Stage directories are ``t{i:02d}_{task}/{train,eval}``; ``t00_base`` is row 0."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # run-level files
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def provenance(self) -> Path:
        return self.root / "provenance.json"

    @property
    def metrics_log(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def matrix(self, suffix: str) -> Path:
        return self.root / f"matrix.{suffix}"

    # stage directories
    def stage_root(self, index: int, task: str) -> Path:
        return self.root / f"t{index:02d}_{task}"

    def base_eval(self) -> Path:
        return self.root / "t00_base" / "eval"

    def preconditions(self) -> Path:
        return self.root / "t00_base" / "preconditions"

    def train(self, index: int, task: str) -> Path:
        return self.stage_root(index, task) / "train"

    def eval(self, index: int, task: str) -> Path:
        return self.stage_root(index, task) / "eval"

    def model(self, index: int, task: str) -> Path:
        """The HF-format student after training on task ``index`` (loadable by transformers/vLLM/lm-eval)."""
        return self.train(index, task) / "model"

    def checkpoints(self, index: int, task: str) -> Path:
        return self.train(index, task) / "checkpoints"


# ----------------------------------------------------------------------------- lock


class RunLock:
    """An exclusive lock on a run directory, so two processes never write the same run.

    It is an OS-level ``flock``: the kernel drops it when the owner dies, so a crashed run leaves no
    stale lock. The owner's host and pid are written beside it for the refusal message.
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self.owner = Path(run_dir) / ".lock.owner"
        self._lock = FileLock(str(self.path))

    def __enter__(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock.acquire(timeout=0)
        except Timeout:
            who = self.owner.read_text().strip() if self.owner.exists() else "another process"
            raise RunDirError(f"run directory {self.path.parent} is in use by {who}") from None
        except OSError as e:  # a read-only or full file system: one line naming the lock file
            _raise_write_failed(self.path, e)
        atomic_write_text(self.owner, f"host={socket.gethostname()} pid={os.getpid()}\n")
        return self

    def __exit__(self, *exc: object) -> None:
        self.owner.unlink(missing_ok=True)
        self._lock.release()
