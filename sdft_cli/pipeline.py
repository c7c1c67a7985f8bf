"""The continual-learning loop: evaluate the base model (row 0), then for each task in the curriculum
train (``METHODS[method].train``) and evaluate every task and probe, writing the forgetting matrix
after every evaluation stage.

Stages are skipped when their manifest exists and an interrupted training stage resumes from its
last checkpoint, so re-running the same command finishes a run without redoing finished work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from sdft_cli import distributed, lora, preempt, prior
from sdft_cli.artifacts import RunLayout, RunLock, atomic_write_text, read_json, verified
from sdft_cli.config import Config
from sdft_cli.engines import Engines
from sdft_cli.errors import ConfigError
from sdft_cli.evaluate import BaseModel, EvalContext, evaluate_stage
from sdft_cli.logger import NullLogger, RunLogger
from sdft_cli.methods import METHODS
from sdft_cli.methods.context import TrainContext
from sdft_cli.models import (
    ModelCache,
    eos_ids,
    generation_config,
    load_config,
    load_tokenizer,
    resolve_model_dir,
)
from sdft_cli.names import resolve_teacher_template
from sdft_cli.precision import autocast_dtype, inference_dtype, release_freed_memory, resolve_device
from sdft_cli.preconditions import precondition_stage, print_table
from sdft_cli.provenance import check_config, config_yaml, data_hashes, write_provenance
from sdft_cli.report import print_matrix, rebuild_matrix
from sdft_cli.schedule import step_seed
from sdft_cli.tasks import Inputs, JointTask, Task, check_inputs, load_inputs
from sdft_cli.validation import Periodic


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
                write_provenance(layout, data_hashes({**inputs.tasks, **inputs.probes}))
            state = Run.start(cfg, layout, device, base_path, inputs, lm_eval_tasks)
            try:
                metrics = state.loop()
            finally:
                state.logger.close()
    finally:
        distributed.shutdown()
    if dist.main:
        print(f"[sdft] run directory: {layout.root}", flush=True)
    return metrics


@dataclass
class Run:
    """One run's loop: what its stages share, built by ``start`` once every input is checked."""

    cfg: Config
    layout: RunLayout
    device: torch.device
    base_path: Path | str
    inputs: Inputs
    tokenizer: object
    eos: list[int]
    amp: torch.dtype | None
    logger: RunLogger | NullLogger
    engines: Engines
    evals: EvalContext
    models: ModelCache

    @classmethod
    def start(
        cls,
        cfg: Config,
        layout: RunLayout,
        device: torch.device,
        base_path: Path | str,
        inputs: Inputs,
        lm_eval_tasks: object,
    ) -> Run:
        """The tokenizer and the checks that need it (every context fits the model), then the logger,
        the engine factory and the evaluation context."""
        trust = cfg.model.trust_remote_code
        tok = load_tokenizer(base_path, trust)
        eos = eos_ids(tok, generation_config(base_path))
        context = cfg.model.max_context or int(
            getattr(load_config(base_path, trust), "max_position_embeddings", 2048)
        )
        check_inputs(cfg, inputs, tok, eos, context)
        distributed.check_divisible("method.prompts_per_step", cfg.method.prompts_per_step)
        logger: RunLogger | NullLogger = NullLogger()  # ranks > 0: rank 0 logs every rank's totals
        if distributed.current().main:
            logger = RunLogger(cfg.logger, layout, dataclasses.asdict(cfg), name=layout.root.name)
        amp = autocast_dtype(cfg.model.precision, device)
        engines = Engines(
            cfg.rollout,
            tokenizer=tok,
            eos_ids=eos,
            autocast_dtype=amp,
            seed=cfg.seed,
            lora_rank=cfg.model.lora.r,
        )
        eval_dtype = inference_dtype(cfg.eval.dtype, amp)
        evals = EvalContext(
            cfg=cfg.eval,
            tokenizer=tok,
            tasks=inputs.tasks,
            probes=inputs.probes,
            engines=engines,
            logger=logger,
            autocast_dtype=amp,
            model_dtype=cfg.model.dtype,
            base=BaseModel(base_path, cfg.model.dtype, eval_dtype, trust),
            lm_eval_tasks=lm_eval_tasks,
            progress=cfg.logger.progress,
            trust_remote_code=trust,
        )
        models = ModelCache(cfg.model.dtype, trust)
        return cls(cfg, layout, device, base_path, inputs, tok, eos, amp, logger, engines, evals, models)

    # ------------------------------------------------------------------ the loop

    def loop(self) -> dict:
        """Row 0, then train and evaluate each task; returns the final metrics."""
        layout, main = self.layout, distributed.current().main
        data: dict = {"metrics": {}}
        # ---------------------------------------------------------------- row 0: the base model (rank 0)
        if main:
            if not verified(layout.base_eval()):  # a corrupt complete stage is reported and redone
                self.eval_stage(layout.base_eval(), 0, "base", self.base_path)
            data = self.write_matrix()
            if self.cfg.eval.preconditions:
                if not verified(layout.preconditions()):
                    base = self.models.get(self.base_path, self.device)
                    results = layout.base_eval() / "results.json"
                    precondition_stage(self.evals, layout.preconditions(), base, self.templates(), results)
                print_table(read_json(layout.preconditions() / "preconditions.json"))

        previous = self.base_path
        for i, name in enumerate(self.stages(), start=1):
            if self.cfg.curriculum == "single":  # every task from the base: the single-task reference
                previous = self.base_path
            # ------------------------------------------------------------ train on task i (every rank)
            if distributed.from_main(main and not verified(layout.train(i, name))):
                release_freed_memory()  # the last evaluation's buffers are not the training's
                self.train_stage(i, name, previous)
            # ------------------------------------------------------------ evaluate after task i (rank 0)
            if main:
                # a crash while the finished stage dropped its checkpoints leaves them behind
                shutil.rmtree(layout.checkpoints(i, name), ignore_errors=True)
                if not verified(layout.eval(i, name)):
                    release_freed_memory()  # nor are the training's the evaluation's
                    self.eval_stage(layout.eval(i, name), i, name, layout.model(i, name), previous)
                    data = self.write_matrix()
            previous = layout.model(i, name)
        return data["metrics"]

    # ------------------------------------------------------------------ stages

    def stages(self) -> list[str]:
        """The training stages' names: the tasks in order, or one ``joint`` stage (curriculum=joint)."""
        return ["joint"] if self.cfg.curriculum == "joint" else list(self.inputs.tasks)

    def task(self, name: str) -> Task:
        if name == "joint" and self.cfg.curriculum == "joint":
            return JointTask(self.inputs.tasks, getattr(self.cfg.method, "teacher_template", None))
        return self.inputs.tasks[name]

    def train_stage(self, index: int, name: str, previous: Path | str) -> None:
        """Train on task ``index`` from the model at ``previous``; the method writes checkpoints, the
        final model and the manifest. A distributed stage loads the whole model on the CPU; sharding
        moves each rank's part to its device."""
        dist = distributed.current()
        cfg = self.cfg
        where = torch.device("cpu") if dist.enabled else self.device
        adapter = cfg.model.lora
        keep = adapter.r and adapter.between_tasks == "keep" and previous != self.base_path
        # LoRA keeping one adapter over the sequence: the base weights, and the previous task's adapter
        model = self.models.get(self.base_path if keep else previous, where)
        if adapter.r:
            teacher = getattr(cfg.method, "teacher", "live") != "live"
            lora.attach(model, adapter, teacher=teacher, seed=step_seed(cfg.seed, index, lora.SEED_STEP))
            if keep:
                lora.load_adapter(model, Path(previous).parent / "adapter")
        ctx = TrainContext(
            model=model,
            tokenizer=self.tokenizer,
            method=cfg.method,
            rollout=cfg.rollout,
            autocast_dtype=self.amp,
            eos_ids=self.eos,
            seed=cfg.seed,
            stage=index,
            train_dir=self.layout.train(index, name),
            logger=self.logger,
            engines=self.engines,
            progress=cfg.logger.progress and dist.main,
            base_dir=self.base_path,
            previous_dir=previous,
            device=self.device,
            trust_remote_code=cfg.model.trust_remote_code,
            prompts=self.inputs.prompts,
            periodic=self.periodic(name),
        )
        if cfg.method.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            # active in train mode only: generation (eval mode) keeps its KV cache
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with preempt.deferred():
            METHODS[cfg.method.name].train(ctx, self.task(name))
        if dist.enabled:  # the in-memory student is sharded: evaluation reloads the saved one
            self.models.drop()
            distributed.barrier()  # rank 0 has written the model
        else:  # the in-memory student is that checkpoint
            self.models.adopt(self.layout.model(index, name), self.device)

    def periodic(self, name: str) -> Periodic | None:
        """Task ``name``'s periodic evaluations (eval.every_steps), None when there are none."""
        cfg = self.cfg
        if not cfg.eval.every_steps:
            return None
        return Periodic(
            every=cfg.eval.every_steps,
            select=cfg.select,
            task=self.task(name),
            evals=self.evals,
            tests=list(self.inputs.tasks.values()) if "test" in cfg.eval.periodic else [],
            probes=list(self.inputs.probes.values()) if "probes" in cfg.eval.periodic else [],
            source=self.base_path,
        )

    def eval_stage(
        self, out_dir: Path, stage: int, stage_task: str, path: Path | str, previous: Path | str | None = None
    ) -> None:
        model = self.models.get(path, self.device)
        evaluate_stage(self.evals, out_dir, stage, stage_task, model, path, previous)  # type: ignore[arg-type]

    def templates(self) -> dict[str, str]:
        """Each task's teacher template (the method's, when it sets one, applies to every task)."""
        method = getattr(self.cfg.method, "teacher_template", None)
        return {
            n: resolve_teacher_template(method, t.cfg.teacher_template) for n, t in self.inputs.tasks.items()
        }

    def write_matrix(self) -> dict:
        """Rebuild the matrix from every complete evaluation stage, write it, print it, log it."""
        cfg = self.cfg
        meta = {
            "method": cfg.method.name,
            "seed": cfg.seed,
            "model": cfg.model.name,
            "eval_dtype": self.evals.dtype_name,
            "title": f"{cfg.method.name} · {cfg.model.name} · seed {cfg.seed}",
            "curriculum": cfg.curriculum,
            "stages": self.stages(),
        }
        if cfg.curriculum != "sequential":
            meta["title"] += f" · curriculum={cfg.curriculum}"
        priors = [*self.inputs.probes, *cfg.eval.prior.benchmarks]
        data = rebuild_matrix(self.layout, list(self.inputs.tasks), priors, meta, self.stages())
        print_matrix(data)
        self.logger.log_matrix(data, self.layout.matrix("png"))
        return data
