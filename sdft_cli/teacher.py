"""The teacher's weights: an EMA of the student (the paper), the student frozen at the start of the task,
or the live student itself.

The EMA is an fp32 shadow updated after every optimizer step, phi <- alpha * theta + (1 - alpha) * phi;
in a distributed run it is sharded like the student and updated shard by shard. ``method.teacher_storage=
cpu`` keeps that shadow in host memory on a GPU run: its forward streams each module's weights to the GPU
just before the module runs, and the EMA update reads the student back. With LoRA the teacher is
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

    def __init__(self, kind: str, student: torch.nn.Module, alpha: float, host: bool = False):
        self.kind, self.alpha = kind, alpha
        # a LoRA student: the teacher is its second adapter, started equal to the student's
        self.adapter = kind != "live" and lora.attached(student)
        self.device = next(student.parameters()).device
        self.host = host and kind != "live" and not self.adapter
        if kind == "live" or self.adapter:
            self.model = student
            if self.adapter:
                lora.copy_adapter(student, lora.STUDENT, lora.TEACHER)
                self._pairs = lora.teacher_and_student(student)
            return
        if self.host:  # copied straight into (pinned) host memory, never a second copy on the device
            memo = {id(p): _host_parameter(p) for p in student.parameters()}
            self.model = copy.deepcopy(student, memo)
        else:
            self.model = copy.deepcopy(student).float()
        self.model.requires_grad_(False)
        self.model.eval()

    def scoring(self):
        """The context of the teacher's forward pass: the teacher's adapter active (LoRA), or its
        host-resident weights streamed to the device module by module."""
        if self.host:
            return _swapped_weights(self.model, lambda p: p.data.to(self.device, non_blocking=True))
        return lora.active(self.model, lora.TEACHER) if self.adapter else nullcontext()

    def head(self):
        """The teacher's output head (read after its forward: a sharded root is gathered then)."""
        from sdft_cli.forward import output_head

        if self.host:
            head = output_head(self.model)[0]
            head.weight = head.weight.to(self.device, non_blocking=True)
            if head.bias is not None:
                head.bias = head.bias.to(self.device, non_blocking=True)
            return head
        with self.scoring():
            return output_head(self.model)[0]

    def follow(self, opt) -> None:
        """Nothing: this teacher is updated after the step (``update``)."""

    def shard(self, device: torch.device) -> None:
        """Shard an own copy over the process group, as ``distributed.shard`` does the student."""
        if self.host:
            raise ConfigError("method.teacher_storage=cpu in a multi-process run is not supported yet")
        if self.adapter:  # sharding replaced the parameters: pair the new ones
            self._pairs = lora.teacher_and_student(self.model)
        elif self.kind != "live":
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
        if self.host:  # one tensor at a time back to the host: no second copy of the student anywhere
            for ti, p in zip(t, student.parameters(), strict=True):
                ti.lerp_(p.detach().to("cpu", torch.float32), self.alpha)
            return
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


