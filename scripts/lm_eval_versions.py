"""What the lm-eval version changes on one fixed model and task: run the test fixture's local
multiple-choice task (tests/fixtures/lm_eval) on SmolLM2-135M-Instruct at batch sizes 1 and 16 through
lm-eval's HF backend on the in-memory model (as sdft_cli's suite runs it), and print the accuracy, the
sum of every request's log-likelihood and a digest of them all (sha256 of the 4-decimal values).

Run it in two environments, one with the installed lm-eval and one with the harness commit the paper's
code pins (03c44adc, installed from a checkout, with the paper's transformers 4.57.1 and datasets 4.3.0:
that commit does not import under transformers 5), and compare the lines (docs/experiments.md shows
both):

    .venv/bin/python scripts/lm_eval_versions.py
    /tmp/lme-venv/bin/python scripts/lm_eval_versions.py ~/.cache/sdft_cli/models/smollm2-135m-instruct-hf
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "lm_eval"


def main() -> None:
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if len(sys.argv) > 1:  # an environment without sdft_cli (the paper's transformers 4.57)
        path = Path(sys.argv[1])
    else:
        from sdft_cli.artifacts import cache_dir
        from sdft_cli.builders import convert_smollm2

        path = convert_smollm2(cache_dir() / "models" / "smollm2-135m-instruct-hf")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False).eval()
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    with tempfile.TemporaryDirectory() as tmp:
        text = (FIXTURES / "arith.yaml.in").read_text().replace("@DATA@", str(FIXTURES / "arith.jsonl"))
        (Path(tmp) / "arith.yaml").write_text(text)
        tm = TaskManager(include_path=tmp)
        for batch in (1, 16):
            torch.manual_seed(0)
            lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch)
            out = lm_eval.simple_evaluate(
                model=lm, tasks=["sdft_test_mc"], batch_size=batch, log_samples=True, task_manager=tm
            )
            samples = out["samples"]["sdft_test_mc"]
            lls = [round(float(r[0][0]), 4) for s in samples for r in s["resps"]]
            digest = hashlib.sha256(json.dumps(lls).encode()).hexdigest()[:12]
            acc = out["results"]["sdft_test_mc"]["acc,none"]
            version = out.get("lm_eval_version") or lm_eval.__version__
            print(
                f"lm-eval {version} batch {batch}: acc {acc:.4f}, "
                f"{len(lls)} log-likelihoods, sum {sum(lls):.4f}, digest {digest}",
                flush=True,
            )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
