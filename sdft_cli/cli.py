"""The ``sdft`` command line (Typer). Thin on purpose: config keys are Hydra overrides, never Typer options.

sdft run [OVERRIDES...]      run or resume a continual-learning sequence (all Hydra flags work)
sdft show [OVERRIDES...]     print the composed config
sdft ls [GROUP]              list config groups and their options
sdft validate                compose and type-check every option and experiment
sdft matrix RUN_DIR          print a run's forgetting matrix and metrics
sdft compare SWEEP_DIR       compare the runs of a sweep: mean and 95% CI over seeds per method
sdft plan [OVERRIDES...]     what a config will do: sizes, steps, tokens, evaluation calls, GPU-hours
sdft report DIR              the continual-learning report of a run or sweep (HTML, Markdown, JSON, figures)
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from sdft_cli.errors import SdftError

app = typer.Typer(
    name="sdft",
    help="Continual learning of LLMs with Self-Distillation Fine-Tuning (SDFT). Configured with Hydra.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Hydra flags that take a value (`--cfg job`, `-p pkg`); used to skip them when pre-checking overrides.
_HYDRA_VALUE_FLAGS = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
}
# Options that need a value from the user; `validate` supplies a placeholder.
REQUIRED_WITH = {"model=hf": ["model.path=example-org/example-model"]}
# With these Hydra only prints something, or composes another config tree: no pre-check.
_HYDRA_SKIP_PREFLIGHT = {
    *("--cfg", "-c", "--info", "-i", "--hydra-help", "--help", "-h", "--resolve", "--version"),
    *("--shell-completion", "-sc", "--experimental-rerun"),
    *("--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp"),
}


def _fail(msg: str, code: int = 2) -> None:
    typer.echo(f"sdft: error: {msg}", err=True)
    raise typer.Exit(code)


def split_args(args: list[str]) -> tuple[list[str], set[str]]:
    """Separate Hydra overrides from Hydra flags (and the flags' values)."""
    overrides, flags, skip = [], set(), False
    for a in args:
        if skip:
            skip = False
        elif a.startswith("-"):
            flag = a.split("=", 1)[0]
            flags.add(flag)
            skip = flag in _HYDRA_VALUE_FLAGS and "=" not in a
        else:
            overrides.append(a)
    return overrides, flags


def preflight(overrides: list[str]) -> None:
    """Compose and type-check what `run` would run, before anything expensive starts.

    Sweeps (``seed=0,1``, ``method=sdft,sft``) are checked one value at a time, each with the first value
    of the other sweeps, so an unknown task or a bad value is reported as one line naming it.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from sdft_cli.compose import compose

    job = list(overrides)
    try:
        parsed = OverridesParser.create().parse_overrides(job)
    except Exception as e:
        raise SdftError(str(e).splitlines()[0]) from None
    choices = []
    for text, o in zip(job, parsed, strict=True):
        if o.is_sweep_override():
            prefix = text.split("=", 1)[0]
            choices.append([f"{prefix}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([text])
    first = [c[0] for c in choices]
    compose(first)
    for i, values in enumerate(choices):
        for v in values[1:]:
            compose(first[:i] + [v] + first[i + 1 :])


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def run(ctx: typer.Context) -> None:
    """Run (or resume) a continual-learning sequence. Arguments are Hydra overrides and flags.

    \b
    Examples:
      sdft run                                   # embedded default: SmolLM2-135M, 3 bundled tasks, SDFT
      sdft run method=sft                        # the SFT baseline through the same loop
      sdft run 'task=[facts,mcq]' seed=1         # a curriculum (order = training order)
      sdft run -m method=sdft,sft seed=0,1,2     # a sweep (Hydra multirun)
      sdft run -m hydra/launcher=slurm  # the same sweep on Slurm
      sdft run --cfg job                         # print the job config and exit
    Re-running the same command resumes the run in runs/<name>/<overrides>.
    Hydra's own help: sdft run --hydra-help. Config reference: sdft show, sdft ls.
    """
    from sdft_cli.compose import expand_aliases

    args = expand_aliases(list(ctx.args))
    if args and args[0] in ("--help", "-h"):
        typer.echo(ctx.get_help())
        raise typer.Exit(0)
    overrides, flags = split_args(args)
    if not flags & _HYDRA_SKIP_PREFLIGHT:
        try:
            preflight(overrides)
        except SdftError as e:
            _fail(str(e))
    from sdft_cli.main import hydra_main

    sys.argv = ["sdft", *args]
    hydra_main()


@app.command()
def show(
    overrides: list[str] = typer.Argument(None, help="Hydra overrides, e.g. method=sft 'task=[facts]'"),
    resolve: bool = typer.Option(True, help="Resolve interpolations such as run_dir."),
) -> None:
    """Print the composed config (YAML) for the given overrides."""
    from omegaconf import OmegaConf

    from sdft_cli.compose import compose_raw, to_config

    try:
        raw = compose_raw(overrides or [])
        cfg = to_config(raw)  # type-check exactly as `run` would
    except SdftError as e:
        _fail(str(e))
    typer.echo(OmegaConf.to_yaml(OmegaConf.structured(cfg) if resolve else raw), nl=False)


def _describe(path: Path) -> str:
    """The first comment line of a config file (every option opens with one)."""
    for line in path.read_text().splitlines():
        if line.startswith("#") and not line.startswith("# @package"):
            return line.lstrip("# ").strip()
    return ""


@app.command(name="ls")
def ls_(
    group: str = typer.Argument(None, help="A config group (model, method, task, ...); all if omitted."),
) -> None:
    """List config groups and their options, with one line of description each."""
    from sdft_cli.compose import GROUPS, conf_dir

    root = conf_dir()
    groups = [group] if group else list(GROUPS)
    for g in groups:
        d = root / g
        if not d.is_dir():
            _fail(f"unknown group {g!r} (groups: {', '.join(GROUPS)})")
        typer.echo(f"{g}:")
        for f in sorted(d.glob("*.yaml")):
            typer.echo(f"  {f.stem:<16} {_describe(f)}")


@app.command()
def validate() -> None:
    """Compose every option of every group (and every experiment) and type-check it."""
    from sdft_cli.compose import GROUPS, compose, conf_dir

    root = conf_dir()
    failures = 0
    for g in GROUPS:
        for f in sorted((root / g).glob("*.yaml")):
            override = f"'task=[{f.stem}]'" if g == "task" else f"{g}={f.stem}"
            try:
                compose([override.strip("'"), *REQUIRED_WITH.get(override, [])])
                typer.echo(f"ok    {override}")
            except SdftError as e:
                failures += 1
                typer.echo(f"FAIL  {override}: {e}")
    from sdft_cli.names import METHODS

    for folder in sorted(p for p in (root / "experiment_method").iterdir() if p.is_dir()):
        # every method in every experiment with per-method settings (experiment_method/<exp>/<method>.yaml)
        for method in METHODS:
            overrides = [f"experiment={folder.name}", f"method={method}"]
            note = (
                ""
                if (folder / f"{method}.yaml").is_file()
                else "  (no per-method file: the method's defaults)"
            )
            try:
                compose(overrides)
                typer.echo(f"ok    {' '.join(overrides)}{note}")
            except SdftError as e:
                failures += 1
                typer.echo(f"FAIL  {' '.join(overrides)}: {e}")
    if failures:
        _fail(f"{failures} config(s) failed to compose", code=1)
    typer.echo("all configs compose and type-check")


@app.command()
def matrix(
    run_dir: Path = typer.Argument(..., help="A run directory (contains matrix.json)."),
    json_out: bool = typer.Option(False, "--json", help="Print matrix.json instead of the table."),
) -> None:
    """Print the forgetting matrix and ACC/BWT/FWT/forgetting of a run."""
    import json

    from sdft_cli.report import load_matrix, print_matrix

    try:
        data = load_matrix(run_dir)
    except FileNotFoundError as e:
        _fail(str(e))
    if json_out:
        typer.echo(json.dumps(data, indent=2))
    else:
        print_matrix(data)


@app.command()
def plan(
    overrides: list[str] = typer.Argument(None, help="Hydra overrides, as for `sdft run`."),
    params: float = typer.Option(None, help="Model parameters (default: from the model's config, if local)."),
    tflops: float = typer.Option(400.0, help="Effective TFLOP/s per GPU for the GPU-hour estimate."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    device_gib: float = typer.Option(
        None, "--device-gib", help="Plan memory for one GPU of this size and say whether the run fits."
    ),
    processes: int = typer.Option(1, help="Processes (GPUs) the run is sharded over with FSDP2."),
) -> None:
    """Print what a run would do and its peak memory per device, without loading the model's weights."""
    import json
    from dataclasses import asdict

    from sdft_cli.compose import compose
    from sdft_cli.memory import render_memory
    from sdft_cli.plan import count_parameters, count_trainable, memory, render
    from sdft_cli.plan import plan as make_plan

    try:
        cfg = compose(overrides or [])
        p = make_plan(cfg, params or count_parameters(cfg), count_trainable(cfg))
        cuda = device_gib is not None or cfg.device == "cuda"
        if cfg.device == "auto" and device_gib is None:
            import torch

            cuda = torch.cuda.is_available()
        mem = memory(cfg, "cuda" if cuda else "cpu", device_gib, processes)
    except SdftError as e:
        _fail(str(e))
    if json_out:
        p["memory"] = None if mem is None else {**asdict(mem), "peak": mem.peak, "device_gib": device_gib}
        typer.echo(json.dumps(p, indent=2))
        return
    lines = [render(p, tflops), ""]
    if mem is None:
        lines.append("memory plan: needs the model's config and the task rows here")
    else:
        lines += render_memory(mem, device_gib)
    typer.echo("\n".join(lines))


@app.command()
def compare(
    sweep_dir: Path = typer.Argument(..., help="A sweep directory (runs below it contain matrix.json)."),
) -> None:
    """Compare the runs of a sweep: runs that differ only in seed form a group; mean and 95% CI.

    Writes comparison.md and comparison.json into SWEEP_DIR and prints the markdown.
    """
    from sdft_cli.compare import write_report

    try:
        path = write_report(sweep_dir)
    except SdftError as e:
        _fail(str(e))
    typer.echo(path.read_text())


@app.command()
def report(
    run_dir: Path = typer.Argument(
        ..., help="A run or a sweep directory (runs below it contain matrix.json)."
    ),
    out: Path = typer.Option(None, help="Where to write (default: RUN_DIR)."),
) -> None:
    """The continual-learning report: report.html (self-contained), report.md, report.json, figures/."""
    from sdft_cli.analysis import write_report

    try:
        path = write_report(run_dir, out)
    except SdftError as e:
        _fail(str(e))
    typer.echo(f"[sdft] report: {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
