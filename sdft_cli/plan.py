"""``sdft plan``: what a config will do, before any GPU time is spent.

Reads the task data (the real loading path) and the model's config only, never its weights: the
parameter count comes from instantiating the architecture on the meta device. The compute estimate
counts every completion (rollout, demonstration, evaluation) at the task's maximum completion length
and prompts not at all: 2N FLOPs per generated or scored token, 6N per trained token, divided by an
effective throughput the user states (``tflops``). It sizes a job; it does not time one.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdft_cli import lora
from sdft_cli.artifacts import cache_dir
from sdft_cli.config import Config, SDFTConfig, SFTReinvokeConfig
from sdft_cli.errors import ConfigError, SdftError
from sdft_cli.memory import Lengths, MemoryPlan, memory_plan
from sdft_cli.models import load_config
from sdft_cli.prior import runs_at
from sdft_cli.schedule import steps_per_task
from sdft_cli.tasks import load_task


@dataclass
class TaskPlan:
    name: str
    n_train: int | None
    n_test: int | None
    steps: int | None
    completions: int  # trained completions: SDFT rollouts, SFT demonstrations
    train_tokens: int  # max tokens per trained completion (rollout.max_new_tokens for SDFT)
    eval_tokens: int  # max tokens per evaluation completion (the task's max_new_tokens)
    test_excluded: int = 0  # exclude_train_overlap: test-pool questions that are training questions
    generations: int = 0  # completions sampled for training: every step's, or a fixed teacher set once
    n_val: int | None = 0  # validation rows (periodic evaluation, select=best_val)
    periodic: int = 0  # periodic evaluations during the task (eval.every_steps)


def _model_dir(cfg: Config):
    """Where the model's config and tokenizer are, without building or converting anything; None when
    they are not here (tiny models answer with their config instead: see ``_arch``)."""
    if cfg.model.source == "hf":
        return cfg.model.path
    if cfg.model.source == "smollm2":
        return cache_dir() / "models" / "smollm2-135m-instruct-hf"
    return None


def _arch(cfg: Config):
    """The model's transformers config, or None when it is not local (a hub id offline, toy models)."""
    if cfg.model.source == "tiny_random":
        from sdft_cli.builders import build_tiny_tokenizer, llama_config

        return llama_config(cfg.model.tiny, build_tiny_tokenizer())
    path = _model_dir(cfg)
    if path is None:
        return None
    try:
        return load_config(path, cfg.model.trust_remote_code)
    except (OSError, ValueError, ConfigError):  # not downloaded, or a hub id offline
        return None


def _meta_model(cfg: Config):
    """The model's architecture on the meta device (no weights), or None when its config is not here."""
    import torch
    from transformers import AutoModelForCausalLM

    arch = _arch(cfg)
    if arch is None:
        return None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(arch)


def count_parameters(cfg: Config) -> int | None:
    """Parameters of the model's architecture, from its config alone (None when it cannot be read)."""
    model = _meta_model(cfg)
    return None if model is None else sum(p.numel() for p in model.parameters())


def count_trainable(cfg: Config) -> int | None:
    """The parameters the optimizer updates: all of them, or with ``model.lora`` the student adapter's
    (injected by peft into the meta model, so the count is peft's own)."""
    if not cfg.model.lora.r:
        return count_parameters(cfg)
    model = _meta_model(cfg)
    if model is None:
        return None
    lora.attach(model, cfg.model.lora, teacher=False)
    return lora.trainable_parameters(model)


