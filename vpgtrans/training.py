"""Helpers shared by the training stages: what is trainable, parameter groups, schedules, budgets, run
options, the data position, the token-level loss, and SIGTERM handling."""

from __future__ import annotations

import inspect
import logging
import math
import signal
import threading
from dataclasses import dataclass

import torch

from vpgtrans.config import TrainConfig
from vpgtrans.errors import VpgtransError
from vpgtrans.prompting import IGNORE_INDEX

log = logging.getLogger(__name__)


def set_trainable(model, names: list[str]) -> dict[str, int]:
    """Freeze everything, then unfreeze the parts ``names`` names (``vpg``, ``connector``, an adapter's
    name: the model's parts table); return counts.

    No base weight is ever trainable: the vision encoder and the LLM's own weights stay frozen; inside
    the LLM only the adapter parts' weights train (checked here, not assumed)."""
    parts = trained_parts(model, names)
    model.requires_grad_(False)
    trainable = {id(param) for part in parts for param in part.parameters(model)}
    for part in parts:
        for param in part.parameters(model):
            param.requires_grad_(True)
    counts = {"trainable": 0, "frozen": 0}
    for param in model.parameters():
        counts["trainable" if param.requires_grad else "frozen"] += param.numel()
    adapters = sum(param.numel() for part in parts if part.in_llm for param in part.parameters(model))
    counts["llm_trainable"] = adapters  # the adapters' weights inside the LLM; its base weights: none
    base = sum(p.numel() for p in [*model.vision.parameters(), *model.llm.parameters()]
               if p.requires_grad and id(p) not in trainable)
    if base:
        raise AssertionError(f"{base} base weights of the vision encoder / LLM would train")
    log.info("trainable parameters: %s (%s); frozen: %s", f"{counts['trainable']:,}",
             "+".join(part.name for part in parts), f"{counts['frozen']:,}")
    return counts


def trained_parts(model, names: list[str]) -> list:
    """The parts ``names`` names, from the model's parts table (unknown names: one line)."""
    known = [part.name for part in model.parts]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise VpgtransError(f"trainable parts {', '.join(map(repr, unknown))} are not parts of this model "
                            f"(it has {', '.join(known)})")
    return [part for part in model.parts if part.name in names]


def train_mode(model, core, trained: list) -> None:
    """Train mode for the trained parts only: frozen parts (ViT, LLM, and the VPG during the warm-up)
    keep dropout off, as BLIP-2 does for its frozen ViT and VPGTrans for its frozen Q-Former.
    ``model`` is what runs the step (a DDP / FSDP wrapper, or ``core`` itself)."""
    model.train()
    core.eval()
    for part in trained:
        for module in part.modules(core).values():
            module.train()


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups as LAVIS builds them: no weight decay on biases and norms (1-D tensors)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(config: TrainConfig, total_steps: int):
    """Multiplier of ``config.lr`` at an optimizer step: linear warm-up (``warmup_steps``, else
    ``warmup_fraction`` of the steps), then constant (``min_lr`` None)
    or cosine decay (BLIP-2's schedule) that reaches ``min_lr`` at the last step, ``total_steps - 1``."""
    floor = None if config.min_lr is None else config.min_lr / config.lr
    warmup = config.warmup_steps or round(config.warmup_fraction * total_steps)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if floor is None:
            return 1.0
        span = max(1, total_steps - 1 - warmup)  # the last step (total - 1) runs at min_lr
        progress = min(1.0, (step - warmup) / span)
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


def check_world_size(config: TrainConfig, num_processes: int) -> None:
    """The global batch is split over processes (then into ``grad_accum`` micro-batches each): every
    process needs at least one sample of it."""
    if config.batch_size < num_processes:
        raise VpgtransError(f"global batch {config.batch_size} is smaller than the number of processes "
                            f"({num_processes}); raise --batch-size")


