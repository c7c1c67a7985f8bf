"""The continual-learning loop: evaluate the base model (row 0), then for each task in the curriculum
train (``METHODS[method]``) and evaluate every task and probe, writing the forgetting matrix after
every evaluation stage.

Stages are skipped when their manifest exists and an interrupted training stage resumes from its
last checkpoint, so re-running the same command finishes a run without redoing finished work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import math
import platform
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from sdft_cli import __version__, distributed, preempt, prior
from sdft_cli.artifacts import (
    RunLayout,
    RunLock,
    atomic_write_json,
    atomic_write_text,
    is_complete,
    read_json,
    verified,
    write_jsonl,
    write_manifest,
)
from sdft_cli.config import Config, SDFTConfig
from sdft_cli.errors import ConfigError, RunDirError
from sdft_cli.evaluate import evaluate_many, kl_to_base, pass_at_k
from sdft_cli.logger import NullLogger, RunLogger, redact_argv
from sdft_cli.methods import METHODS
from sdft_cli.methods.context import TrainContext
from sdft_cli.models import (
    autocast_dtype,
    eos_ids,
    generation_config,
    inference_dtype,
    load_config,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_model_dir,
)
from sdft_cli.preconditions import check_demonstrations, measure, print_table
from sdft_cli.report import load_matrix, print_matrix, write_matrix
from sdft_cli.rollout import generate_hf, inference_copy
from sdft_cli.tasks import Task, check_lengths, load_inputs, resolve_teacher_template

# Keys that do not change results: a run may be resumed with different values for them. (Batch sizes
# of generation do: they change how a step's random stream maps to samples, and bf16 padding numerics.)
VOLATILE_KEYS = ("run_dir", "runs_root", "name", "device", "threads", "logger", "dist")
PACKAGES = (
    "sdft-cli",
    "torch",
    "transformers",
    "datasets",
    "hydra-core",
    "omegaconf",
    "accelerate",
    "safetensors",
    "tokenizers",
    "wandb",
    "typer",
    "numpy",
)


# ----------------------------------------------------------------------------- provenance


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def check_config(layout: RunLayout, cfg: Config) -> None:
    """Refuse to resume a run directory that holds a run with a different config."""
    if not layout.config.is_file():
        return
    old = _flatten(OmegaConf.to_container(OmegaConf.load(layout.config)))  # type: ignore[arg-type]
    new = _flatten(OmegaConf.to_container(OmegaConf.structured(cfg)))  # type: ignore[arg-type]
    volatile = lambda k: any(k == v or k.startswith(v + ".") for v in VOLATILE_KEYS)  # noqa: E731
    diff = sorted(k for k in set(old) | set(new) if not volatile(k) and old.get(k) != new.get(k))
    if diff:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:4])
        more = f" (+{len(diff) - 4} more)" if len(diff) > 4 else ""
        raise RunDirError(
            f"{layout.root} holds a run with a different config ({shown}{more}); "
            "choose another run_dir=... or remove that directory"
        )


def git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def write_provenance(layout: RunLayout) -> None:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    old = read_json(layout.provenance) if layout.provenance.is_file() else {}
    starts = old.get("starts", []) + [
        {
            "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": socket.gethostname(),
            "argv": redact_argv(sys.argv),
            "processes": distributed.current().world,
        }
    ]
    atomic_write_json(
        layout.provenance,
        {
            "sdft_cli": __version__,
            "git": git_revision(),
            "python": platform.python_version(),
            "packages": versions,
            "all_packages": sorted(
                f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()
            ),
            "starts": starts,
        },
    )


# ----------------------------------------------------------------------------- stages


@dataclass
class Run:
    """What every stage of one run shares; built once by ``run`` after all inputs are checked."""

    cfg: Config
    layout: RunLayout
    tokenizer: object
    tasks: dict[str, Task]
    probes: dict[str, Task]
    eos: list[int]
    amp: torch.dtype | None
    logger: RunLogger
    base_path: Path | None = None
    # lm-eval's task index when eval.prior has benchmarks (built once, by the input checks)
    lm_eval_tasks: object = None
    _base: torch.nn.Module | None = None

    def base_engine(self) -> torch.nn.Module:
        """The base model in the evaluation dtype, loaded once on the CPU (for the KL-to-base diagnostic;
        it visits the accelerator only while that runs)."""
        if self._base is None:
            base = load_model(
                self.base_path, self.cfg.model.dtype, torch.device("cpu"), self.cfg.model.trust_remote_code
            )
            self._base = inference_copy(base, inference_dtype(self.cfg.eval.dtype, self.amp))
            self._base.requires_grad_(False)
        return self._base

    def teacher_templates(self) -> dict[str, str]:
        """Each task's teacher template (the method's, when it sets one, applies to every task)."""
        method = getattr(self.cfg.method, "teacher_template", None)
        return {n: resolve_teacher_template(method, t.cfg.teacher_template) for n, t in self.tasks.items()}

    def precondition_stage(self, out_dir: Path, model) -> None:
        """Student vs teacher accuracy and the teacher's KL from the base, on the base model (row 0)."""
        t0 = time.perf_counter()
        student = {c["eval_task"]: c["value"] for c in read_json(self.layout.base_eval() / "results.json")}
        engine = inference_copy(model, inference_dtype(self.cfg.eval.dtype, self.amp))
        rows = measure(
            engine,
            self.tokenizer,
            list(self.tasks.values()),
            self.teacher_templates(),
            student,
            self.eos,
            self.cfg.eval.batch_size,
            self.amp,
            out_dir,
            judge=self.cfg.eval.judge,
        )
        self.logger.log(
            {
                "stage": 0,
                "event": "preconditions",
                "time/preconditions": round(time.perf_counter() - t0, 3),
                **{f"preconditions/{n}/{k}": r[k] for n, r in rows.items() for k in ("teacher", "student")},
                **{
                    f"preconditions/{n}/teacher_kl_to_base": r["teacher_kl_to_base_token"]
                    for n, r in rows.items()
                },
            }
        )

    def train_stage(
        self, index: int, name: str, model, previous: Path | None = None, device: torch.device | None = None
    ) -> None:
        """Train on task ``index``; the method writes checkpoints, the final model and the manifest."""
        ctx = TrainContext(
            model=model,
            tokenizer=self.tokenizer,
            method=self.cfg.method,
            rollout=self.cfg.rollout,
            autocast_dtype=self.amp,
            eos_ids=self.eos,
            seed=self.cfg.seed,
            stage=index,
            train_dir=self.layout.train(index, name),
            logger=self.logger,
            progress=self.cfg.logger.progress and distributed.current().main,
            base_dir=self.base_path,
            previous_dir=previous,
            device=device,
            trust_remote_code=self.cfg.model.trust_remote_code,
        )
        if self.cfg.method.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            # active in train mode only: generation (eval mode) keeps its KV cache
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with preempt.deferred():
            METHODS[self.cfg.method.name](ctx, self.tasks[name])

    def eval_stage(self, out_dir: Path, stage: int, stage_task: str, model, path: Path) -> None:
        """Evaluate every task and probe, and the lm-eval suite; write predictions, ``results.json`` and
        the manifest (last). ``path`` is the checkpoint ``model`` was loaded from."""
        self.logger.rewind_eval(stage)
        every = [*self.tasks.values(), *self.probes.values()]
        kinds = {**{n: "trained" for n in self.tasks}, **{n: "prior" for n in self.probes}}
        bar = tqdm(
            total=sum(len(t.test) for t in every),
            desc=f"eval stage {stage}",
            leave=False,
            disable=not self.cfg.logger.progress,
        )
        t0 = time.perf_counter()
        engine = inference_copy(model, inference_dtype(self.cfg.eval.dtype, self.amp))
        decode = generate_hf
        if self.cfg.eval.backend == "vllm":  # greedy decoding on the vLLM engine, the stage's weights pushed
            from sdft_cli.vllm_engine import engine_generate, eval_engine

            decode = engine_generate(eval_engine(self.cfg, model, path, self.amp))
        results = evaluate_many(
            engine,
            self.tokenizer,
            every,
            self.eos,
            self.cfg.eval.batch_size,
            self.amp,
            progress=bar.update,
            judge=self.cfg.eval.judge,
            generate=decode,
        )
        bar.close()
        cells = []
        for res in results:
            write_jsonl(out_dir / "predictions" / f"{res.task}.jsonl", res.predictions)
            cells.append(
                {
                    "stage": stage,
                    "stage_task": stage_task,
                    "eval_task": res.task,
                    "kind": kinds[res.task],
                    "metric": res.metric,
                    "value": res.value,
                    "n": res.n,
                    "stderr": res.stderr,
                }
            )
            for metric, value in res.extra.items():  # in results.json and matrix.csv, not the matrix
                cells.append(
                    {
                        **cells[-1],
                        "metric": metric,
                        "value": value,
                        "stderr": math.sqrt(value * (1 - value) / res.n),
                    }
                )
        prior_cfg = self.cfg.eval.prior
        if prior.runs_at(prior_cfg, stage, len(self.tasks)):
            dtype = str(inference_dtype(self.cfg.eval.dtype, self.amp) or self.cfg.model.dtype)
            cells += prior.evaluate(
                prior_cfg,
                self.lm_eval_tasks,
                engine,
                self.tokenizer,
                path,
                dtype.removeprefix("torch."),
                out_dir,
                stage,
                stage_task,
                self.cfg.model.trust_remote_code,
            )
        atomic_write_json(out_dir / "results.json", cells)
        diag = {}
        if stage > 0 and self.cfg.eval.kl_to_base and stage_task in self.tasks:
            new = next(r for r in results if r.task == stage_task)
            device = next(model.parameters()).device
            base = self.base_engine().to(device)
            pad = self.tokenizer.pad_token_id  # type: ignore[attr-defined]
            diag = kl_to_base(base, engine, new, pad, self.cfg.eval.batch_size, self.amp)
            base.to("cpu")
            atomic_write_json(out_dir / "diagnostics.json", {"task": stage_task, **diag})
        passk = []
        if self.cfg.eval.pass_at_k.k:
            for task in self.tasks.values():
                passk.append(
                    pass_at_k(
                        engine,
                        self.tokenizer,
                        task,
                        self.eos,
                        self.cfg.eval.pass_at_k,
                        self.cfg.eval.batch_size,
                        self.amp,
                        self.cfg.eval.judge,
                        generate=decode,
                    )
                )
            atomic_write_json(out_dir / "pass_at_k.json", passk)
        self.logger.log(
            {
                "stage": stage,
                "event": "eval",
                "time/eval": round(time.perf_counter() - t0, 3),
                **{f"eval/{c['eval_task']}/{c['metric']}": c["value"] for c in cells},
                **({"eval/kl_to_base": diag["kl_to_base_token"]} if diag else {}),
                **{f"eval/{p['task']}/pass@{k}": v for p in passk for k, v in p["pass_at_k"].items()},
            }
        )
        write_manifest(out_dir, {"stage": stage, "stage_task": stage_task})

    def prior_columns(self) -> list[str]:
        """The matrix's prior-capability columns: the probes, then the lm-eval benchmarks."""
        return [*self.probes, *self.cfg.eval.prior.benchmarks]

    def write_matrix(self, meta: dict) -> dict:
        """Rebuild the matrix from every complete evaluation stage, write it, print it, log it."""
        names = list(self.tasks)
        dirs = [self.layout.base_eval()] + [self.layout.eval(i, n) for i, n in enumerate(names, 1)]
        cells = [c for d in dirs if verified(d) for c in read_json(d / "results.json")]
        diags = {
            f"{i}:{n}": read_json(d / "diagnostics.json")
            for i, (n, d) in enumerate(zip(names, dirs[1:], strict=True), start=1)
            if is_complete(d) and (d / "diagnostics.json").is_file()
        }
        kl = {
            # KL(base || model), RL's Razor's direction, and KL(model || base), the SDFT paper's Sec. 3.2
            "kl_to_base": {k: d["kl_to_base_token"] for k, d in diags.items()},
            "kl_model_base": {
                k: d["kl_model_base_token"] for k, d in diags.items() if "kl_model_base_token" in d
            },
        }
        write_matrix(self.layout.root, cells, names, self.prior_columns(), {**meta, **kl})
        data = load_matrix(self.layout.root)
        print_matrix(data)
        self.logger.log_matrix(data, self.layout.matrix("png"))
        return data


