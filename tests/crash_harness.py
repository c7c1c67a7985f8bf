"""Crash-anywhere harness: SIGKILL a short continual run at chosen points, re-run the same command until
it completes, and compare what it leaves with an uninterrupted run.

Two kinds of fault, both a real SIGKILL (no cleanup, no ``finally``, no flush):

- targeted: the child runs the CLI through this file (``python crash_harness.py child ...``), which first
  rebinds one named production function, in the child only, so that its k-th call kills the process
  (before the call, after it returns, or, for ``append_jsonl``, with half a line written). Production
  code carries no test hooks.
- random: the parent kills the child's process group after a seeded random delay drawn over the
  uninterrupted run's duration.

A run is then re-run without faults (at most ``max_restarts`` times) until it exits 0, and checked:
the forgetting matrix (``matrix.*`` bytes), final student and EMA teacher weights (bitwise), every stage
manifest's file list with sizes and sha256, and the per-step and per-stage records of ``metrics.jsonl``
must equal the uninterrupted run's; every file a manifest lists must be present and intact.

Used by ``tests/test_crash_anywhere.py`` and ``scripts/crash_campaign.py``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from crash_checks import compare, progress, table, totals  # noqa: F401  (re-exported for the campaign)

REPO = Path(__file__).resolve().parents[1]

# Two tasks, two optimizer steps each, a checkpoint after step 1 (not after the last step: the stage's
# final model is saved instead), the EMA teacher saved with each task's student, one prior probe.
RUN_ARGS = [
    "experiment=smoke",
    "logger.progress=false",
    "task=[facts,mcq]",
    "method=sdft",
    "method.save_teacher=true",
    "eval.max_items=2",
    "rollout.max_new_tokens=4",
    # the packed decoder copy on any CPU (the default picks it where bf16 compute is native)
    "rollout.dtype=bfloat16",
    "~eval.probes.opposites",
    "~eval.probes.languages",
]
# The modules whose names a target may be bound under; imported before rebinding, so every
# ``from x import f`` copy of the target is replaced too.
PRELOAD = (
    "sdft_cli.cli",
    "sdft_cli.main",
    "sdft_cli.pipeline",
    "sdft_cli.methods.sdft",
    "sdft_cli.methods.context",
    "sdft_cli.teacher",
    "sdft_cli.checkpoint",
    "sdft_cli.engines.hf",
    "sdft_cli.report",
    "sdft_cli.evaluate",
    "transformers.modeling_utils",
    "safetensors.torch",
)
WHEN = ("before", "after", "torn", "fsize", "pause")


# ----------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class Fault:
    """One fault: SIGKILL at ``target``'s (``module:attr`` or ``module:Class.attr``) ``nth`` call
    (``when``: before the call, after it returns, or ``torn``: half of an appended line written), or,
    with ``target=None``, from the parent after ``delay`` seconds. Instead of a kill, ``when="fsize"``
    fills the disk (from that call on, writes past $CRASH_FSIZE bytes fail) and ``"pause"`` holds the
    run there (printing ``[crash] paused``) for $CRASH_PAUSE seconds."""

    stage: str
    target: str | None = None
    nth: int = 1
    when: str = "before"
    delay: float | None = None

    @property
    def label(self) -> str:
        if self.target is None:
            return f"random @{self.delay:.2f}s"
        return f"{self.target}#{self.nth} {self.when}"


def F(stage: str, target: str, nth: int = 1, when: str = "before") -> Fault:
    return Fault(stage, target, nth, when)


# Chains of targeted kills, each chain in one run directory: the k of each fault counts calls in the
# launch it is armed in, which resumes from where the previous kill left the run. An uninterrupted
# launch of RUN_ARGS makes, in order: row 0 (evaluate_many, 3 x write_jsonl, write_manifest, write_matrix);
# per task 2 steps x (DecoderEngine.push, loss_mask, 2 micro-batches x (completion_hidden teacher, student,
# fused_loss), clip_grad_norm_, Teacher.update), a checkpoint after step 1 (save_file model + teacher,
# torch.save, write_manifest, prune_checkpoints), the final model (save_file x 2, write_manifest,
# prune_checkpoints), then its evaluation (evaluate_many, 3 x write_jsonl, kl_to_base with 2
# completion_hidden, write_manifest, write_matrix). A resumed launch always rewrites row 0's matrix first.
CAMPAIGN: dict[str, list[Fault]] = {
    "A": [
        F("rollout", "sdft_cli.engines.hf:DecoderEngine.push", 2),  # task 1, step 2, after checkpoint 1
        F("teacher scoring", "sdft_cli.forward:completion_hidden", 3),  # resumed step 2, micro-batch 2
        F("update", "sdft_cli.teacher:Teacher.update", 1, "after"),  # step 2 applied, not checkpointed
        F("matrix", "sdft_cli.report:write_matrix", 2),  # task 1 evaluated, its matrix not written
    ],
    "B": [
        F("manifest", "sdft_cli.artifacts:write_manifest", 6, "after"),  # task 2 complete, checkpoints left
        F("manifest", "sdft_cli.artifacts:write_manifest", 1),  # task 2 evaluated, no manifest
        F("matrix", "sdft_cli.report:render_heatmap", 2),  # last matrix: csv written, png not
    ],
    "C": [
        F("checkpoint", "safetensors.torch:save_file", 1),  # checkpoint 1's student
        F("checkpoint", "torch:save", 1, "after"),  # trainer state written, no manifest
        F("manifest", "sdft_cli.artifacts:write_manifest", 1, "after"),  # checkpoint complete, not renamed
        F("checkpoint", "sdft_cli.checkpoint:prune_checkpoints", 1),  # checkpoint renamed, older not pruned
    ],
    "D": [
        F("evaluation", "sdft_cli.evaluate:evaluate_many", 1),  # row 0 starting
        F("evaluation", "sdft_cli.artifacts:write_jsonl", 2),  # row 0's predictions half written
        F("evaluation", "sdft_cli.evaluate:kl_to_base", 1),  # task 1's results written, diagnostics not
        F("evaluation", "sdft_cli.evaluate:evaluate_many", 2),  # task 2's evaluation starting
    ],
    "E": [
        F("log", "sdft_cli.logger:append_jsonl", 3, "torn"),  # half a samples.jsonl line
        F("log", "sdft_cli.logger:append_jsonl", 7, "torn"),  # half of task 1's evaluation record
        F("log", "sdft_cli.logger:append_jsonl", 2),  # task 2, step 1 about to be logged
        F("update", "torch.nn.utils:clip_grad_norm_", 2),  # task 2, step 2, gradients computed
    ],
    "F": [
        F("teacher scoring", "sdft_cli.forward:completion_hidden", 11),  # task 2, step 1, first teacher pass
        F("update", "sdft_cli.loss:fused_loss", 2),  # task 2, step 1, micro-batch 2's loss
        F("update", "sdft_cli.teacher:Teacher.update", 2),  # task 2, step 2: optimizer stepped, EMA not
        F("checkpoint", "sdft_cli.checkpoint:save_teacher", 1),  # task 2's final student written, teacher not
    ],
    "G": [
        F("rollout", "sdft_cli.loss:loss_mask", 1),  # task 1, step 1, rollouts done
        F("manifest", "sdft_cli.artifacts:write_manifest", 3, "after"),  # task 1 evaluated, matrix not
        F("rollout", "sdft_cli.engines.hf:DecoderEngine.push", 2),  # task 2, step 2
        F("matrix", "sdft_cli.report:write_matrix", 2, "after"),  # everything written, not yet exited
    ],
    "H": [
        F("checkpoint", "safetensors.torch:save_file", 4),  # task 1's final teacher (student written)
        F("manifest", "sdft_cli.artifacts:write_manifest", 1),  # task 1's final model, no manifest
        F("checkpoint", "torch:save", 1),  # task 2's checkpoint, half built
    ],
    "I": [
        F("manifest", "sdft_cli.artifacts:write_manifest", 4),  # task 1's results written, no manifest
        F("checkpoint", "torch:save", 1, "after"),  # task 2's checkpoint, trainer state written
        F("checkpoint", "sdft_cli.checkpoint:prune_checkpoints", 2),  # task 2 complete, checkpoints left
    ],
}

# A short chain for CI: one kill each in manifest writing, teacher scoring, checkpoint writing and
# matrix writing.
CI_CHAIN: list[Fault] = [
    F("manifest", "sdft_cli.artifacts:write_manifest", 1, "after"),  # row 0 complete, matrix not written
    F("teacher scoring", "sdft_cli.forward:completion_hidden", 5),  # task 1, step 2, after checkpoint 1
    F("checkpoint", "torch:save", 1),  # task 2's checkpoint, half built
    F("matrix", "sdft_cli.report:write_matrix", 2),  # the last evaluation written, its matrix not
]


# ----------------------------------------------------------------------------- the child


def _resolve(target: str):
    """(owner, attribute name, original object) for ``module:attr`` or ``module:Class.attr``."""
    import importlib

    module, _, attr = target.partition(":")
    owner = importlib.import_module(module)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name, getattr(owner, name)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _rebind(original, replacement) -> int:
    """Replace ``original`` wherever a loaded module binds it (attributes and module-level dicts)."""
    n = 0
    for module in list(sys.modules.values()):
        try:
            items = list(vars(module).items())
        except TypeError:
            continue
        for name, value in items:
            try:
                if value is original:
                    setattr(module, name, replacement)
                    n += 1
                elif isinstance(value, dict) and not name.startswith("__"):
                    for k, v in list(value.items()):
                        if v is original:
                            value[k] = replacement
                            n += 1
            except Exception:  # exotic module objects: not where our targets live
                continue
    return n


def install(target: str, nth: int, when: str, counts: dict[str, int]) -> None:
    """Make ``target``'s ``nth`` call SIGKILL this process (``nth=0``: only count calls)."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    owner, name, original = _resolve(target)
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        counts[target] = calls
        hit = calls == nth
        if hit and when == "before":
            _die()
        if hit and when == "torn":  # append_jsonl(path, record): half the line, no newline
            line = json.dumps(args[1], ensure_ascii=False, default=float)
            with open(args[0], "a", encoding="utf-8") as f:
                f.write(line[: len(line) // 2])
            _die()
        if hit and when == "pause":  # hold the run (and its lock) here until killed
            print("[crash] paused", flush=True)
            time.sleep(float(os.environ.get("CRASH_PAUSE", "600")))
        if hit and when == "fsize":  # the disk fills here: a write past $CRASH_FSIZE bytes fails (EFBIG)
            import resource

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            limit = int(os.environ.get("CRASH_FSIZE", "4096"))
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        out = original(*args, **kwargs)
        if hit and when == "after":
            _die()
        return out

    setattr(owner, name, wrapper)
    if isinstance(owner, type):
        return
    _rebind(original, wrapper)


def child_main(argv: list[str]) -> None:
    """``child TARGET NTH WHEN -- sdft run args``: the CLI with one fault armed (NTH 0 counts calls and
    writes them to $CRASH_COUNTS at exit)."""
    target, nth, when = argv[0], int(argv[1]), argv[2]
    rest = argv[argv.index("--") + 1 :]
    counts: dict[str, int] = {}
    if when not in WHEN:
        raise SystemExit(f"when must be one of {WHEN}, not {when!r}")
    for t in target.split(","):
        install(t, nth, when, counts)
    if os.environ.get("CRASH_COUNTS"):
        import atexit

        atexit.register(lambda: Path(os.environ["CRASH_COUNTS"]).write_text(json.dumps(counts)))
    from sdft_cli.cli import main

    sys.argv = ["sdft", *rest]
    main()


# ----------------------------------------------------------------------------- the parent


@dataclass
class Launch:
    rc: int
    seconds: float
    output: str

    @property
    def killed(self) -> bool:
        return self.rc == -signal.SIGKILL


@dataclass
class Outcome:
    """One trial: its faults, what each launch did, and how the final state compares."""

    faults: list[Fault]
    launches: list[Launch] = field(default_factory=list)
    fired: int = 0
    restarts: int = 0
    recovered: bool = False
    mismatches: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    landed: list[str] = field(default_factory=list)

    @property
    def match(self) -> bool:
        return self.recovered and not self.mismatches and not self.lost


class Harness:
    """Runs the CLI in ``work`` with ``env``; ``args`` are the run's overrides (the same for every launch)."""

    def __init__(self, work: Path, env: dict | None = None, args: list[str] | None = None, timeout=600):
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ if env is None else env)
        self.args = list(RUN_ARGS if args is None else args)
        self.timeout = timeout
        self.reference: Path | None = None
        self.reference_seconds = 0.0

    def command(self, run_dir: Path, fault: Fault | None = None) -> list[str]:
        sdft = ["run", *self.args, f"run_dir={run_dir}"]
        if fault is None or fault.target is None:
            return [sys.executable, "-m", "sdft_cli.cli", *sdft]
        return [sys.executable, __file__, "child", fault.target, str(fault.nth), fault.when, "--", *sdft]

    def launch(self, run_dir: Path, fault: Fault | None = None, env: dict | None = None) -> Launch:
        """One process; a random fault kills its process group after ``fault.delay`` seconds."""
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            self.command(run_dir, fault),
            cwd=self.work,
            env=env or self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        limit = fault.delay if fault is not None and fault.target is None else self.timeout
        try:
            out, _ = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        return Launch(proc.returncode, time.perf_counter() - t0, out)

    def make_reference(self, reuse: bool = False) -> Path:
        """The uninterrupted run every trial is compared with (its duration bounds the random delays);
        ``reuse``: the one an earlier call made in the same ``work`` directory, if it completed."""
        ref = self.work / "reference"
        done = ref / ".reference_seconds"
        if reuse and done.is_file():
            self.reference, self.reference_seconds = ref, float(done.read_text())
            return ref
        shutil.rmtree(ref, ignore_errors=True)
        first = self.launch(ref)
        if first.rc != 0:
            raise RuntimeError(f"the uninterrupted run failed ({first.rc}):\n{first.output[-4000:]}")
        done.write_text(f"{first.seconds:.3f}")
        self.reference, self.reference_seconds = ref, first.seconds
        return ref

    def count_calls(self, targets: list[str]) -> dict[str, int]:
        """How often each target is called in an uninterrupted run (to place the k-th call kills)."""
        run = self.work / "count"
        shutil.rmtree(run, ignore_errors=True)
        counts = self.work / "counts.json"
        res = self.launch(
            run, Fault("count", ",".join(targets), 0), {**self.env, "CRASH_COUNTS": str(counts)}
        )
        if res.rc != 0:
            raise RuntimeError(f"counting run failed ({res.rc}):\n{res.output[-4000:]}")
        return json.loads(counts.read_text())

    def trial(self, name: str, faults: list[Fault], max_restarts: int = 3) -> Outcome:
        """Inject ``faults`` one launch each into a fresh run directory, then re-run until it completes."""
        assert self.reference is not None, "make_reference() first"
        run = self.work / name
        shutil.rmtree(run, ignore_errors=True)
        outcome = Outcome(list(faults))
        for fault in faults:
            res = self.launch(run, fault)
            outcome.launches.append(res)
            if res.killed:
                outcome.fired += 1
                outcome.landed.append(progress(run))
            elif res.rc != 0:
                outcome.landed.append(f"exit {res.rc}")
            else:
                outcome.landed.append("completed before the fault")
        for _ in range(max_restarts):
            if outcome.launches and outcome.launches[-1].rc == 0:
                break
            res = self.launch(run)
            outcome.launches.append(res)
            outcome.restarts += 1
        outcome.recovered = outcome.launches[-1].rc == 0
        if not outcome.recovered:
            outcome.lost.append(f"no completion after {max_restarts} restarts:\n{res.output[-3000:]}")
            return outcome
        outcome.mismatches, outcome.lost = compare(run, self.reference)
        return outcome


def random_faults(rng: random.Random, count: int, horizon: float) -> list[Fault]:
    return [Fault("random", delay=round(rng.uniform(0.0, horizon), 2)) for _ in range(count)]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child_main(sys.argv[2:])
    else:
        raise SystemExit(
            "usage: crash_harness.py child TARGET NTH WHEN -- SDFT_ARGS (see scripts/crash_campaign.py)"
        )
