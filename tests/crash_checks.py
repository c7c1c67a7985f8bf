"""What the crash harness checks after the kills (a run against the uninterrupted one, and what a killed
run left behind) and how a campaign is reported. Used by ``crash_harness.py``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from crash_harness import Outcome


# ----------------------------------------------------------------------------- checks


def progress(run: Path) -> str:
    """Where a killed run stopped, from what it left: the last complete stage or checkpoint."""
    if not run.is_dir():
        return "nothing written"
    done = sorted(run.rglob("manifest.json"), key=lambda p: p.stat().st_mtime_ns)
    done = [p.parent.relative_to(run).as_posix() for p in done]
    steps = [json.loads(x) for x in _lines(run / "metrics.jsonl")]
    last = next((f"stage {r['stage']} step {r['step']}" for r in reversed(steps) if "step" in r), "no step")
    return f"{done[-1] if done else 'no stage'}; {last}"


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            json.loads(line)
        except json.JSONDecodeError:
            out.append('{"torn": true}')
            continue
        out.append(line)
    return out


VOLATILE = ("time/", "mem/", "train/tokens_per_s")


def log_records(run: Path) -> list[dict]:
    """metrics.jsonl without the fields that measure wall time."""
    return [
        {k: v for k, v in json.loads(x).items() if not k.startswith(VOLATILE)}
        for x in _lines(run / "metrics.jsonl")
    ]


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def compare(run: Path, ref: Path) -> tuple[list[str], list[str]]:
    """(mismatches, data lost) of a completed ``run`` against the uninterrupted ``ref``."""
    import torch

    from sdft_cli.artifacts import sha256_file

    mismatches, lost = [], []
    for suffix in ("csv", "json", "md", "png"):
        a, b = run / f"matrix.{suffix}", ref / f"matrix.{suffix}"
        if not a.is_file():
            lost.append(f"{a} missing")
        elif a.read_bytes() != b.read_bytes():
            mismatches.append(f"{a.name} differs")
    for rel in sorted(p.relative_to(ref) for p in ref.glob("t*/train/*/*.safetensors")):
        if not (run / rel).is_file():
            lost.append(f"{rel} missing")
            continue
        a, b = weights(run / rel), weights(ref / rel)
        if a.keys() != b.keys():
            mismatches.append(f"{rel}: tensor names differ")
        bad = [k for k in b if k in a and not torch.equal(a[k], b[k])]
        if bad:
            diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in bad)
            mismatches.append(f"{rel}: {len(bad)} tensors differ (max abs {diff:.3g})")
    for manifest in sorted(p.relative_to(ref) for p in ref.rglob("manifest.json")):
        if not (run / manifest).is_file():
            lost.append(f"{manifest} missing (stage not complete)")
            continue
        mine = json.loads((run / manifest).read_text())["files"]
        theirs = json.loads((ref / manifest).read_text())["files"]
        for rel, meta in mine.items():  # intact: what the manifest promises is there
            f = run / manifest.parent / rel
            if not f.is_file() or f.stat().st_size != meta["bytes"]:
                lost.append(f"{f} listed in its manifest but missing or truncated")
            elif "sha256" in meta and sha256_file(f) != meta["sha256"]:
                lost.append(f"{f} does not match its manifest's sha256")
        if mine.keys() != theirs.keys():
            mismatches.append(f"{manifest}: files {sorted(set(mine) ^ set(theirs))} differ")
        changed = [r for r in mine if r in theirs and mine[r].get("sha256") != theirs[r].get("sha256")]
        if changed:
            mismatches.append(f"{manifest}: {changed} differ from the uninterrupted run")
    extra = sorted(
        p.relative_to(run) for p in run.rglob("manifest.json") if not (ref / p.relative_to(run)).exists()
    )
    if extra:
        mismatches.append(f"stages the uninterrupted run does not have: {extra}")
    mine, theirs = log_records(run), log_records(ref)
    missing = [r for r in theirs if r not in mine]
    if missing:
        lost.append(f"metrics.jsonl lacks {len(missing)} records, first {missing[0]}")
    elif mine != theirs:
        mismatches.append(f"metrics.jsonl differs: {len(mine)} records vs {len(theirs)}")
    if list(run.glob("t*/train/checkpoints")):
        mismatches.append("checkpoints left behind in a complete stage")
    return mismatches, lost


# ----------------------------------------------------------------------------- the report


def table(rows: list[tuple[str, Outcome]]) -> str:
    """A markdown table, one row per kill point (the trial's restarts and match on its first row)."""
    out = [
        "| trial | kill point | stage | fired | landed in | restarts | match |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, o in rows:
        for i, f in enumerate(o.faults):
            fired = "yes" if o.launches[i].killed else "no"
            trial, restarts, match = (
                (name, o.restarts, "yes" if o.match else "NO") if i == 0 else ("", "", "")
            )
            out.append(
                f"| {trial} | `{f.label}` | {f.stage} | {fired} | {o.landed[i]} | {restarts} | {match} |"
            )
    return "\n".join(out)


def totals(rows: list[tuple[str, Outcome]]) -> dict[str, int]:
    outcomes = [o for _, o in rows]
    return {
        "trials": len(outcomes),
        "faults_planned": sum(len(o.faults) for o in outcomes),
        "faults_injected": sum(o.fired for o in outcomes),
        "runs_recovered": sum(o.recovered for o in outcomes),
        "restarts": sum(o.restarts for o in outcomes),
        "mismatches": sum(bool(o.mismatches) for o in outcomes),
        "data_lost": sum(bool(o.lost) for o in outcomes),
    }
