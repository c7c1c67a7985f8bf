"""Data-parallel training over several processes with FSDP2 (``torch.distributed.fsdp.fully_shard``).

A run is distributed when its launcher starts one process per device and says so in the environment:
``torchrun`` and ``accelerate launch`` set RANK/WORLD_SIZE/LOCAL_RANK, and a Slurm step with several
tasks is read through submitit's ``TorchDistributedEnvironment``. Nothing else changes on the command
line: every process runs the same ``sdft run ...``.

What is split: each rank samples, scores and back-propagates its share of every optimizer step's
prompts. FSDP2 shards the student's weights, gradients and optimizer state, and the EMA teacher the same
way (its update works shard by shard). The loss is normalised by the global token (or sequence) count
and gradients are summed, so a step is the one-process step on the same rollouts. Generation needs
whole weights on every rank: each rank decodes with a full inference replica that is synced after
every optimizer step, one tensor at a time (the transformers backend; the sharded model cannot run
``generate`` on its own without lock-stepping every rank through every token).

Rank 0 evaluates and writes every file; the other ranks wait at the next collective, which is why
``dist.timeout_min`` must exceed the longest evaluation stage. Checkpoints hold full, unsharded state
(gathered on rank 0's CPU), so a run resumes with any number of processes.
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass
from datetime import timedelta

import torch

from sdft_cli.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (world 1: not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    # FSDP2's reshard_after_forward (dist.reshard_after_forward)
    reshard_after_forward: bool = True

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


_current = Dist()


def current() -> Dist:
    return _current


def _from_slurm() -> None:
    """Export RANK/WORLD_SIZE/... for a Slurm step with several tasks (submitit's helper reads the
    SLURM_* variables and picks the master address from the node list)."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    if "SUBMITIT_EXECUTOR" not in os.environ and "SUBMITIT_FOLDER" not in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export()


def init(
    backend: str, timeout_min: int, device: torch.device, reshard_after_forward: bool = True
) -> tuple[Dist, torch.device]:
    """Join the process group when launched as one of several processes; returns this process's
    place and device (``cuda:LOCAL_RANK`` on GPUs)."""
    global _current
    _from_slurm()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _current, device
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local} but this node has {torch.cuda.device_count()} CUDA devices: "
                "start at most one process per device"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_min))
    _current = Dist(rank=rank, world=world, local_rank=local, reshard_after_forward=reshard_after_forward)
    return _current, device


def shutdown() -> None:
    global _current
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _current = Dist()


# ----------------------------------------------------------------------------- collectives


def _comm_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_floats(values: list[float]) -> list[float]:
    """Element-wise sums over ranks (identity in one process)."""
    if not _current.enabled:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any (a preemption signal seen by one rank stops all)."""
    return bool(sum_floats([float(flag)])[0]) if _current.enabled else flag


def from_main(flag: bool) -> bool:
    """Rank 0's value on every rank (which stages still need work is decided once, by rank 0)."""
    if not _current.enabled:
        return flag
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=_comm_device())
    dist.broadcast(t, src=0)
    return bool(t.item())


def gather(obj) -> list:
    """Every rank's ``obj``, in rank order."""
    if not _current.enabled:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * _current.world
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _current.enabled:
        import torch.distributed as dist

        dist.barrier()


def my_share(items: list) -> list:
    """This rank's contiguous share of a step's items (equal shares: ``len(items) % world == 0``)."""
    n = len(items) // _current.world
    return items[_current.rank * n : (_current.rank + 1) * n]


def check_divisible(key: str, value: int) -> None:
    if _current.enabled and value % _current.world:
        raise ConfigError(
            f"{key}={value} is not divisible by the {_current.world} training processes; "
            "every rank takes an equal share of each step"
        )


# ----------------------------------------------------------------------------- sharded models


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _hidden(self, **kwargs):
    return self.get_decoder()(**kwargs)


def shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """FSDP2 over the world: one unit per transformer block, the root (embeddings, final norm, head)
    last. In place; returns the model.

    The training loss reads the decoder's hidden states and the output head's weight directly (the
    chunked loss never forms full logits), so the root gets a registered forward method, ``sdft_hidden``,
    that gathers its weights like ``forward`` does (``score.completion_hidden`` calls it).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (_current.world,))
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in blocks]
    if not layers:
        raise ConfigError(f"{type(model).__name__} names no transformer block class (_no_split_modules)")
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=_current.reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=_current.reshard_after_forward)
    model.sdft_hidden = types.MethodType(_hidden, model)
    register_fsdp_forward_method(model, "sdft_hidden")
    for unit in [*layers, model]:  # summed over ranks, not averaged: the loss divides by the global count
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
    return model


def unshard(model: torch.nn.Module) -> None:
    """Gather a sharded model's root weights (embeddings, head) for use outside its forward: the
    chunked loss reads the head's weight directly. The next backward (or ``reshard``) frees them."""
    if is_sharded(model):
        model.unshard()


def reshard(model: torch.nn.Module) -> None:
    """Free a sharded model's gathered root weights (the teacher's, kept after its forward)."""
    if is_sharded(model):
        model.reshard()


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly) sharded tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an all-gather for a sharded one)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def scalar(t) -> float:
    return float(full(t.detach())) if isinstance(t, torch.Tensor) else float(t)


def _tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """alias name -> the name ``named_parameters`` keeps for the same tensor (tied embeddings)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state on the CPU: every rank takes part, rank 0 gets it, the others ``{}``."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def load_full_state(model: torch.nn.Module, state: dict[str, torch.Tensor], strict: bool = True):
    """Load a whole (unsharded) state into ``model``, sharded or not; tied aliases may be absent."""
    state = dict(state)
    for alias, twin in _tied_aliases(model).items():
        if alias not in state and twin in state:
            state[alias] = state[twin]
    if not is_sharded(model):
        return model.load_state_dict(state, strict=strict)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    return set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))


def optimizer_state(model: torch.nn.Module, opt) -> dict:
    """The optimizer's whole state keyed by parameter name (the same layout for any world size)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, opt, options=opts)


def load_optimizer_state(model: torch.nn.Module, opt, state: dict) -> None:
    """Restore ``optimizer_state``'s output (or a plain ``opt.state_dict()``) into ``opt``."""
    keyed_by_name = any(isinstance(k, str) for k in state.get("state", {})) or any(
        isinstance(p, str) for g in state.get("param_groups", []) for p in g["params"]
    )
    if is_sharded(model):
        if not keyed_by_name:
            raise RuntimeError("an index-keyed optimizer state resumes in one process only")
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
        return
    if keyed_by_name:  # names -> the optimizer's own indices (its params are the trainable ones, in order)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        index = {n: i for i, n in enumerate(names)}
        state = {
            "state": {index[k]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [index[p] for p in g["params"]]} for g in state["param_groups"]],
        }
    opt.load_state_dict(state)