class OffsetTeacher:
    """An EMA or frozen teacher stored as a bf16 offset from the student (``method.teacher_storage=
    offset``): phi = theta + delta. Half the memory of an fp32 copy, and unlike a bf16 copy of phi it
    keeps the EMA's small steps: delta is the teacher's distance from the student, so bf16's relative
    precision applies to that distance, not to the weights.

    The offset follows the student inside the optimizer step, tensor by tensor (``optim.AdamW``'s
    ``on_update``): phi' = alpha theta' + (1 - alpha) phi gives delta' = (1 - alpha)(delta + theta -
    theta'), rounded stochastically to bf16 (frozen: alpha = 0). Scoring runs the student's own modules
    with theta + delta formed one module at a time (forward hooks), and the output head's weight formed
    once per micro-batch (``head``), so no second copy of the weights is ever resident.
    """

    adapter = False

    def __init__(self, kind: str, student: torch.nn.Module, alpha: float):
        if kind not in ("ema", "frozen"):
            raise ConfigError(f"method.teacher_storage=offset is for an ema or frozen teacher, not {kind}")
        self.kind, self.model = kind, student
        self.alpha = alpha if kind == "ema" else 0.0
        self.names = {p: n for n, p in student.named_parameters()}  # tied weights: the first name
        self.delta = {p: torch.zeros_like(p, dtype=torch.bfloat16) for p in self.names}

    def follow(self, opt) -> None:
        """Update the offset inside ``opt``'s step (an ``optim.AdamW``)."""
        if not hasattr(opt, "on_update"):
            raise TypeError(
                "an offset teacher needs the per-tensor optimizer (build_optimizer(per_tensor=True))"
            )
        opt.on_update = self._follow

    @torch.no_grad()
    def _follow(
        self, p: torch.Tensor, sl: slice, old: torch.Tensor, step: int, index: int, part: int
    ) -> None:
        from sdft_cli.optim import _round_stochastic

        d = self.delta[p].view(-1)[sl]
        new = (d.float() + old - p.view(-1)[sl]).mul_(1.0 - self.alpha)
        d.copy_(_round_stochastic(new, 1, step, index, part))

    def update(self, student: torch.nn.Module) -> None:
        """Nothing: the offset moved inside the optimizer step."""

    def shard(self, device: torch.device) -> None:
        raise ConfigError("method.teacher_storage=offset in a multi-process run is not supported yet")

    def scoring(self):
        return _swapped_weights(self.model, lambda p: p.data + self.delta[p].to(p.dtype), self.delta)

    def head(self):
        from sdft_cli.forward import output_head

        head, _ = output_head(self.model)
        w = head.weight
        head.weight = w.detach() + self.delta[w].to(w.dtype) if w in self.delta else w.detach()
        return head

    def load_weights(self, model_dir: Path, trust_remote_code: bool = False) -> None:
        raise ConfigError("a teacher from other weights (method.reinvoke) needs method.teacher_storage=copy")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {self.names[p]: d.clone() for p, d in self.delta.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names.values() if n not in state]
        if missing:
            raise RuntimeError(f"teacher checkpoint does not match the model: missing {missing[:3]}")
        for p, n in self.names.items():
            self.delta[p].copy_(state[n])


def _host_parameter(p: torch.nn.Parameter) -> torch.nn.Parameter:
    t = p.detach().to("cpu", torch.float32, copy=True)
    return torch.nn.Parameter(t.pin_memory() if torch.cuda.is_available() else t, requires_grad=False)


class _swapped_weights:
    """While active, every module computes with ``make(p)`` for its own parameters (those in ``only``,
    when given): a forward pre-hook swaps each parameter's data for it, the forward hook swaps it back,
    so one module's replacement exists at a time (theta + delta for the offset teacher, a device copy of
    a host-resident teacher)."""

    def __init__(self, model: torch.nn.Module, make, only: dict | None = None):
        self.model, self.make, self.only, self.handles, self.saved = model, make, only, [], {}

    def _pre(self, module, args):
        for p in module.parameters(recurse=False):
            if (self.only is None or p in self.only) and p not in self.saved:
                self.saved[p] = p.data
                p.data = self.make(p)

    def _post(self, module, args, out):
        for p in module.parameters(recurse=False):
            if p in self.saved:
                p.data = self.saved.pop(p)

    def __enter__(self):
        for m in self.model.modules():
            if any(True for _ in m.parameters(recurse=False)):
                self.handles.append(m.register_forward_pre_hook(self._pre))
                self.handles.append(m.register_forward_hook(self._post))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        for p, data in self.saved.items():
            p.data = data
        self.saved.clear()
        return False


def make_teacher(kind: str, student: torch.nn.Module, alpha: float, storage: str = "copy"):
    """``Teacher`` (an fp32 copy, in host memory with ``storage=cpu``; the student itself; or a LoRA
    adapter) or ``OffsetTeacher``."""
    if storage == "offset" and not lora.attached(student):
        return OffsetTeacher(kind, student, alpha)
    return Teacher(kind, student, alpha, host=storage == "cpu")