def plan(cfg: Config, params: float | None = None, trainable: float | None = None) -> dict:
    """The plan as a dict: per-task sizes and steps, evaluation calls, FLOPs (when the size is known)."""
    method = cfg.method
    sdft = isinstance(method, SDFTConfig)
    n = method.rollouts_per_prompt if sdft else 1
    # a fixed set of teacher outputs, sampled once per task (offline distillation, SFT on teacher outputs)
    fixed = getattr(method, "teacher_samples", "") == "fixed" or getattr(method, "targets", "") == "teacher"
    sampled = sdft or fixed
    every = cfg.eval.every_steps
    tasks = []
    for name, tcfg in cfg.task.items():
        try:
            task = load_task(name, tcfg, train=True, max_test=cfg.eval.max_items)
            n_train, n_test, excluded = len(task.train), len(task.test), task.excluded
            n_val: int | None = len(task.val)
            steps = steps_per_task(method, n_train)
        except SdftError:
            n_train = n_test = n_val = steps = None
            excluded = 0
        train_tokens = (cfg.rollout.max_new_tokens if sampled else None) or tcfg.max_new_tokens
        completions = (steps or 0) * method.prompts_per_step * n
        plan_ = TaskPlan(
            name, n_train, n_test, steps, completions, train_tokens, tcfg.max_new_tokens, excluded
        )
        plan_.generations = (n_train or 0) * n if fixed else (completions if sdft else 0)
        plan_.n_val = n_val
        if every and steps:
            plan_.periodic = steps // every + (1 if steps % every else 0)
        tasks.append(plan_)
    probes = {}
    for name, pcfg in cfg.eval.probes.items():
        try:
            probes[name] = len(load_task(name, pcfg, train=False, max_test=cfg.eval.max_items).test)
        except SdftError:
            probes[name] = None
    reinvoke = None
    if isinstance(method, SFTReinvokeConfig):  # after each task's SFT: on-policy steps on general prompts
        r = method.reinvoke
        reinvoke = {
            "steps_per_task": r.steps,
            "completions": r.steps * method.prompts_per_step * len(tasks),
            "max_tokens": r.prompts.max_new_tokens,
        }
    stages = len(tasks) + 1
    evals_val = sum(t.periodic * (t.n_val or 0) for t in tasks)  # validation rows scored, all stages
    evals = sum(t.periodic for t in tasks)  # periodic evaluations, all stages
    if cfg.curriculum == "joint" and all(t.n_train for t in tasks):
        # one stage on every task's rows: the steps of their union, shared in proportion to the rows
        stages, rows = 2, sum(t.n_train or 0 for t in tasks)
        joint = steps_per_task(method, rows)
        for t in tasks:
            t.steps = round(joint * (t.n_train or 0) / rows)
            t.completions = t.steps * method.prompts_per_step * n
            t.generations = (t.n_train or 0) * n if fixed else (t.completions if sdft else 0)
            t.periodic = 0
        evals = joint // every + (1 if joint % every else 0) if every else 0
        evals_val = evals * sum(t.n_val or 0 for t in tasks)  # each joint evaluation scores every task's
    per_stage = sum(t.n_test or 0 for t in tasks) + sum(n or 0 for n in probes.values())
    passk = cfg.eval.pass_at_k.n * sum(t.n_test or 0 for t in tasks) if cfg.eval.pass_at_k.k else 0
    # each periodic evaluation: the stage's validation rows, and as eval.periodic asks every test and probe
    also = ("test" in cfg.eval.periodic) * sum(t.n_test or 0 for t in tasks)
    also += ("probes" in cfg.eval.periodic) * sum(v or 0 for v in probes.values())
    periodic = ("val" in cfg.eval.periodic) * evals_val + evals * also
    out = {
        "method": method.name,
        "model": cfg.model.name,
        "curriculum": cfg.curriculum,
        "tasks": [t.__dict__ for t in tasks],
        "probes": probes,
        "eval_stages": stages,
        "eval_generations": stages * (per_stage + passk) + periodic,
        "periodic_generations": periodic,
        "optimizer_steps": sum(t.steps or 0 for t in tasks)
        + (reinvoke["steps_per_task"] * len(tasks) if reinvoke else 0),
        "rollout_tokens": sum(t.generations * t.train_tokens for t in tasks)
        + (reinvoke["completions"] * reinvoke["max_tokens"] if reinvoke else 0),
        "reinvoke": reinvoke,
        "params": params,
        "trainable_params": trainable,
        "lora": (
            {
                "r": cfg.model.lora.r,
                "alpha": cfg.model.lora.alpha,
                "between_tasks": cfg.model.lora.between_tasks,
            }
            if cfg.model.lora.r
            else None
        ),
        "lm_eval": {
            "benchmarks": {n: b.task for n, b in cfg.eval.prior.benchmarks.items()},
            "runs": sum(runs_at(cfg.eval.prior, s, stages - 1) for s in range(stages)),
            "limit": cfg.eval.prior.limit,
            "backend": cfg.eval.prior.backend,
        },
    }
    if params:
        # 2N per generated token (rollouts, a teacher set); per trained token, SDFT: teacher forward (2N)
        # and student forward+backward (6N); SFT/DFT: forward+backward on its targets. With LoRA the
        # backward forms no weight gradients of the base: 4N for forward+backward.
        train = 4 if cfg.model.lora.r else 6
        per_token = (2 + train) if sdft else train
        flops = float(sum(2 * params * t.generations * t.train_tokens for t in tasks))
        flops += float(sum(per_token * params * t.completions * t.train_tokens for t in tasks))
        if reinvoke:  # generate, teacher forward, student forward+backward
            flops += (2 + 2 + 6) * params * reinvoke["completions"] * reinvoke["max_tokens"]
        samples = 1 + (cfg.eval.pass_at_k.n if cfg.eval.pass_at_k.k else 0)
        gen_tokens = sum(stages * (t.n_test or 0) * samples * t.eval_tokens for t in tasks)
        gen_tokens += periodic * max((t.eval_tokens for t in tasks), default=0)  # at the longest cap
        for name, pcfg in cfg.eval.probes.items():
            gen_tokens += stages * (probes[name] or 0) * pcfg.max_new_tokens
        flops += 2 * params * gen_tokens
        out["flops"] = flops
    return out


