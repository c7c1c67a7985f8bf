"""A small synthetic sweep in the layout `sdft run` writes, for the report's tests: every number is
chosen so that the report's figures can be computed by hand.

Tasks A and B (trained), prior columns P and Q. Sequential groups: sdft (seeds 0, 1, 2 in order A→B,
seed 0 also in order B→A), sft (seeds 0, 1: unequal seed counts), dft (seed 0: a single seed). One sdft
run has a NaN cell (Q at stage 2). References: single-task (seed 0) and joint (seed 0), method sft.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from sdft_cli.report import write_matrix

TASKS, PRIORS = ["A", "B"], ["P", "Q"]
NAN = float("nan")
STEPS = 10  # optimizer steps per stage

# (method, seed, order) -> R rows (base, after stage 1, after stage 2), columns in training order + P, Q
RUNS: dict[tuple[str, int, tuple[str, ...]], list[list[float]]] = {
    ("sdft", 0, ("A", "B")): [[0.0, 0.0, 0.8, 0.6], [0.8, 0.1, 0.7, 0.6], [0.7, 0.9, 0.7, 0.5]],
    ("sdft", 1, ("A", "B")): [[0.0, 0.0, 0.8, 0.6], [0.6, 0.0, 0.8, 0.6], [0.6, 0.8, 0.7, NAN]],
    ("sdft", 2, ("A", "B")): [[0.0, 0.0, 0.8, 0.6], [0.7, 0.0, 0.8, 0.5], [0.5, 0.7, 0.8, 0.6]],
    ("sdft", 0, ("B", "A")): [[0.0, 0.0, 0.8, 0.6], [0.9, 0.0, 0.8, 0.6], [0.8, 0.6, 0.7, 0.6]],
    ("sft", 0, ("A", "B")): [[0.0, 0.0, 0.8, 0.6], [0.9, 0.0, 0.5, 0.4], [0.3, 0.9, 0.3, 0.2]],
    ("sft", 1, ("A", "B")): [[0.0, 0.0, 0.8, 0.6], [1.0, 0.1, 0.4, 0.4], [0.2, 1.0, 0.2, 0.3]],
    ("dft", 0, ("A", "B")): [[0.0, 0.0, 0.8, 0.6], [0.5, 0.0, 0.7, 0.6], [0.4, 0.5, 0.6, 0.5]],
}
# per-item outcomes of column A at the final stage (10 items), for the McNemar test sdft vs sft
ITEMS_A = {
    ("sdft", 0): [1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    ("sdft", 1): [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
    ("sft", 0): [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
    ("sft", 1): [1, 1, 0, 0, 0, 0, 0, 0, 1, 0],
}
# one periodic record in stage 1 of sdft seed 0 (order A→B), at step 5: test A, test B, probes
PERIODIC = {"step": 5, "test": {"A": 0.4, "B": 0.0}, "probes": {"P": 0.8, "Q": 0.6}, "val": {"A": 0.5}}
# and one of sft seed 0 (order A→B), stage 1 step 5: it matches sdft's stage-1 accuracies 0.6-0.8
SFT_PERIODIC = {"step": 5, "test": {"A": 0.75, "B": 0.0}, "probes": {"P": 0.6, "Q": 0.4}, "val": {"A": 0.7}}
SINGLE = [[0.0, 0.0, 0.8, 0.6], [0.95, 0.0, 0.6, 0.5], [0.0, 0.85, 0.6, 0.4]]
JOINT = [[0.0, 0.0, 0.8, 0.6], [0.9, 0.8, 0.5, 0.4]]


def _cells(R, order, stages):
    cols = [*order, *PRIORS]
    return [
        {
            "stage": i,
            "stage_task": "base" if i == 0 else stages[i - 1],
            "eval_task": c,
            "kind": "trained" if c in order else "prior",
            "metric": "exact_match",
            "value": None if math.isnan(R[i][j]) else R[i][j],
            "n": 10,
            "stderr": 0.0,
        }
        for i in range(len(R))
        for j, c in enumerate(cols)
    ]


def make_run(root: Path, overrides: list[str], R, method, seed, order, curriculum="sequential") -> Path:
    run = root / ",".join(overrides)
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    stages = ["joint"] if curriculum == "joint" else list(order)
    meta = {"method": method, "seed": seed, "curriculum": curriculum, "stages": stages}
    meta["kl_to_base"] = {f"{k}:{n}": 0.1 * k + 0.01 * seed for k, n in enumerate(stages[: len(R) - 1], 1)}
    write_matrix(run, _cells(R, order, stages), list(order), PRIORS, meta)
    for k, name in enumerate(stages[: len(R) - 1], start=1):
        train = run / f"t{k:02d}_{name}" / "train"
        train.mkdir(parents=True)
        (train / "manifest.json").write_text(json.dumps({"steps": STEPS, "files": {}}))
        ev = run / f"t{k:02d}_{name}" / "eval"
        (ev / "predictions").mkdir(parents=True)
        drift = {"stage": k, "weights": {"to_base": float(k), "to_previous": 1.0}, "columns": {}}
        (ev / "drift.json").write_text(json.dumps(drift))
    return run


def build(root: Path) -> Path:
    for (method, seed, order), R in RUNS.items():
        ov = [f"method={method}", f"seed={seed}", f"task=[{','.join(order)}]"]
        run = make_run(root, ov, R, method, seed, order)
        if order == ("A", "B") and (method, seed) in ITEMS_A:
            rows = [{"index": i, "score": float(s)} for i, s in enumerate(ITEMS_A[(method, seed)])]
            (run / "t02_B" / "eval" / "predictions" / "A.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in rows)
            )
        for (m, s), rec in (("sdft", 0), PERIODIC), (("sft", 0), SFT_PERIODIC):
            if (method, seed, order) == (m, s, ("A", "B")):
                full = {
                    "stage": 1,
                    "task": "A",
                    "step": rec["step"],
                    "test": {
                        t: {"metric": "exact_match", "value": v, "n": 10} for t, v in rec["test"].items()
                    },
                    "probes": {
                        t: {"metric": "exact_match", "value": v, "n": 10} for t, v in rec["probes"].items()
                    },
                    "val": {t: {"metric": "exact_match", "value": v, "n": 10} for t, v in rec["val"].items()},
                }
                (run / "t01_A" / "train" / "validation.jsonl").write_text(json.dumps(full) + "\n")
        if (method, seed, order) == ("sdft", 0, ("A", "B")):
            passk = [
                {"task": "A", "pass_at_k": {"1": 0.5, "2": 0.7}},
                {"task": "B", "pass_at_k": {"1": 0.1, "2": 0.2}},
            ]
            (run / "t01_A" / "eval" / "pass_at_k.json").write_text(json.dumps(passk))
            base = run / "t00_base" / "eval"
            base.mkdir(parents=True)
            passk0 = [
                {"task": "A", "pass_at_k": {"1": 0.0, "2": 0.1}},
                {"task": "B", "pass_at_k": {"1": 0.0, "2": 0.0}},
            ]
            (base / "pass_at_k.json").write_text(json.dumps(passk0))
    make_run(
        root,
        ["method=sft", "seed=0", "curriculum=single", "task=[A,B]"],
        SINGLE,
        "sft",
        0,
        ("A", "B"),
        "single",
    )
    make_run(
        root, ["method=sft", "seed=0", "curriculum=joint", "task=[A,B]"], JOINT, "sft", 0, ("A", "B"), "joint"
    )
    return root