def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    """The data order of one epoch: a permutation fixed by (seed, epoch), the same for every arm."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_samples, generator=generator).tolist()


# --- run options (how a stage runs, not what it computes) -----------------------------------------

DTYPES = ("fp32", "bf16", "fp16")


def torch_dtype(name: str | None):
    """``--dtype`` (or accelerate's mixed-precision name) -> the frozen weights' torch dtype; None: fp32."""
    dtypes = {None: None, "no": None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in dtypes:
        raise VpgtransError(f"--dtype must be one of {', '.join(DTYPES)} (got {name!r})")
    return dtypes[name]
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX): PyTorch's capability string, then
    the kernel's CPU flags. Without it (AVX2-only CPUs) a bf16 matmul backward is ~40x slower than fp32."""
    from pathlib import Path

    if "BF16" in str(torch.backends.cpu.get_cpu_capability()).upper():
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: nothing to go by, say nothing
    return "avx512_bf16" in flags or "amx_bf16" in flags


def slow_bf16_warning(precision: str, device) -> str | None:
    """The one-line warning for bf16 training on a CPU without native bf16 matmul, or None."""
    if precision != "bf16" or getattr(device, "type", str(device)) != "cpu" or cpu_has_native_bf16():
        return None
    return (f"--dtype bf16 on this CPU ({torch.backends.cpu.get_cpu_capability()}, no AVX512-BF16 / AMX): PyTorch's bf16 "
            "matmul backward is ~40x slower than fp32 here; use --dtype fp32 (with --load-in-8bit / --load-in-4bit "
            "for a big LLM)")


REPORT_TO = ("none", "tensorboard", "wandb")


@dataclass
class RunOptions:
    """How a stage is run: checkpoints, resume, precision, quantisation, logging. Recorded in the output
    bundle's manifest (``config.run``); ``load_model`` never needs them."""

    save_every: int | None = None  # optimizer steps between checkpoints under OUT/checkpoints/
    keep_checkpoints: int = 2
    resume: bool = False
    skip_nonfinite: int = 0  # batches with a non-finite loss to skip before stopping
    dtype: str | None = None  # mixed precision; None: accelerate's launch config, else fp32
    vision_dtype: str | None = None  # the frozen ViT's weights and compute; None: as dtype
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    gradient_checkpointing: bool = False
    report_to: str = "none"
    num_workers: int = 0  # DataLoader worker processes decoding images (0: in the training process)

    def __post_init__(self) -> None:
        problems = []
        if self.save_every is not None and self.save_every < 1:
            problems.append(f"--save-every must be >= 1 (got {self.save_every})")
        if self.keep_checkpoints < 1:
            problems.append(f"keep_checkpoints must be >= 1 (got {self.keep_checkpoints})")
        if self.skip_nonfinite < 0:
            problems.append(f"--skip-nonfinite must be >= 0 (got {self.skip_nonfinite})")
        if self.dtype is not None and self.dtype not in DTYPES:
            problems.append(f"--dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})")
        if self.vision_dtype is not None and self.vision_dtype not in DTYPES:
            problems.append(f"--vision-dtype must be one of {', '.join(DTYPES)} (got {self.vision_dtype!r})")
        if self.load_in_8bit and self.load_in_4bit:
            problems.append("--load-in-8bit and --load-in-4bit exclude each other")
        if self.num_workers < 0:
            problems.append(f"--num-workers must be >= 0 (got {self.num_workers})")
        if self.report_to not in REPORT_TO:
            problems.append(f"--report-to must be one of {', '.join(REPORT_TO)} (got {self.report_to!r})")
        if problems:
            raise VpgtransError("; ".join(problems))

    @property
    def quantization(self) -> str | None:
        return "8bit" if self.load_in_8bit else "4bit" if self.load_in_4bit else None


# --- the data position ------------------------------------------------------------------------------

class DataCursor:
    """Walks the epochs' permutations; ``(epoch, cursor)`` is all a checkpoint needs to continue."""

    def __init__(self, num_samples: int, seed: int, epoch: int = 0, cursor: int = 0):
        self.num_samples, self.seed, self.epoch, self.cursor = num_samples, seed, epoch, cursor
        self.order = epoch_order(num_samples, seed, epoch)

    def take(self, count: int) -> list[int]:
        """The next ``count`` sample indices (crossing into the next epoch's order when needed)."""
        return [index for _, index in self.take_samples(count)]

    def take_samples(self, count: int) -> list[tuple[int, int]]:
        """The next ``count`` samples as ``(epoch, index)``: what ``take`` gives, each with its epoch (the
        draw key of a sample's random choices, e.g. the T5 caption split: fresh in every epoch)."""
        samples: list[tuple[int, int]] = []
        while len(samples) < count:
            if self.cursor == len(self.order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self.order = epoch_order(self.num_samples, self.seed, self.epoch)
            take = min(count - len(samples), len(self.order) - self.cursor)
            samples += [(self.epoch, index) for index in self.order[self.cursor:self.cursor + take]]
            self.cursor += take
        return samples

    def position(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}


def split_batch(indices: list, process_index: int, num_processes: int, grad_accum: int) -> list[list]:
    """This process's share of a global batch, cut into at most ``grad_accum`` micro-batches (of sample
    indices, or of whatever stands for the samples: ``DataCursor.take_samples``'s pairs).

    Shares may differ by one sample (the loss is normalised by the global number of target tokens,
    so an uneven split gives the same update)."""
    mine = indices[process_index::num_processes]
    size = max(1, math.ceil(len(mine) / grad_accum))
    return [mine[start:start + size] for start in range(0, len(mine), size)]


# --- the loss -----------------------------------------------------------------------------------------

def count_targets(batch: dict, is_encoder_decoder: bool) -> int:
    """Target tokens of a batch: labels that a logit predicts (decoder-only LMs shift by one)."""
    labels = batch["labels"] if is_encoder_decoder else batch["labels"][:, 1:]
    return int((labels != IGNORE_INDEX).sum())


def summed_loss(model, batch: dict, is_encoder_decoder: bool, keep_logits: bool) -> torch.Tensor:
    """Cross-entropy summed over the batch's target tokens (the caller divides by the global count).

    Decoder-only LLMs that take ``logits_to_keep`` compute LM-head logits only at positions that
    predict a target: none on the soft prompts and the prompt, which are most of a caption sample
    and cost (B, T, vocab) floats for nothing."""
    if is_encoder_decoder:  # T5: decoder logits only exist on the target side
        out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                    attention_mask=batch["attention_mask"], labels=batch["labels"], use_cache=False)
        return out.loss * count_targets(batch, True)
    labels = batch["labels"]
    targets = labels[:, 1:]  # (B, T-1): logit t predicts token t+1
    if keep_logits:
        positions = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)  # (P,) shared by the batch
        extra = {"logits_to_keep": positions}
        targets = targets[:, positions]  # (B, P)
    else:
        extra = {}
    out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                attention_mask=batch["attention_mask"], use_cache=False, **extra)
    logits = out.logits if keep_logits else out.logits[:, :-1]  # (B, P, V)
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")


def accepts_logits_to_keep(llm) -> bool:
    return "logits_to_keep" in inspect.signature(llm.forward).parameters


# --- SIGTERM ----------------------------------------------------------------------------------------

class StopSignal:
    """Context manager: SIGTERM (what Slurm sends on pre-emption) sets ``.received`` instead of killing
    the process, so the loop can finish its step, save a checkpoint and exit."""

    def __init__(self):
        self.received = False
        self._previous = None

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.received = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class TrainingInterrupted(VpgtransError):
    """Stopped by SIGTERM after saving a checkpoint (the CLI exits with 143, as a SIGTERM'ed process)."""
