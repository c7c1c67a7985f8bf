"""AdamW with its moments in low precision (``method.optim.moments``), for memory.

Exact AdamW keeps two fp32 moments per weight, 8 bytes per parameter: for a 135M model 1.08 GB of a
3 GB training state. ``bf16`` keeps both moments in bfloat16 (4 bytes per parameter) and updates them in
fp32, one tensor at a time, rounding back stochastically: a moment that moves by less than bf16's step
(2^-8 of its size; the second moment at beta2 = 0.999 does every step) still moves on average instead
of stalling. The rounding noise is drawn from a generator seeded by the step and the tensor's index, so
a resumed run rounds exactly as an uninterrupted one. Weights and their update stay fp32, and clipping
by the global gradient norm happens before the step as always. (8-bit moments, torchao's
``AdamW8bit``, keep them in a tensor subclass that torch's optimizer state dicts and our
``weights_only`` checkpoint loading do not carry; they are not offered.) ``tests/test_optim.py``
bounds how far 200 steps drift from exact AdamW on the tiny model.
"""

from __future__ import annotations

import torch

# elements per slice of a tensor's update (16 MiB of fp32): the step's temporaries stay this small
CHUNK = 1 << 22


def _round_stochastic(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability equal to the dropped fraction (unbiased)."""
    bits = x.view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # the low 16 bits are zero


def seeded(*key: int) -> torch.Generator:
    """A generator for one tensor's rounding at one step: the same draw after a resume."""
    return torch.Generator().manual_seed(hash(key) % 2**62)


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
                gen = seeded(self.seed, t, index) if low else None
                flat, grad = p.view(-1), p.grad.view(-1)
                m_all, v_all = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
                # slice by slice: the fp32 temporaries span CHUNK elements, not the largest tensor
                for part, a in enumerate(range(0, flat.numel(), CHUNK)):
                    sl = slice(a, a + CHUNK)
                    w, g = flat[sl], grad[sl].float()
                    m = m_all[sl].float().lerp_(g, 1 - b1)  # in place when the moments are fp32
                    v = v_all[sl].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                    if gen is not None:
                        m_all[sl].copy_(_round_stochastic(m, gen))
                        v_all[sl].copy_(_round_stochastic(v, gen))
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
