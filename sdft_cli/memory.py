"""The memory plan: peak memory per device for a config, before anything is launched.

Persistent training state is counted exactly from the architecture (parameters, trainable parameters,
their dtypes, the chosen options). Activations are not estimated by a formula: the student's decoder
runs on fake tensors (``torch._subclasses.FakeTensorMode``: shapes and dtypes, no memory) at the
configured micro-batch and longest lengths, under the run's autocast, and every tensor autograd saves for
the backward pass is counted once per storage: the real graph, bf16 weight casts included. Two depths
(two and three blocks) give the per-block and the outside-the-blocks shares, so the trace costs the same
for a 7B model as for a tiny one, and gradient checkpointing is the same trace with one block kept.

The peak is the largest of three phases: rollout (the engine's copy and KV cache beside the weights,
optimizer state and teacher), update (gradients, activations, the backward's working set, the loss's
chunk buffers) and the optimizer step (its per-tensor temporaries). On a CPU the figure is the process's
resident set, so it includes the Python process with torch and transformers loaded (``RUNTIME_CPU``,
measured here); on a GPU, the CUDA context. ``scripts/bench_memory.py`` compares plans with measured
peaks (docs/memory.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sdft_cli import lora
from sdft_cli.config import Config, SDFTConfig
from sdft_cli.optim import CHUNK
from sdft_cli.precision import DTYPES, autocast_dtype

GiB = 2**30
# The resident set of `sdft run` before the model loads (Python, torch, transformers, datasets, the
# tokenizer and task rows), measured on this CPU by scripts/bench_memory.py.
RUNTIME_CPU = 0.55 * GiB
# A CUDA context with cuBLAS/cuDNN handles and the caching allocator's slack (not measured here).
RUNTIME_CUDA = 1.0 * GiB


@dataclass
class Lengths:
    """The longest sequences one micro-batch holds, in tokens."""

    student_context: int
    teacher_context: int
    completion: int


@dataclass
class MemoryPlan:
    device: str  # cpu or cuda
    parts: dict[str, float] = field(default_factory=dict)  # bytes of each part at its own phase's peak
    phases: dict[str, float] = field(default_factory=dict)  # bytes resident at each phase's peak
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.__getitem__)


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _fake_model(arch, layers: int, lora_cfg, mode):
    """``arch`` at ``layers`` blocks, its weights fake CPU tensors (built on the meta device, where peft
    can inject adapters, then wrapped)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from transformers import AutoModelForCausalLM

    d = arch.to_dict()
    depth = d["num_hidden_layers"]
    # per-layer lists (layer_types, ...) follow the depth
    d = {k: v[:layers] if isinstance(v, list) and len(v) == depth else v for k, v in d.items()}
    arch = type(arch).from_dict({**d, "num_hidden_layers": layers})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(arch)
        if lora_cfg is not None and lora_cfg.r:
            lora.attach(model, lora_cfg, teacher=False)
    cpu = torch.device("cpu")
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            fake = torch.nn.Parameter(FakeTensor(mode, param.data, cpu), requires_grad=param.requires_grad)
            setattr(module, name, fake)
        for name, buf in list(module.named_buffers(recurse=False)):
            module._buffers[name] = FakeTensor(mode, buf, cpu)
    model.train()
    return model


def _saved_bytes(model, rows: int, length: int, amp: torch.dtype | None) -> int:
    """Bytes autograd saves for backward in one forward of ``model``'s decoder (weights excluded)."""
    own = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st._cdata not in own:
            saved[st._cdata] = max(saved.get(st._cdata, 0), st.nbytes())
        return t

    ids = torch.zeros(rows, length, dtype=torch.long)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, 0] = 0  # left padding, as training batches have: the attention mask is materialised
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            decoder = model.get_decoder()
            out = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    del out
    return sum(saved.values())


