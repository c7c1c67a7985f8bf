"""The crash-anywhere campaign: SIGKILL a 2-task SDFT run on the tiny random model at every stage
(targeted and seeded random kill points), re-run the same command until it completes, compare with an
uninterrupted run, and print a table of kill points and the totals.

    python scripts/crash_campaign.py                       # every chain + 5 random trials of 2 kills
    python scripts/crash_campaign.py --chains A,C --random 0 --jobs 1
    python scripts/crash_campaign.py --ci                  # the short chain the CI test runs
    python scripts/crash_campaign.py model.lora.r=4        # the campaign on a LoRA run

Exits 1 when a run differs from the uninterrupted one, loses data, does not recover, or a targeted
kill point does not fire. The harness is tests/crash_harness.py.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import crash_harness as ch  # noqa: E402

OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "offline",
}


def snapshot(dest: Path) -> Path:
    """A copy of the package (configs included) as it is now, so every launch of the campaign runs the
    same code even while the working tree changes."""
    pkg = dest / "sdft_cli"
    shutil.copytree(REPO / "sdft_cli", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "conf", pkg / "conf", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, help="working directory (default: a new temporary one)")
    ap.add_argument("--chains", default=",".join(ch.CAMPAIGN), help="targeted chains to run (comma list)")
    ap.add_argument("--random", type=int, default=5, help="random trials")
    ap.add_argument("--random-kills", type=int, default=2, help="random kills per random trial")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random delays")
    ap.add_argument("--jobs", type=int, default=1, help="trials run at once")
    ap.add_argument("--max-restarts", type=int, default=3, help="fault-free re-runs allowed per trial")
    ap.add_argument("--ci", action="store_true", help="only the short CI chain")
    ap.add_argument("--snapshot", action="store_true", help="run a copy of the package taken at start")
    ap.add_argument("--json", type=Path, help="also write the rows and totals here")
    ap.add_argument(
        "overrides",
        nargs="*",
        help="overrides added to the campaign's run (model.lora.r=4: the same campaign on a LoRA run)",
    )
    a = ap.parse_args()

    work = a.work or Path(tempfile.mkdtemp(prefix="crash_campaign_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **OFFLINE, "SDFT_CACHE": os.environ.get("SDFT_CACHE", str(work / "cache"))}
    env.setdefault("OMP_NUM_THREADS", "2")
    if a.snapshot:
        src = snapshot(work / "src")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    harness = ch.Harness(work, env, [*ch.RUN_ARGS, *a.overrides])
    t0 = time.perf_counter()
    harness.make_reference()
    print(f"uninterrupted run: {harness.reference_seconds:.1f} s ({work / 'reference'})", flush=True)

    plan: list[tuple[str, list[ch.Fault]]]
    if a.ci:
        plan = [("ci", ch.CI_CHAIN)]
    else:
        plan = [(name, ch.CAMPAIGN[name]) for name in a.chains.split(",") if name]
        rng = random.Random(a.seed)
        for i in range(a.random):
            plan.append((f"R{i}", ch.random_faults(rng, a.random_kills, harness.reference_seconds)))

    def one(item: tuple[str, list[ch.Fault]]) -> tuple[str, ch.Outcome]:
        name, faults = item
        outcome = harness.trial(name, faults, a.max_restarts)
        print(
            f"trial {name}: fired {outcome.fired}/{len(faults)}, restarts {outcome.restarts}, "
            f"match {outcome.match} {outcome.mismatches or ''}{outcome.lost or ''}",
            flush=True,
        )
        return name, outcome

    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        rows = list(pool.map(one, plan))

    totals = ch.totals(rows)
    unfired = [
        f.label
        for _, o in rows
        for f, r in zip(o.faults, o.launches, strict=False)
        if f.target and not r.killed
    ]
    print()
    print(ch.table(rows))
    print()
    print(" · ".join(f"{k.replace('_', ' ')} {v}" for k, v in totals.items()))
    print(f"uninterrupted run {harness.reference_seconds:.1f} s; campaign {time.perf_counter() - t0:.0f} s")
    for name, o in rows:
        for line in o.mismatches + o.lost:
            print(f"{name}: {line}")
    if unfired:
        print(f"targeted kill points that did not fire: {unfired}")
    if a.json:
        a.json.write_text(
            json.dumps(
                {
                    "totals": totals,
                    "reference_seconds": harness.reference_seconds,
                    "rows": [
                        {
                            "trial": name,
                            "faults": [f.label for f in o.faults],
                            "stages": [f.stage for f in o.faults],
                            "landed": o.landed,
                            "fired": o.fired,
                            "restarts": o.restarts,
                            "match": o.match,
                            "mismatches": o.mismatches,
                            "lost": o.lost,
                        }
                        for name, o in rows
                    ],
                },
                indent=2,
            )
        )
    bad = (
        totals["mismatches"] or totals["data_lost"] or totals["runs_recovered"] < totals["trials"] or unfired
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
