"""LoRA through peft: the student's adapter, the teacher as a second adapter of the same model, and the
merged weights everything outside the training step reads.

Both adapters are injected into the one model (``peft.inject_adapter_in_model``), so the base weights
exist once. The student's adapter (``student``) is the only trainable tensor; the teacher's (``teacher``)
starts as a copy of it and follows it by EMA (``teacher.py``), in fp32. Scoring with the teacher switches
the active adapter for the forward pass (``active``), without touching ``requires_grad``. The EMA runs
on the factors A and B, as TRL's adapter teacher does, so the teacher's update BA is not the EMA of the
student's BA.

Stage models, decoders that keep their own copy of the weights, and vLLM read the merged weights
(``weight``, ``merged_state``): a LoRA run's artifacts are plain Hugging Face directories, with the
adapter itself saved beside them in peft's format (``save_adapter``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from sdft_cli.config import LoraConfig
from sdft_cli.distributed import full, local

STUDENT, TEACHER = "student", "teacher"
ADAPTER_FILE = "adapter_model.safetensors"
# the "step" of a task's RNG stream (schedule.step_seed) that draws its fresh adapter
SEED_STEP = 2**31 - 1


def _peft_config(cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
    )


def layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The model's LoRA layers, by module name."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def attached(model: torch.nn.Module) -> bool:
    return bool(layers(model))


def attach(model: torch.nn.Module, cfg: LoraConfig, teacher: bool = True, seed: int | None = None) -> None:
    """Inject a fresh student adapter (A random, B zero: the model's function is unchanged) and, with
    ``teacher``, a teacher adapter equal to it. Only the student's adapter is trainable. ``seed``: A's
    draw depends on it alone, not on whatever used the global RNG before (a resumed run skips work)."""
    from peft import inject_adapter_in_model

    pc = _peft_config(cfg)
    try:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            inject_adapter_in_model(pc, model, adapter_name=STUDENT)
    except ValueError as e:  # no module matched
        from sdft_cli.errors import ConfigError

        raise ConfigError(f"model.lora.target_modules={list(cfg.target_modules)}: {e}") from None
    if teacher:
        with warnings.catch_warnings():  # "multiple adapters in the model": the point
            warnings.simplefilter("ignore", UserWarning)
            inject_adapter_in_model(pc, model, adapter_name=TEACHER)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, m in layers(model):
        m.set_adapter(STUDENT)  # student trainable, teacher frozen
    for p in _adapter_params(model, STUDENT).values():
        p.data = p.data.float()  # adapters train in fp32 over bf16 base weights
    if teacher:
        for p in _adapter_params(model, TEACHER).values():
            p.data = p.data.float()
        copy_adapter(model, STUDENT, TEACHER)


def _adapter_params(model: torch.nn.Module, adapter: str) -> dict[str, torch.nn.Parameter]:
    """The adapter's tensors under names without the adapter's own (``...q_proj.lora_A.weight``), so the
    student's and the teacher's line up and a file saved from one loads into the other."""
    out = {}
    for name, m in layers(model):
        for part in ("lora_A", "lora_B"):
            sub = getattr(m, part)
            if adapter in sub:
                out[f"{name}.{part}.weight"] = sub[adapter].weight
    return out


def state(model: torch.nn.Module, adapter: str = STUDENT) -> dict[str, torch.Tensor]:
    """The adapter's weights on the CPU (fp32)."""
    return {k: full(p.detach()).cpu().clone() for k, p in _adapter_params(model, adapter).items()}


@torch.no_grad()
def load_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], adapter: str = STUDENT) -> None:
    """Load ``state``'s output into the adapter; names and shapes must match exactly."""
    params = _adapter_params(model, adapter)
    missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or extra:
        raise RuntimeError(
            f"adapter state does not match the model: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for k, p in params.items():
        if p.shape != tensors[k].shape:
            raise RuntimeError(f"adapter state does not match the model: {k} {tuple(tensors[k].shape)}")
        t = tensors[k].to(p.dtype)
        if hasattr(p, "device_mesh"):  # a DTensor: this rank's shard of the whole tensor
            from torch.distributed.tensor import distribute_tensor

            t = distribute_tensor(t.to(p.device), p.device_mesh, p.placements)
        p.copy_(t)


@torch.no_grad()
def copy_adapter(model: torch.nn.Module, src: str, dst: str) -> None:
    a, b = _adapter_params(model, src), _adapter_params(model, dst)
    torch._foreach_copy_([local(b[k]) for k in a], [local(a[k]) for k in a])


def teacher_and_student(model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The teacher's and the student's adapter tensors, paired (for the EMA update)."""
    s, t = _adapter_params(model, STUDENT), _adapter_params(model, TEACHER)
    return [local(t[k]) for k in s], [local(s[k]) for k in s]


@contextmanager
def active(model: torch.nn.Module, adapter: str) -> Iterator[None]:
    """Run the model's forward with ``adapter`` instead of the student's. Unlike peft's ``set_adapter``
    this leaves ``requires_grad`` alone, so it can wrap a no-grad teacher pass inside a training step."""
    saved = [(m, m._active_adapter) for _, m in layers(model)]
    for m, _ in saved:
        m._active_adapter = [adapter]
    try:
        yield
    finally:
        for m, a in saved:
            m._active_adapter = a


def weight(module: torch.nn.Module) -> torch.Tensor:
    """A linear layer's effective weight: a LoRA layer's base weight plus its active adapters' deltas."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer):
        return module.weight
    w = module.get_base_layer().weight
    if module.disable_adapters or module.merged:
        return w
    w = full(w.detach())  # whole tensors when sharded (every rank calls it)
    with torch.no_grad():
        for a in module.active_adapters:
            if a in module.lora_A:
                b_, a_ = full(module.lora_B[a].weight.detach()), full(module.lora_A[a].weight.detach())
                w = w + (module.scaling[a] * (b_ @ a_)).to(w.dtype)
    return w


def merged_state(
    model: torch.nn.Module, state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The model's weights under the base model's names with the active adapter folded in: what a
    model without LoRA would hold (stage models, vLLM pushes, rollout directories). The model's own
    state otherwise. ``state``: the model's whole state already gathered (a sharded model)."""
    lora = dict(layers(model))
    state = model.state_dict() if state is None else state
    if not lora:
        return state
    out = {}
    for k, v in state.items():
        if ".lora_" in k:
            continue
        mod, _, leaf = k.rpartition(".base_layer.")
        if mod in lora:
            k = f"{mod}.{leaf}"
            if leaf == "weight":
                name = lora[mod].active_adapters[0]  # the student's, or the teacher's while it samples
                b_, a_ = state[f"{mod}.lora_B.{name}.weight"], state[f"{mod}.lora_A.{name}.weight"]
                delta = lora[mod].scaling[name] * (full(b_.detach()) @ full(a_.detach()))
                v = full(v.detach()) + delta.to(v.dtype)
        out[k] = v.detach()
    return out


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base weights under the base model's names, no adapter folded in (what vLLM's own LoRA path
    adds the adapter to)."""
    return {
        k.replace(".base_layer.", "."): v.detach() for k, v in model.state_dict().items() if ".lora_" not in k
    }


def base_version(model: torch.nn.Module) -> tuple:
    """Changes whenever a base weight is replaced or modified in place (a merge between tasks), so an
    engine holding the base weights knows when to take them again."""
    return tuple((p.data_ptr(), p._version) for n, p in model.named_parameters() if ".lora_" not in n)


def active_adapter(model: torch.nn.Module) -> str:
    return layers(model)[0][1].active_adapters[0]


@torch.no_grad()
def merge_and_unload(model: torch.nn.Module, adapter: str = STUDENT) -> None:
    """Fold ``adapter`` into the base weights and put the plain linear layers back (the other adapters
    go with them): the model is the plain model the stage saves."""
    for name, m in layers(model):
        if adapter in m.lora_A:
            base = m.get_base_layer()
            base.weight.add_(m.get_delta_weight(adapter).to(base.weight.dtype))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, m.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        model.__dict__.pop(attr, None)


def save_adapter(out: Path, tensors: dict[str, torch.Tensor], peft_config) -> None:
    """An adapter (``state``'s output) in peft's format: ``PeftModel.from_pretrained(base, out)`` loads
    it; ``peft_config`` is the peft LoraConfig it was injected with (``model.peft_config[STUDENT]``)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    named = {f"base_model.model.{k}": v.contiguous() for k, v in tensors.items()}
    save_file(named, str(out / ADAPTER_FILE), metadata={"format": "pt"})
    pc = peft_config.to_dict()
    pc["target_modules"] = sorted(pc["target_modules"])
    (out / "adapter_config.json").write_text(json.dumps(pc, indent=2, default=str))


def load_adapter(model: torch.nn.Module, path: Path, adapter: str = STUDENT) -> None:
    """Load an adapter saved by ``save_adapter`` (peft's format) into ``adapter``."""
    from safetensors.torch import load_file

    tensors = {k.removeprefix("base_model.model."): v for k, v in load_file(str(path / ADAPTER_FILE)).items()}
    load_state(model, tensors, adapter)


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
