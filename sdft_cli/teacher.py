"""The teacher's weights: an EMA of the student (the paper), the student frozen at the start of the task,
or the live student itself.

The EMA is an fp32 shadow updated after every optimizer step, phi <- alpha * theta + (1 - alpha) * phi;
in a distributed run it is sharded like the student and updated shard by shard.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from sdft_cli import distributed
from sdft_cli.models import load_model


class Teacher:
    """The teacher's weights: ``ema`` (an fp32 shadow of the student), ``frozen``, or ``live``.

    ``ema`` and ``frozen`` keep their own copy, initialised from the current student at the start of
    each task (not from the hub base); ``live`` is the student itself. In a distributed run the copy is
    sharded like the student (``shard``) and the EMA update runs shard by shard.
    """

    def __init__(self, kind: str, student: torch.nn.Module, alpha: float):
        self.kind, self.alpha = kind, alpha
        if kind == "live":
            self.model = student
            return
        self.model = copy.deepcopy(student).float()
        self.model.requires_grad_(False)
        self.model.eval()

    def shard(self, device: torch.device) -> None:
        """Shard an own copy over the process group, as ``distributed.shard`` does the student."""
        if self.kind != "live":
            distributed.shard(self.model, device)

    @torch.no_grad()
    def update(self, student: torch.nn.Module) -> None:
        """phi <- alpha * theta + (1 - alpha) * phi, after every optimizer step (ema only)."""
        if self.kind != "ema":
            return
        t = [distributed.local(p) for p in self.model.parameters()]
        s = [distributed.local(p.detach()).to(torch.float32) for p in student.parameters()]
        torch._foreach_lerp_(t, s, self.alpha)

    def load_weights(self, model_dir: Path, trust_remote_code: bool = False) -> None:
        """Replace a frozen or EMA teacher's weights by those of the HF directory ``model_dir``."""
        if self.kind == "live":
            raise ValueError("a live teacher is the student itself; it has no weights of its own")
        self.model.load_state_dict(load_model(model_dir, trust_remote_code=trust_remote_code).state_dict())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole teacher on the CPU (every rank takes part; ranks > 0 get ``{}``)."""
        return {} if self.kind == "live" else distributed.full_state(self.model)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the teacher; only tied aliases (saved once, under their twin's name) may be absent."""
        if self.kind == "live":
            return
        try:
            distributed.load_full_state(self.model, state)
        except RuntimeError as e:
            raise RuntimeError(f"teacher checkpoint does not match the model: {e}") from None