def _trainable_line(p: dict) -> list[str]:
    t, lo = p.get("trainable_params"), p.get("lora")
    if not t or not lo:
        return []
    share = f" ({100 * t / p['params']:.2f}% of the model)" if p.get("params") else ""
    return [
        f"trainable parameters: {t / 1e6:.2f} M{share}: LoRA r={lo['r']}, alpha={lo['alpha']:g}, "
        f"{lo['between_tasks']} between tasks (forward+backward counted at 4N per trained token)"
    ]


def render(p: dict, tflops: float) -> str:
    def fmt(v: int | None) -> str:
        return "?" if v is None else str(v)

    lines = [
        f"plan: {p['method']} on {p['model']}",
        "",
        "task            train   test   steps   trained completions   max tokens (train/eval)",
    ]
    for t in p["tasks"]:
        lines.append(
            f"{t['name']:<14} {fmt(t['n_train']):>6} {fmt(t['n_test']):>6} {fmt(t['steps']):>7} "
            f"{t['completions']:>21} {t['train_tokens']:>12}/{t['eval_tokens']}"
        )
    for t in p["tasks"]:
        if t.get("n_val"):
            every = f", scored {t['periodic']} times during training" if t.get("periodic") else ""
            lines.append(f"  {t['name']}: {t['n_val']} validation rows (never trained on){every}")
        if t.get("test_excluded"):
            lines.append(
                f"  {t['name']}: {t['test_excluded']} test-pool questions left out (training questions)"
            )
    probes = ", ".join(f"{k} ({'?' if v is None else v})" for k, v in p["probes"].items()) or "none"
    lines += [
        "",
        f"prior-capability probes: {probes}",
        f"optimizer steps: {p['optimizer_steps']}"
        + (
            f" (including {p['reinvoke']['steps_per_task']} re-invocation steps after each task)"
            if p.get("reinvoke")
            else ""
        ),
        f"rollout tokens (at most): {p['rollout_tokens']:,}",
        f"evaluation: {p['eval_stages']} stages, {p['eval_generations']:,} greedy/sampled completions"
        + (
            f" ({p['periodic_generations']:,} in periodic evaluations)"
            if p.get("periodic_generations")
            else ""
        ),
    ]
    suite = p["lm_eval"]
    if suite["benchmarks"]:
        names = ", ".join(f"{k} ({v})" if k != v else k for k, v in suite["benchmarks"].items())
        limit = "all documents" if suite["limit"] is None else f"limit {suite['limit']:g}"
        lines.append(
            f"lm-eval suite ({suite['backend']}, {limit}): {names}; run after {suite['runs']} of "
            f"{p['eval_stages']} stages (not in the compute estimate)"
        )
    if p.get("flops"):
        hours = p["flops"] / (tflops * 1e12) / 3600
        lines += [
            f"model parameters: {p['params'] / 1e9:.3f} B",
            *_trainable_line(p),
            f"compute: {p['flops']:.3e} FLOPs = {hours:.2f} GPU-hours at {tflops:g} effective TFLOP/s "
            "(--tflops; completions at their maximum length, prompts not counted)",
        ]
    elif p.get("params"):
        lines += [f"model parameters: {p['params'] / 1e9:.3f} B", *_trainable_line(p)]
        lines.append("compute: no task rows here to count tokens over")
    else:
        lines.append("compute: model size unknown (pass --params, or a model whose config is local)")
    lines.append(
        "'?' = data not loadable here (a hub dataset offline); the figures then leave that task out."
    )
    return "\n".join(lines)


