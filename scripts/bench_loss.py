"""Peak memory and time of the chunked (fused with the output head) vs the naive full-vocabulary loss.

Forward + backward of the SDFT loss (per-token forward KL with entropies and sampled-token log-probs,
as in training) from final hidden states: student ``h @ W.T`` with gradients to ``h`` and ``W``,
teacher ``h_t @ W_t.T`` without. The naive loss holds ``[tokens, vocab]`` logits for both models
through autograd; the chunked one never holds more than ``chunk`` rows of them.

Each measurement runs in a fresh process. Memory: on CUDA, ``max_memory_allocated`` above the inputs;
on CPU, peak RSS (``ru_maxrss``) above the RSS after the inputs were allocated and a tiny warm-up run
(library workspaces), with glibc's mmap threshold fixed so freed tensors leave the RSS. Both include
the ``[vocab, hidden]`` gradient of ``W``, which any implementation produces. Time: median of
``--repeats`` timed runs after one warm-up, in another process with the default allocator settings.

    python scripts/bench_loss.py                                  # V=152,064, lengths 512 and 2048
    python scripts/bench_loss.py --hidden 3584 --chunk 512 --lengths 2048 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PASSED = ("vocab", "hidden", "batch", "chunk", "divergence", "dtype", "device", "repeats", "threads")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args) -> dict:
    import torch

    from sdft_cli.config import DivergenceSpec
    from sdft_cli.divergence import distillation
    from sdft_cli.loss import LinearHead, fused_loss

    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    n, v, hdim = args.batch * args.length, args.vocab, args.hidden

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    W = randn(v, hdim, scale=hdim**-0.5).requires_grad_(True)
    W_t = randn(v, hdim, scale=hdim**-0.5)
    h = randn(n, hdim).requires_grad_(True)
    h_t = randn(n, hdim)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    weights = torch.full((n,), 1.0 / n, device=device)
    objective = distillation(DivergenceSpec(divergence=args.divergence))
    chunk = args.chunk if args.impl == "chunked" else 0

    def run_once(k: int = n) -> tuple[float, float]:
        t0 = time.perf_counter()
        head, head_t = LinearHead(W), LinearHead(W_t)
        out = fused_loss(
            h[:k],
            head,
            params=[W],
            objective=objective,
            targets=targets[:k],
            weights=weights[:k],
            teacher=h_t[:k],
            teacher_head=head_t,
            chunk_size=chunk,
        )
        out.loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        value = float(out.loss.detach())
        W.grad = None
        h.grad = None
        del out
        return time.perf_counter() - t0, value

    if args.measure == "time":
        _, value = run_once()  # warm-up
        times = [run_once()[0] for _ in range(args.repeats)]
        return {"seconds": statistics.median(times), "loss": value}
    run_once(8)  # library workspaces, kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    _, value = run_once()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"peak_bytes": peak, "loss": value}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--chunk", type=int, default=64, help="tokens per chunk of the chunked loss")
    p.add_argument("--divergence", default="forward")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--impl", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--measure", choices=["memory", "time"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.impl:  # one measurement, in this fresh process
        print(json.dumps(worker(args)))
        return

    print(
        f"loss forward+backward · vocab {args.vocab:,} · hidden {args.hidden} · batch {args.batch} · "
        f"{args.dtype} · {args.device} · chunk {args.chunk} tokens · {args.divergence} KL"
    )
    print(
        f"{'length':>6} | {'naive GiB':>9} {'chunked GiB':>11} {'mem ratio':>9} | "
        f"{'naive s':>8} {'chunked s':>9} {'time ratio':>10} | {'|Δloss|':>8}"
    )
    for length in args.lengths:
        res: dict[str, dict] = {"naive": {}, "chunked": {}}
        for impl in ("naive", "chunked"):
            for measure in ("memory", "time"):
                cmd = [
                    sys.executable,
                    __file__,
                    "--impl",
                    impl,
                    "--length",
                    str(length),
                    "--measure",
                    measure,
                ]
                cmd += [f"--{k}={getattr(args, k)}" for k in PASSED]
                env = dict(os.environ)
                if measure == "memory":
                    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed tensors go back to the OS at once
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
                res[impl].update(json.loads(out.stdout.strip().splitlines()[-1]))
        n, c = res["naive"], res["chunked"]
        gib = 1024**3
        print(
            f"{length:>6} | {n['peak_bytes'] / gib:>9.2f} {c['peak_bytes'] / gib:>11.2f} "
            f"{c['peak_bytes'] / n['peak_bytes']:>9.1%} | {n['seconds']:>8.2f} {c['seconds']:>9.2f} "
            f"{c['seconds'] / n['seconds']:>9.2f}x | {abs(n['loss'] - c['loss']):>8.1e}",
            flush=True,
        )
    grad_w = args.vocab * args.hidden * 4 / 1024**3
    print(f"(both include the {grad_w:.2f} GiB float32 gradient of the [vocab, hidden] head)")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
