"""Resumable checkpoints and the final model of a training stage, shared by every method.

A checkpoint is a directory: the student in Hugging Face format (``model/``; with LoRA its adapter,
``adapter.safetensors``, since the base weights do not change within a task), the teacher's fp32
weights (``teacher.safetensors``; a LoRA teacher's adapter), optimizer, scheduler and RNG state
(``trainer_state.pt``) and the step (``state.json``); its ``manifest.json`` is written last. Resuming
restores all of it, so a resumed task continues exactly where it stopped. A checkpoint is checked
against its manifest (sizes right after it is written, before older ones are deleted; sha256 before
it is resumed), and no checkpoint or final model with a NaN/inf weight or optimizer value is ever
written.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from sdft_cli import distributed, lora
from sdft_cli.artifacts import (
    MANIFEST,
    CorruptArtifactError,
    atomic_dir,
    invalidate,
    is_complete,
    verified,
    verify_manifest,
    write_manifest,
)
from sdft_cli.guard import ensure_finite
from sdft_cli.models import load_model
from sdft_cli.schedule import TrainState
from sdft_cli.teacher import Teacher


def _rng_state() -> dict:
    """Plain types and tensors only, so ``torch.load(weights_only=True)`` reads it back."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)}
    numpy.update(has_gauss=int(has_gauss), gauss=float(gauss))
    return {"torch": torch.get_rng_state(), "numpy": numpy, "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])


def save_teacher(path: Path, state: dict[str, torch.Tensor]) -> None:
    """The teacher's weights (``Teacher.state_dict``) as safetensors; nothing for a live teacher."""
    if state:
        save_tensors(path, state)


def save_tensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    # tied weights share storage; safetensors wants each tensor once, and load(strict=False) re-ties
    seen, unique = set(), {}
    for k, v in state.items():
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            unique[k] = v.contiguous()
    save_file(unique, str(path))


def save_model(out: Path, model, tokenizer, state: dict[str, torch.Tensor] | None) -> None:
    """``model`` as a Hugging Face directory; ``state`` is its gathered weights when it is sharded."""
    model.save_pretrained(out, state_dict=state)
    tokenizer.save_pretrained(out)


def save_checkpoint(
    path: Path, student, tokenizer, *, teacher: Teacher, opt, sched, state: TrainState
) -> Path:
    """Write a complete checkpoint atomically (the directory appears only when everything is in it).

    Every rank calls it (the sharded states are gathered); rank 0 writes. The optimizer state is keyed
    by parameter name and unsharded, so any number of processes can resume it.
    """
    adapter = lora.attached(student)
    sharded = distributed.is_sharded(student) and not adapter
    weights = distributed.full_state(student) if sharded else None
    teacher_state = teacher.state_dict()
    optimizer = distributed.optimizer_state(student, opt)
    student_state = (
        lora.state(student) if adapter else weights if weights is not None else student.state_dict()
    )
    ensure_finite(path, student=student_state, teacher=teacher_state, optimizer=optimizer)
    if not distributed.current().main:
        return path
    meta = {"step": state.step, "total_steps": state.total_steps}
    meta.update(skipped=state.skipped, skip_streak=state.skip_streak)
    with atomic_dir(path) as tmp:
        if adapter:
            save_tensors(tmp / "adapter.safetensors", student_state)
        else:
            save_model(tmp / "model", student, tokenizer, weights)
        save_teacher(tmp / "teacher.safetensors", teacher_state)
        torch.save(
            {"optimizer": optimizer, "scheduler": sched.state_dict(), "rng": _rng_state()},
            tmp / "trainer_state.pt",
        )
        (tmp / "state.json").write_text(json.dumps(meta))
        write_manifest(tmp, {"step": state.step, "teacher": teacher.kind})
    return path


def _step_of(p: Path) -> int:
    return int(p.name.split("_")[1])


def latest_checkpoint(root: Path, verify: bool = True) -> Path | None:
    """The newest complete checkpoint under ``root`` that matches its manifest (``verify``: sizes and
    sha256). Incomplete ones (no manifest) are ignored; a corrupt one is reported with the file, marked
    incomplete, and the next older one is tried. Rank 0 decides for every rank."""
    choice = None
    if distributed.current().main and root.is_dir():
        done = sorted((p for p in root.glob("step_*") if is_complete(p)), key=_step_of, reverse=True)
        for p in done:
            if not verify or verified(p):
                choice = str(p)
                break
        if verify and done and choice != str(done[0]):
            fallback = (
                f"falling back to {choice}" if choice else "no intact checkpoint: starting the task over"
            )
            print(f"[sdft] {fallback}", flush=True)
    choice = distributed.gather(choice)[0]
    return Path(choice) if choice else None


def load_checkpoint(
    path: Path, student, teacher: Teacher, opt, sched, trust_remote_code: bool = False
) -> TrainState:
    """Restore student weights, teacher, optimizer, scheduler and RNG from ``path``.

    The trainer state holds plain types and tensors only and is read with ``weights_only=True``;
    a file that cannot be read raises ``CorruptArtifactError`` naming it, before anything is restored.
    """
    from safetensors.torch import load_file

    try:
        trainer = torch.load(path / "trainer_state.pt", weights_only=True)
        meta = json.loads((path / "state.json").read_text())
    except Exception as e:  # noqa: BLE001  (unpickling and JSON errors have many types)
        raise CorruptArtifactError(
            f"{path}: cannot read its trainer state ({type(e).__name__}: {e})"
        ) from None
    if (path / "adapter.safetensors").is_file():  # LoRA: the base weights are the task's starting ones
        lora.load_state(student, load_file(str(path / "adapter.safetensors")))
    else:
        dtype = str(next(student.parameters()).dtype).removeprefix("torch.")
        loaded = load_model(path / "model", dtype=dtype, trust_remote_code=trust_remote_code)
        distributed.load_full_state(student, loaded.state_dict())
        del loaded
    if (path / "teacher.safetensors").is_file():
        teacher.load_state_dict(load_file(str(path / "teacher.safetensors")))
    distributed.load_optimizer_state(student, opt, trainer["optimizer"])
    sched.load_state_dict(trainer["scheduler"])
    _set_rng_state(trainer["rng"])
    return TrainState(
        step=meta["step"],
        total_steps=meta["total_steps"],
        skipped=list(meta.get("skipped", [])),
        skip_streak=int(meta.get("skip_streak", 0)),
    )


def prune_checkpoints(root: Path, keep: Path | None) -> None:
    """Delete checkpoints but ``keep``; the manifest goes first, so a half-deleted one is never used.

    ``keep`` (just written) is checked against its manifest first (every file present, sizes): a bad
    one raises ``CorruptArtifactError`` naming the file and the older checkpoints stay.
    """
    if keep is not None:
        try:
            verify_manifest(keep, checksums=False)
        except CorruptArtifactError:
            invalidate(keep)
            raise
    for p in root.glob("step_*"):
        if p != keep:
            (p / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(p, ignore_errors=True)


def save_final(train_dir: Path, student, tokenizer, info: dict, teacher: Teacher | None = None) -> Path:
    """The task's trained student as a plain HF directory (and optionally the teacher's weights), then
    the stage manifest (the stage is done). Every rank calls it; rank 0 writes. A LoRA student's adapter
    is merged into it (in memory too) and saved in peft's format in ``adapter/``."""
    teacher_state = teacher.state_dict() if teacher is not None else {}
    adapter = lora.state(student) if lora.attached(student) else {}
    weights = distributed.full_state(student) if distributed.is_sharded(student) else None
    if adapter:  # the stage's model is the merged one; the adapter is kept beside it
        peft_config = student.peft_config[lora.STUDENT]
        if weights is None:
            lora.merge_and_unload(student)  # in memory too: the next stage and evaluation read it
        else:  # sharded: merged from the gathered state (the run reloads the saved model)
            weights = lora.merged_state(student, weights) if distributed.current().main else {}
    student_state = weights if weights is not None else student.state_dict()
    ensure_finite(train_dir / "model", student=student_state, teacher=teacher_state, adapter=adapter)
    if not distributed.current().main:
        return train_dir / "model"
    with atomic_dir(train_dir / "model") as tmp:
        save_model(tmp, student, tokenizer, weights)
    if adapter:
        with atomic_dir(train_dir / "adapter") as tmp:
            lora.save_adapter(tmp, adapter, peft_config)
    if teacher_state:
        with atomic_dir(train_dir / "teacher") as tmp:
            save_teacher(tmp / "teacher.safetensors", teacher_state)
    # complete and checked first, then drop the checkpoints: a crash in between leaves only garbage,
    # never a state that a re-run would misread
    write_manifest(train_dir, info, exclude=("checkpoints",))
    try:
        verify_manifest(train_dir, checksums=False)
    except CorruptArtifactError:
        invalidate(train_dir)  # the checkpoints stay: a re-run resumes from them
        raise
    prune_checkpoints(train_dir / "checkpoints", keep=None)
    shutil.rmtree(train_dir / "checkpoints", ignore_errors=True)
    return train_dir / "model"
