"""How far a stage moved the model, recorded with every evaluation stage (``drift.json``): the weights'
L2 distance from the base and from the model the stage started from, and, for every evaluated column,
the length of the model's own greedy completions and its mean per-token entropy on them.

These are the drift measures that explain forgetting in the report (``sdft report``): RL's Razor's KL
to the base is in ``diagnostics.json``; ‖Δθ‖ and the completions' length and entropy are here.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from sdft_cli.divergence import entropy_from_logp
from sdft_cli.forward import completion_hidden, output_head
from sdft_cli.precision import autocast


def _tensors(model_dir: Path) -> dict[str, tuple[Path, str]]:
    """Where each weight of a Hugging Face directory lives: name -> (safetensors file, name)."""
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as g:
            for name in g.keys():  # noqa: SIM118  (safe_open is not a mapping)
                out[name] = (f, name)
    return out


def weight_distance(a_dir: Path | str, b_dir: Path | str) -> float | None:
    """‖θ_a − θ_b‖₂ over the weights both directories hold (tied aliases once), one tensor at a time in
    float64; None when either holds no safetensors (a hub id not on disk)."""
    from safetensors import safe_open

    a, b = _tensors(Path(a_dir)), _tensors(Path(b_dir))
    if not a or not b:
        return None
    opened: dict[Path, object] = {}

    def get(where: tuple[Path, str]) -> torch.Tensor:
        if where[0] not in opened:
            opened[where[0]] = safe_open(str(where[0]), framework="pt")
        return opened[where[0]].get_tensor(where[1])  # type: ignore[attr-defined]

    total = 0.0
    for name in sorted(set(a) & set(b)):
        total += float(((get(a[name]).double() - get(b[name]).double()) ** 2).sum())
    return math.sqrt(total)


@torch.no_grad()
def completion_stats(
    model: torch.nn.Module,
    results: list,
    *,
    pad_id: int,
    batch_size: int = 32,
    autocast_dtype: torch.dtype | None = None,
    chunk_tokens: int = 256,
) -> dict[str, dict]:
    """Per evaluated column (``EvalResult``): the greedy completions' mean and max length in tokens, the
    share cut by the length cap, and the model's mean per-token entropy on them (nats)."""
    head, _ = output_head(model)
    device = next(model.parameters()).device
    out: dict[str, dict] = {}
    for res in results:
        if res.completions is None or res.completion_mask is None:
            continue
        comps, masks = res.completions.clone(), res.completion_mask.clone()  # out of inference mode
        lengths = masks.sum(-1).tolist()
        entropy, tokens = 0.0, 0
        for s in range(0, len(res.contexts), batch_size):
            width = max(1, int(masks[s : s + batch_size].sum(-1).max()))
            c, m = comps[s : s + batch_size, :width], masks[s : s + batch_size, :width]
            sel = m.bool().to(device)
            h = completion_hidden(model, res.contexts[s : s + batch_size], c, m, pad_id, autocast_dtype)[sel]
            with autocast(autocast_dtype, device):
                for t in range(0, h.shape[0], chunk_tokens):
                    logp = torch.log_softmax(head(h[t : t + chunk_tokens]).float(), -1)
                    entropy += float(entropy_from_logp(logp).sum())
            tokens += int(sel.sum())
        truncated = [p.get("truncated", False) for p in res.predictions]
        out[res.task] = {
            "len_mean": sum(lengths) / max(len(lengths), 1),
            "len_max": max(lengths, default=0),
            "truncated_frac": sum(truncated) / max(len(truncated), 1),
            "entropy_token": entropy / max(tokens, 1),
            "n": len(lengths),
        }
    return out
