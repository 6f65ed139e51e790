"""Recipes as data: a recipe is the list of training stages ``transfer`` runs after ``inherit``.

Each stage names the parts it trains, its schedule (lr, cosine floor or constant, warm-up steps), its
budget (epochs unless overridden), which of ``transfer``'s data inputs it reads (``data`` or
``finetune_data``, which falls back to ``data``) and whether it starts from freshly initialised parts.
Every stage writes its own bundle, named after the stage. No torch import here.

    vpgtrans  warmup (projector only, 5x lr, constant, 1 epoch) -> finetune (VPG + projector, 1e-4 cosine
              to 5e-5): VPGTrans (Zhang et al. 2023), as its reference code runs it
    scratch   scratch (VPG + projector freshly initialised, BLIP-2's 1e-4 cosine to 5e-5): the baseline
    infmllm   align (pool-adapter only, 1e-3 constant) -> multitask (pool-adapter + ln_vision, 1e-4 cosine to
              5e-5) -> instruct (LoRA on the LLM through peft, 2e-4 cosine to 2e-5, on ``instruct_data``):
              InfMLLM's three stages as vpgtrans runs them (the lr values are ours; InfMLLM ships no
              training code)
    lavin     finetune (LaVIN connector + mixture-of-modality adapters, lr 9e-3 x batch/256, cosine to 0
              after a 10% warm-up, AdamW (0.9, 0.95), wd 0.02, 20 epochs): LaVIN's, on the inherited ViT
    plora     warmup (projector only, as vpgtrans) -> finetune (VPG + projector + the visual-token LoRA inside
              the LLM, 1e-4 cosine to 5e-5)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vpgtrans.errors import VpgtransError


@dataclass(frozen=True)
class Stage:
    name: str  # the stage's bundle directory under transfer's --out, and its manifest "stage"
    train: dict = field(default_factory=dict)  # TrainConfig fields: trainable, lr, min_lr, warmup_steps, epochs, ...
    data: str = "data"  # "data", "finetune_data" or "instruct_data" (each falls back to the one before)
    fresh_init: bool = False  # re-initialise every part first (train-from-scratch)
    lr_batch: int | None = None  # lr (and min_lr) are for this global batch: scaled by batch_size / lr_batch

    def config(self, **overrides):
        """This stage's ``TrainConfig``: the recipe's values, then ``overrides`` (budgets, seed, batch).
        With ``lr_batch``, the recipe's lr follows the batch (LaVIN: 9e-3 x batch / 256) unless ``overrides``
        set an lr of their own."""
        from vpgtrans.config import TrainConfig

        train = dict(self.train)
        if self.lr_batch is not None and "lr" not in overrides:
            batch = overrides.get("batch_size", train.get("batch_size", TrainConfig.batch_size))
            for key in ("lr", "min_lr"):
                if train.get(key) is not None:
                    train[key] = train[key] * batch / self.lr_batch
        return TrainConfig(**{**train, **overrides})


BLIP2_SCHEDULE = {"lr": 1e-4, "min_lr": 5e-5}  # BLIP-2's stage-2 recipe: 1e-4, cosine to 5e-5

# LaVIN (Luo et al. 2023): AdamW (0.9, 0.95), wd 0.02, lr 9e-3 per 256 samples, cosine to 0 after a linear
# warm-up over 2 of its 20 epochs.
LAVIN_SCHEDULE = {"lr": 9e-3, "min_lr": 0.0, "warmup_fraction": 0.1, "betas": (0.9, 0.95), "weight_decay": 0.02,
                  "epochs": 20.0}

RECIPES: dict[str, list[Stage]] = {
    "vpgtrans": [
        Stage("warmup", {"trainable": ["connector"], "lr": 5e-4, "min_lr": None}),
        Stage("finetune", {"trainable": ["vpg", "connector"], **BLIP2_SCHEDULE}, data="finetune_data"),
    ],
    "scratch": [
        Stage("scratch", {"trainable": ["vpg", "connector"], **BLIP2_SCHEDULE}, data="finetune_data", fresh_init=True),
    ],
    "infmllm": [
        Stage("align", {"trainable": ["pool_adapter"], "lr": 1e-3, "min_lr": None}),
        Stage("multitask", {"trainable": ["ln_vision", "pool_adapter"], **BLIP2_SCHEDULE}, data="finetune_data"),
        Stage("instruct", {"trainable": ["lora"], "lr": 2e-4, "min_lr": 2e-5}, data="instruct_data"),
    ],
    "lavin": [
        Stage("finetune", {"trainable": ["connector", "mma", "mma-vision"], **LAVIN_SCHEDULE}, data="finetune_data",
              lr_batch=256),
    ],
    "lavin-llm": [
        Stage("finetune", {"trainable": ["connector", "mma"], **LAVIN_SCHEDULE}, data="finetune_data", lr_batch=256),
    ],
    "plora": [
        Stage("warmup", {"trainable": ["connector"], "lr": 5e-4, "min_lr": None}),
        Stage("finetune", {"trainable": ["vpg", "connector", "plora"], **BLIP2_SCHEDULE}, data="finetune_data"),
    ],
}


def recipe(name: str) -> list[Stage]:
    if name not in RECIPES:
        raise VpgtransError(f"unknown recipe {name!r}; available: {', '.join(RECIPES)}")
    return RECIPES[name]


def stage(recipe_name: str, stage_name: str) -> Stage:
    for entry in recipe(recipe_name):
        if entry.name == stage_name:
            return entry
    raise VpgtransError(f"recipe {recipe_name!r} has no stage {stage_name!r}")
