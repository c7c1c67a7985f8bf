"""The teacher's weights: an EMA of the student (the paper), the student frozen at the start of the task,
or the live student itself.

The EMA is an fp32 shadow updated after every optimizer step, phi <- alpha * theta + (1 - alpha) * phi;
in a distributed run it is sharded like the student and updated shard by shard. With LoRA the teacher is
a second adapter of the student's own model (``lora.py``): the base weights are never copied, and
scoring switches the adapter for the teacher's forward pass (``scoring``).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from pathlib import Path

import torch

from sdft_cli import distributed, lora
from sdft_cli.errors import ConfigError
from sdft_cli.models import load_model


class Teacher:
    """The teacher's weights: ``ema`` (an fp32 shadow of the student), ``frozen``, or ``live``.

    ``ema`` and ``frozen`` keep their own copy, initialised from the current student at the start of
    each task (not from the hub base); ``live`` is the student itself. In a distributed run the copy is
    sharded like the student (``shard``) and the EMA update runs shard by shard.
    """

    def __init__(self, kind: str, student: torch.nn.Module, alpha: float):
        self.kind, self.alpha = kind, alpha
        # a LoRA student: the teacher is its second adapter, started equal to the student's
        self.adapter = kind != "live" and lora.attached(student)
        if kind == "live" or self.adapter:
            self.model = student
            if self.adapter:
                lora.copy_adapter(student, lora.STUDENT, lora.TEACHER)
                self._pairs = lora.teacher_and_student(student)
            return
        self.model = copy.deepcopy(student).float()
        self.model.requires_grad_(False)
        self.model.eval()

    def scoring(self):
        """The context of the teacher's forward pass: the teacher's adapter active (LoRA)."""
        return lora.active(self.model, lora.TEACHER) if self.adapter else nullcontext()

    def shard(self, device: torch.device) -> None:
        """Shard an own copy over the process group, as ``distributed.shard`` does the student."""
        if self.kind != "live" and not self.adapter:
            distributed.shard(self.model, device)

    @torch.no_grad()
    def update(self, student: torch.nn.Module) -> None:
        """phi <- alpha * theta + (1 - alpha) * phi, after every optimizer step (ema only)."""
        if self.kind != "ema":
            return
        if self.adapter:
            t, s = self._pairs
            torch._foreach_lerp_(t, [x.detach() for x in s], self.alpha)
            return
        t = [distributed.local(p) for p in self.model.parameters()]
        s = [distributed.local(p.detach()).to(torch.float32) for p in student.parameters()]
        torch._foreach_lerp_(t, s, self.alpha)

    def load_weights(self, model_dir: Path, trust_remote_code: bool = False) -> None:
        """Replace a frozen or EMA teacher's weights by those of the HF directory ``model_dir``."""
        if self.kind == "live":
            raise ValueError("a live teacher is the student itself; it has no weights of its own")
        if self.adapter:
            raise ConfigError(
                "a teacher from other weights (method.reinvoke) needs full fine-tuning: model.lora.r=0"
            )
        self.model.load_state_dict(load_model(model_dir, trust_remote_code=trust_remote_code).state_dict())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole teacher on the CPU (every rank takes part; ranks > 0 get ``{}``)."""
        if self.adapter:
            return lora.state(self.model, lora.TEACHER)
        return {} if self.kind == "live" else distributed.full_state(self.model)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the teacher; only tied aliases (saved once, under their twin's name) may be absent."""
        if self.kind == "live":
            return
        if self.adapter:
            lora.load_state(self.model, state, lora.TEACHER)
            return
        try:
            distributed.load_full_state(self.model, state)
        except RuntimeError as e:
            raise RuntimeError(f"teacher checkpoint does not match the model: {e}") from None
