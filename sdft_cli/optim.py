"""AdamW with its moments in low precision (``method.optim.moments``), for memory.

Exact AdamW keeps two fp32 moments per weight, 8 bytes per parameter: for a 135M model 1.08 GB of a
3 GB training state. ``bf16`` keeps both moments in bfloat16 (4 bytes per parameter) and updates them in
fp32, one tensor at a time, rounding back stochastically: a moment that moves by less than bf16's step
(2^-8 of its size; the second moment at beta2 = 0.999 does every step) still moves on average instead
of stalling. The rounding noise is read from a fixed random table at offsets set by the step, the
tensor and the slice, so a resumed run rounds exactly as an uninterrupted one. Weights and their update
stay fp32, and clipping by the global gradient norm happens before the step as always. (8-bit moments,
torchao's ``AdamW8bit``, keep them in a tensor subclass that torch's optimizer state dicts and our
``weights_only`` checkpoint loading do not carry; they are not offered.) ``tests/test_optim.py``
bounds how far 200 steps drift from exact AdamW on the tiny model.
"""

from __future__ import annotations

import torch

# elements per slice of a tensor's update (16 MiB of fp32): the step's temporaries stay this small
CHUNK = 1 << 22


_TABLE_SEED = 0x5DF7
_tables: dict[torch.device, torch.Tensor] = {}


def _noise_table(device: torch.device) -> torch.Tensor:
    """CHUNK uniform 16-bit integers, the same in every process and run (a fixed seed)."""
    table = _tables.get(device)
    if table is None:
        g = torch.Generator().manual_seed(_TABLE_SEED)
        table = torch.randint(0, 1 << 16, (CHUNK,), dtype=torch.int32, generator=g).to(device)
        _tables[device] = table
    return table


def _round_stochastic(x: torch.Tensor, *key: int) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability equal to the dropped fraction (unbiased).

    The noise added below the kept bits is a fixed table of uniform values read from an offset drawn
    from ``key`` (seed, step, tensor, slice): one add per element instead of a random draw per element
    (a generator's draw costs ~6x the rest of the rounding on a CPU). Each element's noise is uniform
    whatever the offset, so the rounding is unbiased; the offset changes with every step, so an element
    does not see the same noise twice in a row; and a resumed run reads the same offsets.
    """
    table = _noise_table(x.device)
    bits = x.reshape(-1).view(torch.int32).clone()
    off, done, n = hash(key) % CHUNK, 0, bits.numel()
    while done < n:
        take = min(n - done, CHUNK - off)
        bits[done : done + take].add_(table[off : off + take])
        done, off = done + take, 0
    return bits.bitwise_and_(-65536).view(torch.float32).to(torch.bfloat16).view(x.shape)


def _moments_to_dtype(opt: torch.optim.Optimizer) -> None:
    """``Optimizer.load_state_dict`` casts state to the weights' dtype; the moments go back to theirs
    (exactly: they were values of that dtype)."""
    for state in opt.state.values():
        for k in ("exp_avg", "exp_avg_sq"):
            if k in state:
                state[k] = state[k].to(opt.moments)


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected) over fp32 weights, one tensor at a time, with its
    moments in ``moments`` (bf16: stochastic rounding), in slices of ``CHUNK`` elements.
    ``on_update(p, sl, old, step, index, part)`` runs after each slice's update with its previous values
    (``old`` = the flat slice ``sl`` of ``p``, slice number ``part``), so state that follows the weights
    (the offset teacher, ``teacher.py``) is updated inside the step with one slice's copy alive."""

    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, moments=torch.bfloat16, seed=0
    ):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.moments, self.seed = moments, seed
        self.on_update = None
        self.register_load_state_dict_post_hook(_moments_to_dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        low = self.moments != torch.float32
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.moments)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moments)
                state["step"] += 1
                t = int(state["step"])
                flat, grad = p.view(-1), p.grad.view(-1)
                m_all, v_all = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
                # slice by slice: the fp32 temporaries span CHUNK elements, not the largest tensor
                for part, a in enumerate(range(0, flat.numel(), CHUNK)):
                    sl = slice(a, a + CHUNK)
                    w, g = flat[sl], grad[sl].float()
                    m = m_all[sl].float().lerp_(g, 1 - b1)  # in place when the moments are fp32
                    v = v_all[sl].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                    if low:
                        m_all[sl].copy_(_round_stochastic(m, self.seed, t, index, part, 0))
                        v_all[sl].copy_(_round_stochastic(v, self.seed, t, index, part, 1))
                    old = w.clone() if self.on_update is not None else None
                    if wd:
                        w.mul_(1 - lr * wd)
                    denom = (v / (1 - b2**t)).sqrt_().add_(eps)
                    w.addcdiv_(m, denom, value=-lr / (1 - b1**t))
                    if old is not None:
                        self.on_update(p, sl, old, t, index, part)
        return loss


def adamw(params, cfg, seed: int = 0, per_tensor: bool = False) -> torch.optim.Optimizer | None:
    """The optimizer ``method.optim`` asks for over ``params`` (fp32 weights): ours for bf16 moments or
    when the caller needs the per-tensor hook; None for torch's fused AdamW."""
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.moments == "bf16" or per_tensor:
        moments = torch.bfloat16 if cfg.moments == "bf16" else torch.float32
        return AdamW(params, moments=moments, seed=seed, **kw)
    return None
