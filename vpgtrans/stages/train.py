"""The training stages: ``warmup_projector`` (VPGTrans stage 1), ``finetune`` (stage 2) and
``train_from_scratch`` (the baseline). Each reads a bundle and writes a new one; the input is never
modified. They share ``run_stage``, whose loop is written out below: load -> freeze -> train -> save.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from vpgtrans.bundle import CONNECTOR_FILE, VPG_FILE, load_model, read_manifest, write_bundle
from vpgtrans.config import TrainConfig, to_dict
from vpgtrans.data import Collator, load_rows
from vpgtrans.errors import VpgtransError
from vpgtrans.evaluate import evaluate_model
from vpgtrans.training import (epoch_order, lr_lambda, micro_batch_size, param_groups, set_trainable,
                               total_steps)

log = logging.getLogger(__name__)


def _eval_point(model, eval_set, config: TrainConfig, step: int, samples: int) -> dict:
    dataset, task, stats = eval_set
    result = evaluate_model(model, dataset, task, batch_size=max(8, config.batch_size),
                            max_samples=config.eval_max_samples, max_new_tokens=config.max_new_tokens, stats=stats)
    point = {"step": step, "samples": samples, **{k: v for k, v in result["scores"].items() if k != "n"}}
    log.info("eval @ step %d: %s", step, point)
    return point


def _train_mode(model, core, config: TrainConfig) -> None:
    """Train mode for the trained parts only: frozen parts (ViT, LLM, and the VPG during the warm-up)
    keep dropout off, as BLIP-2 does for its frozen ViT and VPGTrans for its frozen Q-Former."""
    model.train()
    for part in ("vision", "vpg", "connector", "llm"):
        if part not in config.trainable:
            getattr(core, part).eval()


def run_stage(bundle_dir: Path, data: Path, out_dir: Path, config: TrainConfig, stage: str,
              eval_data: Path | None = None, fresh_init: bool = False, force: bool = False,
              progress=None) -> Path:
    """Train the parts ``config.trainable`` names on ``data`` and write the result as a new bundle."""
    from accelerate import Accelerator

    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    if out_dir.resolve() == bundle_dir.resolve():
        raise VpgtransError(f"{out_dir}: --out must differ from the input bundle (stages never modify their input)")
    if out_dir.exists() and not force:
        raise VpgtransError(f"{out_dir}: already exists; choose a new --out or pass --force to replace it")
    parent = read_manifest(bundle_dir)
    dataset, task, data_stats = load_rows(data)
    eval_set = load_rows(eval_data) if eval_data is not None else None

    # --- setup -------------------------------------------------------------------------------------
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    micro = micro_batch_size(config, accelerator.num_processes)
    torch.manual_seed(config.seed)
    model = load_model(bundle_dir, device=accelerator.device)
    if fresh_init:  # train-from-scratch: the architecture of the bundle, none of its VPG weights
        model.vpg.init_fresh(config.seed)
        model.connector.init_fresh(config.seed + 1)
    counts = set_trainable(model, config.trainable)
    if counts["llm_trainable"]:
        raise AssertionError("the LLM must stay frozen")
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas)
    steps = total_steps(config, len(dataset))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, steps))
    model, optimizer = accelerator.prepare(model, optimizer)
    core = accelerator.unwrap_model(model)
    collate = Collator(core.tokenizer, core.template, task, core.num_query_tokens, core.image_processor,
                       core.is_encoder_decoder, mode="train", max_target_len=config.max_text_len, stats=data_stats)

    # --- train -------------------------------------------------------------------------------------
    curve, losses, started = [], [], time.time()
    if eval_set is not None and config.eval_every:
        curve.append(_eval_point(core, eval_set, config, 0, 0))
    _train_mode(model, core, config)
    order, epoch, cursor = epoch_order(len(dataset), config.seed, 0), 0, 0
    for step in range(steps):
        # The global batch of this optimizer step, the same on any number of processes.
        indices = []
        while len(indices) < config.batch_size:
            if cursor == len(order):
                epoch, cursor = epoch + 1, 0
                order = epoch_order(len(dataset), config.seed, epoch)
            take = min(config.batch_size - len(indices), len(order) - cursor)
            indices += order[cursor:cursor + take]
            cursor += take
        mine = indices[accelerator.process_index::accelerator.num_processes]
        step_loss = 0.0
        for start in range(0, len(mine), micro):
            batch = collate([dataset[i] for i in mine[start:start + micro]])
            if not batch:
                continue  # every image of this micro-batch was unreadable (counted in the stats)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            loss = model(**batch).loss / config.grad_accum
            if not torch.isfinite(loss):
                raise VpgtransError(f"non-finite loss at step {step + 1} (samples {mine[start:start + micro]}); "
                                    f"lower the learning rate or check the data")
            accelerator.backward(loss)
            step_loss += float(loss.detach())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        done = step + 1
        if progress is not None:
            progress(done, steps, step_loss)
        if done % config.log_every == 0 or done == steps:
            log.info("step %d/%d loss %.4f lr %.2e", done, steps, step_loss, scheduler.get_last_lr()[0])
        if eval_set is not None and config.eval_every and (done % config.eval_every == 0 or done == steps):
            curve.append(_eval_point(core, eval_set, config, done, done * config.batch_size))
            _train_mode(model, core, config)

    # --- save --------------------------------------------------------------------------------------
    seconds = time.time() - started
    metrics = {"train": {"steps": steps, "samples": steps * config.batch_size, "epochs": steps * config.batch_size / len(dataset),
                         "final_loss": losses[-1], "mean_loss_last_10": sum(losses[-10:]) / len(losses[-10:]),
                         "seconds": round(seconds, 2), "samples_per_second": round(steps * config.batch_size / seconds, 2),
                         **counts}}
    if curve:
        metrics["eval"] = {k: v for k, v in curve[-1].items() if k not in ("step", "samples")}
    elif eval_set is not None:
        metrics["eval"] = {k: v for k, v in _eval_point(core, eval_set, config, steps, steps * config.batch_size).items()
                           if k not in ("step", "samples")}
    result = out_dir
    if accelerator.is_main_process:
        tensors = {VPG_FILE: core.vpg.state_dict(), CONNECTOR_FILE: core.connector.state_dict()}
        config_record = {"train": to_dict(config), "stage_input": str(bundle_dir.resolve()), "task": task,
                         "data": str(Path(data).resolve()), "eval_data": str(Path(eval_data).resolve()) if eval_data else None,
                         "fresh_init": fresh_init, "num_processes": accelerator.num_processes, "parent_config": parent["config"]}
        result = write_bundle(out_dir, stage=stage, tensors=tensors, model=parent["model"],
                              references=parent["references"], template=parent["template"], config=config_record,
                              parent=bundle_dir, metrics=metrics, curve=curve, data=data_stats.to_dict(), force=force)
    accelerator.wait_for_everyone()
    return result


def warmup_projector(bundle_dir: Path, data: Path, out_dir: Path, config: TrainConfig | None = None, **kwargs) -> Path:
    """VPGTrans stage 1: VPG and LLM frozen, projector only, 5x lr, constant, one epoch."""
    config = config or TrainConfig.warmup()
    return run_stage(bundle_dir, data, out_dir, config, "warmup", **kwargs)


def finetune(bundle_dir: Path, data: Path, out_dir: Path, config: TrainConfig | None = None, **kwargs) -> Path:
    """VPGTrans stage 2: VPG + projector trainable, lr 1e-4 cosine to 5e-5; ViT and LLM frozen."""
    config = config or TrainConfig.finetune()
    return run_stage(bundle_dir, data, out_dir, config, "finetune", **kwargs)


def train_from_scratch(bundle_dir: Path, data: Path, out_dir: Path, config: TrainConfig | None = None, **kwargs) -> Path:
    """The baseline: the bundle's architecture with a freshly initialised VPG and projector,
    trained with the normal recipe (BLIP-2's lr 1e-4 cosine)."""
    config = config or TrainConfig.finetune()
    return run_stage(bundle_dir, data, out_dir, config, "scratch", fresh_init=True, **kwargs)


__all__ = ["warmup_projector", "finetune", "train_from_scratch", "run_stage"]