def _tokenizer(cfg: Config):
    if cfg.model.source == "tiny_random":
        from sdft_cli.builders import build_tiny_tokenizer

        return build_tiny_tokenizer()
    from sdft_cli.models import load_tokenizer

    return load_tokenizer(_model_dir(cfg), cfg.model.trust_remote_code)


def lengths(cfg: Config, tok, max_rows: int = 2000) -> Lengths | None:
    """The longest student context, teacher context and trained completion over the tasks' training rows
    (the first ``max_rows`` of each), in tokens: the micro-batch the memory plan sizes."""
    from sdft_cli.names import resolve_teacher_template
    from sdft_cli.prompts import encode_messages, encode_target, left_truncate

    method = cfg.method
    sdft = isinstance(method, SDFTConfig)
    cut = getattr(method, "max_prompt_tokens", None)
    best = Lengths(0, 0, 0)
    for name, tcfg in cfg.task.items():
        try:
            task = load_task(name, tcfg, train=True, max_test=cfg.eval.max_items)
        except SdftError:
            continue
        rows = task.train[:max_rows]
        template = resolve_teacher_template(getattr(method, "teacher_template", None), tcfg.teacher_template)
        for ex in rows:
            s = len(left_truncate(encode_messages(tok, task.student(ex)), cut))
            best.student_context = max(best.student_context, s)
            if sdft:
                t = len(left_truncate(encode_messages(tok, task.teacher(ex, template)), cut))
                best.teacher_context = max(best.teacher_context, t)
        if sdft:
            best.completion = max(best.completion, cfg.rollout.max_new_tokens or tcfg.max_new_tokens)
        else:
            eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
            for ex in rows:
                target = encode_target(tok, task.student(ex), ex.demonstration or "", eos)
                best.completion = max(best.completion, len(target))
    return best if best.student_context else None


def capped_lengths(cfg: Config) -> Lengths | None:
    """Lengths from the config's caps alone, when the rows or the tokenizer are not here: contexts at
    ``method.max_prompt_tokens`` (left truncation), completions at the rollout's or the task's cap."""
    cut = getattr(cfg.method, "max_prompt_tokens", None)
    if not cut or not cfg.task:
        return None
    completion = max(cfg.rollout.max_new_tokens or t.max_new_tokens for t in cfg.task.values())
    return Lengths(cut, cut, completion)


def memory(
    cfg: Config, device: str = "cpu", device_gib: float | None = None, processes: int = 1
) -> MemoryPlan | None:
    """The memory plan of ``cfg`` (None when the model's config is not here, or neither the task rows
    with the tokenizer nor ``method.max_prompt_tokens`` give the lengths)."""
    arch = _arch(cfg)
    if arch is None:
        return None
    try:
        size = lengths(cfg, _tokenizer(cfg))
    except (OSError, ValueError, SdftError):  # a config without its tokenizer
        size = None
    notes = []
    if size is None:
        size = capped_lengths(cfg)
        notes.append("lengths from the caps: contexts at method.max_prompt_tokens (rows not read)")
    params, trainable = count_parameters(cfg), count_trainable(cfg)
    if size is None or params is None or trainable is None:
        return None
    out = memory_plan(cfg, arch, params, trainable, size, device, device_gib, processes)
    out.notes += notes
    return out
