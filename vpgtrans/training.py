"""Pure helpers shared by the training stages: what is trainable, parameter groups, schedules, budgets."""

from __future__ import annotations

import logging
import math

import torch

from vpgtrans.config import TrainConfig
from vpgtrans.errors import VpgtransError

log = logging.getLogger(__name__)


def set_trainable(model, parts: list[str]) -> dict[str, int]:
    """Freeze everything, then unfreeze the named parts (``vpg``, ``connector``); return counts.

    The vision encoder and the LLM are never trainable in these stages.
    """
    model.requires_grad_(False)
    for part in parts:
        getattr(model, part).requires_grad_(True)
    counts = {"trainable": 0, "frozen": 0}
    for param in model.parameters():
        counts["trainable" if param.requires_grad else "frozen"] += param.numel()
    counts["llm_trainable"] = sum(p.numel() for p in model.llm.parameters() if p.requires_grad)
    log.info("trainable parameters: %s (%s); frozen: %s", f"{counts['trainable']:,}", "+".join(parts),
             f"{counts['frozen']:,}")
    return counts


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups as LAVIS builds them: no weight decay on biases and norms (1-D tensors)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(config: TrainConfig, total_steps: int):
    """Multiplier of ``config.lr`` at an optimizer step: linear warm-up, then constant (``min_lr`` None)
    or cosine decay (BLIP-2's schedule) that reaches ``min_lr`` at the last step, ``total_steps - 1``."""
    floor = None if config.min_lr is None else config.min_lr / config.lr

    def multiplier(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if floor is None:
            return 1.0
        span = max(1, total_steps - 1 - config.warmup_steps)  # the last step (total - 1) runs at min_lr
        progress = min(1.0, (step - config.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def total_steps(config: TrainConfig, num_samples: int) -> int:
    """Optimizer steps of a run: ``max_steps``, else ``max_samples`` / global batch, else epochs.

    Counted in samples and optimizer steps, never micro-batches, so a run means the same on any number
    of processes.
    """
    if config.max_steps is not None:
        return config.max_steps
    samples = config.max_samples if config.max_samples is not None else config.epochs * num_samples
    return max(1, math.ceil(samples / config.batch_size))


def micro_batch_size(config: TrainConfig, num_processes: int) -> int:
    per_step = config.grad_accum * num_processes
    if config.batch_size % per_step:
        raise VpgtransError(f"global batch {config.batch_size} is not divisible by grad_accum x processes "
                            f"({config.grad_accum} x {num_processes})")
    return config.batch_size // per_step


def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    """The data order of one epoch: a permutation fixed by (seed, epoch), the same for every arm."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_samples, generator=generator).tolist()