# ----------------------------------------------------------------------------- the loop


def run(cfg: Config) -> dict:
    """Run (or resume) the whole continual-learning sequence of ``cfg``; returns the final metrics.

    Launched as several processes (torchrun, accelerate, a multi-task Slurm step), every process runs
    this: all of them train (``distributed``), rank 0 alone evaluates and writes the run directory.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars; our own bars show the stages
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    # before any model is built or loaded: unknown lm-eval tasks, code execution without the opt-in
    lm_eval_tasks = prior.check(cfg.eval.prior, cfg.model.trust_remote_code)
    inputs = load_inputs(cfg)  # likewise the task data: a bad file or row stops the run here
    # before the process group exists: a model built into the cache is written by whichever process
    # gets its lock first (transformers' save_pretrained writes on rank 0 only once torch.distributed is up)
    base_path = resolve_model_dir(cfg.model)
    dist, device = distributed.init(
        cfg.dist.backend, cfg.dist.timeout_min, device, cfg.dist.reshard_after_forward
    )
    try:
        if dist.enabled and "vllm" in (cfg.rollout.backend, cfg.eval.backend):
            raise ConfigError(
                "rollout.backend=vllm and eval.backend=vllm run in one process; a multi-process "
                "(torchrun) run generates with the transformers backend"
            )
        layout = RunLayout(Path(cfg.run_dir))
        layout.root.mkdir(parents=True, exist_ok=True)
        with RunLock(layout.root) if dist.main else contextlib.nullcontext():
            if dist.main:
                check_config(layout, cfg)
                atomic_write_text(layout.config, config_yaml(cfg))
                write_provenance(layout)
            metrics = _run_sequence(cfg, layout, dist, device, base_path, lm_eval_tasks, inputs)
    finally:
        distributed.shutdown()
    if dist.main:
        print(f"[sdft] run directory: {layout.root}", flush=True)
    return metrics


def _run_sequence(
    cfg: Config,
    layout: RunLayout,
    dist: distributed.Dist,
    device: torch.device,
    base_path: Path | str,
    lm_eval_tasks: object,
    inputs: tuple,
) -> dict:
    amp = autocast_dtype(cfg.model.precision, device)

    # -------------------------------------------------------------------- inputs, checked before any work
    trust = cfg.model.trust_remote_code
    tok = load_tokenizer(base_path, trust)
    eos = eos_ids(tok, generation_config(base_path))
    context = cfg.model.max_context or int(
        getattr(load_config(base_path, trust), "max_position_embeddings", 2048)
    )
    sdft = isinstance(cfg.method, SDFTConfig)
    tasks, probes, prompts = inputs
    for task in tasks.values():
        template = (
            resolve_teacher_template(cfg.method.teacher_template, task.cfg.teacher_template) if sdft else None
        )
        rollout_tokens = cfg.rollout.max_new_tokens or task.cfg.max_new_tokens
        check_lengths(task, tok, context, rollout_tokens, template, None if sdft else eos)
    for probe in probes.values():
        check_lengths(probe, tok, context, probe.cfg.max_new_tokens)
    if prompts is not None:  # the re-invocation prompts (sft_reinvoke), before any work
        check_lengths(prompts, tok, context, prompts.cfg.max_new_tokens)
    distributed.check_divisible("method.prompts_per_step", cfg.method.prompts_per_step)
    if cfg.eval.preconditions:
        check_demonstrations(list(tasks.values()))

    if dist.main:
        logger = RunLogger(cfg.logger, layout, dataclasses.asdict(cfg), name=layout.root.name)
    else:
        logger = NullLogger()
    state = Run(cfg, layout, tok, tasks, probes, eos, amp, logger, base_path, lm_eval_tasks)
    meta = {
        "method": cfg.method.name,
        "seed": cfg.seed,
        "model": cfg.model.name,
        "eval_dtype": str(inference_dtype(cfg.eval.dtype, amp) or cfg.model.dtype).removeprefix("torch."),
        "title": f"{cfg.method.name} · {cfg.model.name} · seed {cfg.seed}",
    }
    loaded: dict = {"key": None, "model": None}

    def model_at(path, where: torch.device = device) -> torch.nn.Module:
        """The student at ``path``; reuses the in-memory model when it already holds those weights."""
        if loaded["key"] != (str(path), str(where)):
            loaded["model"] = None
            loaded["model"] = load_model(path, cfg.model.dtype, where, trust)
            loaded["key"] = (str(path), str(where))
        return loaded["model"]

    # a distributed stage loads the whole model on the CPU; sharding moves each rank's part to its device
    train_device = torch.device("cpu") if dist.enabled else device
    data: dict = {"metrics": {}}
    try:
        # ---------------------------------------------------------------- row 0: the base model (rank 0)
        if dist.main:
            if not verified(layout.base_eval()):  # a corrupt complete stage is reported and redone
                state.eval_stage(layout.base_eval(), 0, "base", model_at(base_path), base_path)
            data = state.write_matrix(meta)
            if cfg.eval.preconditions:
                if not verified(layout.preconditions()):
                    state.precondition_stage(layout.preconditions(), model_at(base_path))
                print_table(read_json(layout.preconditions() / "preconditions.json"))

        previous = base_path
        for i, name in enumerate(tasks, start=1):
            # ------------------------------------------------------------ train on task i (every rank)
            if distributed.from_main(dist.main and not verified(layout.train(i, name))):
                state.train_stage(i, name, model_at(previous, train_device), previous, device)
                if dist.enabled:  # the in-memory student is sharded: evaluation reloads the saved one
                    loaded.update(key=None, model=None)
                    distributed.barrier()  # rank 0 has written the model
                else:  # the in-memory student is that checkpoint
                    loaded["key"] = (str(layout.model(i, name)), str(device))
            # ------------------------------------------------------------ evaluate after task i (rank 0)
            if dist.main:
                # a crash while the finished stage dropped its checkpoints leaves them behind
                shutil.rmtree(layout.checkpoints(i, name), ignore_errors=True)
                if not verified(layout.eval(i, name)):
                    model_dir = layout.model(i, name)
                    state.eval_stage(layout.eval(i, name), i, name, model_at(model_dir), model_dir)
                    data = state.write_matrix(meta)
            previous = layout.model(i, name)
    finally:
        logger.close()
    return data["metrics"]
