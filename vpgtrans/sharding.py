"""What the training stages need to run under FSDP (PyTorch's ``fully_shard``, "FSDP2", through
accelerate) as well as under DDP.

Under FSDP every parameter — the frozen LLM's above all — is a ``DTensor`` holding 1/N of its rows on
each process. Bundles and checkpoints always hold **whole** tensors (gathered here), so a bundle is
the same file whatever trained it, and a checkpoint resumes on any number of processes, sharded or
not. Generation during evaluation runs with whole parameters (like TRL's generation under FSDP), so
each process can generate its share of the rows without waiting on the others.

Under DDP or a single process nothing here communicates: every function returns its input's tensors.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from vpgtrans.errors import VpgtransError

TRUE = ("1", "true", "yes")


def launch_engine(quantization: str | None = None) -> str:
    """``"fsdp"`` or ``"ddp"`` (which covers one process), from the variables ``accelerate launch`` sets
    from its config; refuse the engines and combinations that would train or save the wrong thing."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").strip().lower() in TRUE:
        raise VpgtransError("DeepSpeed launches are not supported (ZeRO-3 would save one process's shard); use FSDP "
                            "(distributed_type: FSDP, fsdp_version: 2), which shards the frozen LLM the same way, "
                            "or DDP — see docs/cluster.md")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").strip().lower() not in TRUE:
        return "ddp"
    if os.environ.get("FSDP_VERSION", "1").strip() != "2":
        raise VpgtransError("FSDP needs fsdp_version: 2 in the accelerate config (FSDP_VERSION=2): version 1 "
                            "flattens frozen and trained weights together — see docs/cluster.md")
    from accelerate.utils import is_torch_version

    if not is_torch_version(">=", "2.6"):
        raise VpgtransError(f"FSDP needs torch >= 2.6 (fully_shard); this is torch {torch.__version__}")
    if quantization is not None:
        raise VpgtransError(f"--load-in-{quantization} cannot be combined with FSDP (bitsandbytes weights are not "
                            f"sharded); use one or the other — see docs/cluster.md")
    return "fsdp"


def is_sharded(value) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support: nothing can be sharded
        return False
    return isinstance(value, DTensor)


def _whole(value):
    """A sharded tensor gathered whole (a collective: every process must call it), else the value."""
    return value.full_tensor() if is_sharded(value) else value


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with whole tensors on the CPU. Under FSDP every process must call it
    (in the same order): it gathers each sharded tensor."""
    return {name: _whole(value).detach().to("cpu") for name, value in module.state_dict().items()}


def full_optimizer_state(optimizer) -> dict:
    """``optimizer.state_dict()`` with whole tensors (AdamW's moments are sharded like their
    parameters under FSDP): the format a 1-process run saves. Every process must call it."""
    saved = optimizer.state_dict()
    state = {index: {key: _whole(value).detach().to("cpu") if torch.is_tensor(value) else value
                     for key, value in entry.items()} for index, entry in saved["state"].items()}
    return {**saved, "state": state}


def shard_optimizer_state(optimizer, saved: dict) -> dict:
    """The inverse of ``full_optimizer_state`` for this process: each whole moment tensor of a sharded
    parameter becomes a shard laid out like the parameter (``step`` counters stay as they are)."""
    from torch.distributed.tensor import distribute_tensor

    params = [param for group in optimizer.param_groups for param in group["params"]]
    state = {}
    for index, entry in saved["state"].items():
        param = params[int(index)]
        if is_sharded(param):
            entry = {key: distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
                     if torch.is_tensor(value) and tuple(value.shape) == tuple(param.shape) else value
                     for key, value in entry.items()}
        state[index] = entry
    return {**saved, "state": state}


def sharding_summary(model: torch.nn.Module, world: int) -> str:
    """One line for the log: how many FSDP units, and how much of the frozen LLM this process holds."""
    from torch.distributed.fsdp import FSDPModule

    units = sum(isinstance(module, FSDPModule) for module in model.modules())
    held = sum((param.to_local() if is_sharded(param) else param).numel() for param in model.llm.parameters())
    total = sum(param.numel() for param in model.llm.parameters())
    return f"FSDP over {world} processes, {units} units: this process holds {held:,} of the LLM's {total:,} parameters"


@contextmanager
def whole_parameters(model: torch.nn.Module):
    """Inside the block every FSDP unit of ``model`` holds its whole parameters and keeps them after
    each forward: generation then runs no collective, so processes may generate different numbers of
    tokens for different numbers of rows. Costs the whole model's memory on each process for the
    block (as HF / TRL generation under FSDP does). Outside FSDP: does nothing."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6 (DDP runs evaluate here too): no FSDP2, so nothing to unshard
        FSDPModule = ()
    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    if not units:
        yield
        return
    try:
        # FSDP sets itself up on the root's first forward; an evaluation before the first step comes earlier.
        units[0]._get_fsdp_state()._lazy_init()
        # set_reshard_after_forward is the documented switch "for running evals"; it has no getter, so the
        # per-group setting it changes is kept here and put back after.
        groups = [group for unit in units for group in unit._get_fsdp_state()._fsdp_param_groups]
        before = [group.post_forward_mesh_info for group in groups]
    except AttributeError:  # these are FSDP internals (tested with torch 2.13)
        raise VpgtransError(f"evaluation during FSDP training is not supported with torch {torch.__version__}; "
                            f"train without --eval-data and evaluate the bundle with vpgtrans eval") from None
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        for group, info in zip(groups, before):
            group.post_forward_mesh_info = info


__all__ = ["launch_engine", "sharding_summary", "full_state_dict", "full_optimizer_state", "shard_optimizer_state", "whole_parameters"]