def trace_activations(
    arch, rows: int, length: int, amp: torch.dtype | None, lora_cfg=None
) -> tuple[int, int]:
    """(bytes saved per decoder block, the rest) for ``rows`` x ``length`` tokens: saved bytes are
    ``rest + blocks * per_block`` for two blocks and more. Traced at two and three blocks: the first
    block differs from the others when the embeddings do not train (LoRA: its input needs no gradient),
    so ``rest`` may be negative."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    two_blocks, three_blocks = (_fake_model(arch, n, lora_cfg, mode) for n in (2, 3))
    with mode:
        two = _saved_bytes(two_blocks, rows, length, amp)
        three = _saved_bytes(three_blocks, rows, length, amp)
    return three - two, 3 * two - 2 * three


def _shape(arch) -> dict:
    text = getattr(arch, "text_config", None) or arch
    heads = text.num_attention_heads
    return {
        "hidden": text.hidden_size,
        "layers": text.num_hidden_layers,
        "kv_heads": getattr(text, "num_key_value_heads", None) or heads,
        "head_dim": getattr(text, "head_dim", None) or text.hidden_size // heads,
        "vocab": text.vocab_size,
        "tied": bool(getattr(arch, "tie_word_embeddings", False)),
    }


def _largest_tensor(arch, shape: dict) -> int:
    text = getattr(arch, "text_config", None) or arch
    return max(shape["vocab"] * shape["hidden"], text.intermediate_size * shape["hidden"])


def memory_plan(
    cfg: Config,
    arch,
    params: int,
    trainable: int,
    lengths: Lengths,
    device: str = "cpu",
    device_gib: float | None = None,
    processes: int = 1,
) -> MemoryPlan:
    """Peak bytes per device for ``cfg`` on a model of architecture ``arch`` (a transformers config);
    ``processes`` > 1: FSDP2 shards weights, gradients, optimizer state and the teacher over them."""
    method = cfg.method
    sdft = isinstance(method, SDFTConfig)
    shape = _shape(arch)
    wdtype = DTYPES[cfg.model.dtype]
    wb = _bytes(wdtype)
    if device == "cuda":  # every current GPU has bf16 autocast
        amp = torch.bfloat16 if cfg.model.precision != "fp32" else None
    else:
        amp = autocast_dtype(cfg.model.precision, torch.device("cpu"))
    use_lora = bool(cfg.model.lora.r)
    plan = MemoryPlan(device)
    p = plan.parts

    # ------------------------------------------------------------------ persistent state
    p["runtime"] = RUNTIME_CUDA if device == "cuda" else RUNTIME_CPU
    tb = 4 if use_lora else wb  # adapters are fp32 (peft casts them up from a bf16 base)
    p["weights"] = params * wb + (trainable * 4 if use_lora else 0)  # LoRA: base + the student adapter
    p["gradients"] = trainable * tb
    storage = getattr(method, "teacher_storage", "copy")
    per_tensor = method.optim.moments == "bf16" or storage == "offset"  # sdft_cli/optim.py's AdamW
    if method.optim.moments == "bf16":
        p["optimizer"] = trainable * 4
    else:  # torch's AdamW keeps the moments in the weights' dtype, ours (per tensor) in fp32
        p["optimizer"] = trainable * (8 if per_tensor else 2 * tb)
    teacher_kind = getattr(method, "teacher", "live") if sdft else "none"
    if teacher_kind in ("ema", "frozen"):
        if use_lora:
            p["teacher"] = trainable * 4  # a second adapter
        elif storage == "offset":
            p["teacher"] = params * 2  # the bf16 offset
        elif storage == "cpu" and device == "cuda":
            p["teacher"] = 0.0  # in host memory; its forward streams one module at a time
            plan.notes.append(f"the EMA teacher is in host memory: {params * 4 / GiB:.2f} GiB of RAM")
        else:
            p["teacher"] = params * 4  # an fp32 copy, whatever the student's dtype
    else:
        p["teacher"] = 0
    if processes > 1:
        for k in ("weights", "gradients", "optimizer", "teacher"):
            p[k] /= processes
        # one block gathered whole for its forward or backward, and the next one prefetched
        p["weights"] += 2 * (params - 2 * shape["vocab"] * shape["hidden"]) / shape["layers"] * wb
        plan.notes.append(f"FSDP2 over {processes} processes: each holds 1/{processes} of the state")
    resident = sum(p.values())

    # ------------------------------------------------------------------ update: activations and the loss
    rows = method.micro_batch_size
    seq = lengths.student_context + lengths.completion
    per_block, outside = trace_activations(arch, rows, seq, amp, cfg.model.lora if use_lora else None)
    if method.gradient_checkpointing:  # each block keeps its input; one block's graph is rebuilt at a time
        block_in = rows * seq * shape["hidden"] * wb  # the residual stream, in the weights dtype
        p["activations"] = outside + shape["layers"] * block_in + per_block
    else:
        p["activations"] = outside + shape["layers"] * per_block
    ab = _bytes(amp) if amp is not None else wb
    tokens = rows * lengths.completion
    chunk = method.loss_chunk_size or tokens
    chunk = min(chunk, tokens)
    # the fused loss: student and teacher logits of one chunk and their softmax terms (fp32), the
    # hidden-state gradient; the head's weight gradient when the head trains (tied or not)
    head_trains = not use_lora
    loss = chunk * shape["vocab"] * (3 * 4 + 2 * ab)
    loss += tokens * shape["hidden"] * 4 * 2  # grad_h and the teacher's hidden states
    if head_trains:
        loss += shape["vocab"] * shape["hidden"] * 4
    p["loss"] = loss
    # the backward's working set: one block's activation gradients beside its saved tensors
    p["backward"] = per_block
    # the teacher's own forward holds one block's activations at a time (no graph)
    teacher_seq = lengths.teacher_context + lengths.completion if sdft else 0
    update = resident + p["activations"] + p["loss"] + p["backward"]
    teacher_fwd = rows * teacher_seq * shape["hidden"] * ab * 8
    if teacher_kind in ("ema", "frozen") and storage == "cpu" and device == "cuda" and not use_lora:
        # the streamed module (the embedding is the largest) and the head's weight, both fp32
        teacher_fwd += 2 * shape["vocab"] * shape["hidden"] * 4

    # ------------------------------------------------------------------ rollout
    n = getattr(method, "rollouts_per_prompt", 1) if sdft else 1
    seqs = min(cfg.rollout.batch_size, method.prompts_per_step * n)
    rdtype = amp if cfg.rollout.dtype == "auto" else DTYPES[cfg.rollout.dtype]
    rdtype = rdtype or wdtype
    rb = _bytes(rdtype)
    kv = seqs * (lengths.student_context + lengths.completion) * shape["layers"] * 2
    kv *= shape["kv_heads"] * shape["head_dim"] * rb
    engine = 0.0
    if not sdft:
        kv = 0
    elif cfg.rollout.backend == "vllm":
        if device == "cuda" and device_gib:
            engine = cfg.rollout.vllm.gpu_memory_utilization * device_gib * GiB
            kv = 0  # inside the engine's share
        plan.notes.append(
            "vLLM: its share is rollout.vllm.gpu_memory_utilization of the device (weights and KV cache)"
            + ("; asleep while the trainer runs (rollout.vllm.sleep)" if cfg.rollout.vllm.sleep else "")
        )
    elif rdtype != wdtype:
        engine = params * rb  # the decoder's own copy in the rollout dtype (LoRA: merged)
    p["rollout_engine"] = engine
    p["kv_cache"] = kv
    logits = seqs * shape["vocab"] * 4 * 2
    rollout = resident - p["gradients"] + engine + kv + logits  # gradients are freed after each step
    if cfg.rollout.backend == "vllm" and not cfg.rollout.vllm.sleep:
        update += engine  # awake, the engine keeps its share while the trainer runs

    # ------------------------------------------------------------------ optimizer step
    # torch's fused AdamW updates in place; ours holds one slice's fp32 moments, update and rounding
    # noise at a time (optim.CHUNK elements, or the largest tensor when smaller)
    if per_tensor and not use_lora:
        span = min(_largest_tensor(arch, shape), CHUNK)
        opt_tmp = span * 4 * (6 if method.optim.moments == "bf16" else 3) + CHUNK * 4  # + the noise table
    else:
        opt_tmp = 0.0
    p["optimizer_step"] = opt_tmp
    step = resident + opt_tmp
    plan.phases = {"rollout": rollout, "update": max(update, resident + teacher_fwd), "optimizer": step}
    return plan


def render_memory(plan: MemoryPlan, device_gib: float | None = None) -> list[str]:
    """The plan's lines for ``sdft plan``: each part, each phase, and whether it fits."""
    p = plan.parts

    def g(v: float) -> str:
        return f"{v / GiB:7.2f} GiB"

    runtime = "the CUDA context" if plan.device == "cuda" else "the Python process (torch, transformers)"
    lines = [
        f"memory plan, per {plan.device.upper()} device (peak in the {plan.peak_phase} phase):",
        f"  runtime          {g(p['runtime'])}  {runtime}",
        f"  weights          {g(p['weights'])}",
        f"  gradients        {g(p['gradients'])}  (update and optimizer phases)",
        f"  optimizer state  {g(p['optimizer'])}",
        f"  teacher          {g(p['teacher'])}",
        f"  activations      {g(p['activations'])}  (traced at the micro-batch and longest lengths)",
        f"  backward         {g(p['backward'])}  (one block's working set)",
        f"  loss buffers     {g(p['loss'])}  (one chunk's logits, the head's gradient)",
        f"  rollout engine   {g(p['rollout_engine'])}  (rollout phase)",
        f"  KV cache         {g(p['kv_cache'])}  (rollout phase)",
        f"  optimizer step   {g(p['optimizer_step'])}  (per-tensor temporaries)",
        "  phases: " + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in plan.phases.items()),
        f"  peak: {plan.peak / GiB:.2f} GiB",
    ]
    if device_gib:
        fits = plan.peak <= device_gib * GiB
        lines.append(
            f"  fits {device_gib:g} GiB: {'yes' if fits else 'NO'} "
            f"({100 * plan.peak / (device_gib * GiB):.0f}% of the device)"
        )
    lines += [f"  note: {n}" for n in plan.notes]
    return lines
