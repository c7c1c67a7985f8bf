"""What the step benchmark (bench_step.py) measures besides step times: resident memory per phase, this
machine's matmul throughput and read bandwidth, and the FLOPs of one step (the roofline)."""

from __future__ import annotations

import os
import resource
import statistics
import threading
import time

# ----------------------------------------------------------------------------- memory


class PhaseRSS:
    """The resident set's high-water mark per phase (rollout, score, update, optim), sampled every 2 ms
    while ``sdft_cli.logger.Timer`` says which phase runs."""

    def __init__(self) -> None:
        self.phase = "setup"
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") / 2**20
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            rss = self._rss()
            self.peak[self.phase] = max(self.peak.get(self.phase, 0.0), rss)

    def start(self) -> PhaseRSS:
        from sdft_cli import logger

        tracker, original = self, logger.Timer.__call__

        def tracked(timer, name):
            cm = original(timer, name)

            class _Phase:
                def __enter__(self):
                    tracker.phase = name
                    return cm.__enter__()

                def __exit__(self, *exc):
                    tracker.phase = "other"
                    return cm.__exit__(*exc)

            return _Phase()

        logger.Timer.__call__ = tracked
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {k: round(v, 1) for k, v in self.peak.items()}


def _rss_now() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------- FLOPs and the roofline


def matmul_gflops(threads: int, bf16: bool) -> float:
    """Best-of-N throughput of a [512 x 576] @ [576 x 1536] matmul (the model's MLP shape, a training
    micro-batch of tokens) in this process, with ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if bf16 else torch.float32
    x, w = torch.randn(512, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
    for _ in range(5):
        x @ w
    best = float("inf")
    for _ in range(30):
        t0 = time.perf_counter()
        for _ in range(10):
            x @ w
        best = min(best, (time.perf_counter() - t0) / 10)
    return 2 * 512 * 576 * 1536 / best / 1e9


def forward_flops(cfg, tokens: float, head_tokens: float, context: float) -> float:
    """Matmul FLOPs of one forward over ``tokens`` positions (attention over ``context`` keys each) with
    the output head applied at ``head_tokens`` positions."""
    d, L = cfg.hidden_size, cfg.num_hidden_layers
    hd = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * cfg.intermediate_size
    attention = 2 * L * q * context  # scores and weighted values, per position
    return 2 * tokens * (L * per_layer) + 2 * tokens * attention + 2 * head_tokens * d * cfg.vocab_size


def step_flops(model_dir: str, lengths: dict, batch: int, completion: int, weight_bytes: int = 2) -> dict:
    """FLOPs of one step at the data's mean prompt lengths: generation (prefill + decode), teacher
    forward, student forward+backward (3x forward); and SFT's forward+backward on the demonstrations."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    s = statistics.mean(lengths["student"])
    t = statistics.mean(lengths["teacher"])
    y = statistics.mean(lengths["sft_target"])
    prefill = forward_flops(cfg, s, 1, s / 2)
    decode = sum(forward_flops(cfg, 1, 1, s + i) for i in range(1, completion))
    teacher = forward_flops(cfg, t + completion, completion, (t + completion) / 2)
    student = 3 * forward_flops(cfg, s + completion, completion, (s + completion) / 2)
    sft = 3 * forward_flops(cfg, s + y, y, (s + y) / 2)
    gen = prefill + decode
    from transformers import AutoModelForCausalLM

    with torch_device_meta():
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    return {
        "decode_bytes": completion * n_params * weight_bytes,
        "rollout": batch * gen,
        "score": batch * teacher,
        "update": batch * student,
        "sdft": batch * (gen + teacher + student),
        "sft": batch * sft,
    }


def torch_device_meta():
    import torch

    return torch.device("meta")


def memory_gbs(threads: int) -> float:
    """Best-of-N read bandwidth: summing a 256 MiB tensor (decoding is bound by reading weights)."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(64 * 2**20)
    x.sum()
    best = min(_timed(x.sum) for _ in range(10))
    return x.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
