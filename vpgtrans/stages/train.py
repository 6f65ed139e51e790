"""The training stages: ``warmup_projector`` (VPGTrans stage 1), ``finetune`` (stage 2) and
``train_from_scratch`` (the baseline). Each reads a bundle and writes a new one; the input is never
modified. They share ``run_stage``, whose loop is written out below: load -> freeze -> train -> save.

Runs the same under ``torchrun`` / ``accelerate launch`` (DDP; only rank 0 writes), resumes exactly from
``OUT/checkpoints/`` and stops cleanly on SIGTERM (see ``vpgtrans.checkpoint``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import closing, nullcontext
from pathlib import Path

import torch

from vpgtrans.bundle import MANIFEST, file_sha256, load_model, read_manifest, validate_bundle, write_bundle
from vpgtrans.checkpoint import (check_optimizer_state, clear_checkpoints, latest_checkpoint, load_checkpoint,
                                 read_state, rng_state, save_checkpoint, set_rng_state)
from vpgtrans.config import TrainConfig, to_dict
from vpgtrans.data import data_fingerprint, load_rows
from vpgtrans.collate import Collator
from vpgtrans.errors import VpgtransError
from vpgtrans.evaluate import evaluate_model, group_caption_rows, score
from vpgtrans.io import atomic_write_text
from vpgtrans.loader import load_micro_batches
from vpgtrans.model.spec import upgrade
from vpgtrans.outputs import check_out_dir, check_writable, exists_error, output_lock
from vpgtrans.sharding import (full_optimizer_state, full_state_dict, launch_engine, shard_optimizer_state,
                               sharding_summary, whole_parameters)
from vpgtrans.training import (DataCursor, RunOptions, StopSignal, TrainingInterrupted, accepts_logits_to_keep,
                               check_world_size, count_targets, lr_lambda, param_groups, set_trainable, split_batch,
                               slow_bf16_warning, summed_loss, torch_dtype, total_steps, train_mode,
                               trained_parts)

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"


def _eval_point(accelerator, core, eval_set, config: TrainConfig, step: int, samples: int,
                num_workers: int = 0) -> dict:
    """Evaluate on every process's share of the eval rows, gather predictions and score them all on
    every process: the same numbers as a 1-process evaluation, in 1/N of the time."""
    from accelerate.utils import gather_object

    dataset, task, stats = eval_set
    rows = group_caption_rows(dataset) if task == "caption" else list(dataset)
    rows = rows[:config.eval_max_samples]
    rank, world = accelerator.process_index, accelerator.num_processes
    share = -(-len(rows) // world)  # contiguous shares: gathered in rank order they are the 1-process order
    mine, result = rows[rank * share:(rank + 1) * share], {"predictions": [], "references": []}
    if mine:  # (a process may have no eval rows when there are fewer rows than processes)
        with whole_parameters(core):  # under FSDP: each process generates alone, with whole weights
            result = evaluate_model(core, mine, task, batch_size=max(8, config.batch_size // world),
                                    max_new_tokens=config.max_new_tokens, stats=stats,
                                    choice_scoring=config.choice_scoring, choice_answer=config.choice_answer,
                                    num_workers=num_workers)
    # One (preds, refs, length-normalised preds: likelihood scoring's second pick, else none) per process.
    shards = gather_object([(result["predictions"], result["references"], result.get("predictions_norm", []))])
    predictions = [p for preds, _, _ in shards for p in preds]  # rows with an unreadable image are not in them
    references = [r for _, refs, _ in shards for r in refs]
    normalised = task == "multiple-choice" and config.choice_scoring == "likelihood"
    predictions_norm = [p for _, _, norms in shards for p in norms] if normalised else None
    scores = score(task, predictions, references, choice_answer=config.choice_answer,
                   predictions_norm=predictions_norm)
    point = {"step": step, "samples": samples, **{k: v for k, v in scores.items() if k != "n"}}
    if accelerator.is_main_process:
        log.info("eval @ step %d: %s", step, point)
    return point


def _accelerator(options: RunOptions, out_dir: Path):
    """accelerate's Accelerator: the launch config (torchrun / accelerate launch, DDP or FSDP) decides
    the processes and the engine; ``options.dtype`` the mixed precision (None: the launch config's)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    if options.report_to == "tensorboard" and not is_tensorboard_available():
        raise VpgtransError("--report-to tensorboard needs the tensorboard package: pip install tensorboard")
    if options.report_to == "wandb" and not is_wandb_available():
        raise VpgtransError("--report-to wandb needs the wandb package: pip install wandb")
    # None: what the launcher asked for (accelerate launch --mixed_precision / its config set this variable).
    precision = {"fp32": "no", None: os.environ.get("ACCELERATE_MIXED_PRECISION", "no")}.get(options.dtype, options.dtype)
    state = AcceleratorState._shared_state
    if state.get("_mixed_precision") not in (None, precision):
        # One Python process running stages at different precisions (a notebook, the tests): accelerate
        # keeps the first one for the process; forget it, keeping the distributed set-up.
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision,
                       log_with=None if options.report_to == "none" else options.report_to,
                       project_dir=str(out_dir / "logs"))


def _keep_trained_vision_fp32(model, vision_dtype) -> None:
    """Adapters trained inside the ViT (lavin's ``mma-vision``) keep fp32 master weights when the ViT is stored
    in 16-bit (they cast the ViT's activations to their own dtype and their output back)."""
    if vision_dtype in (None, torch.float32):
        return
    for param in model.vision.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def _run_record(bundle_dir: Path, data: Path, config: TrainConfig, stage: str, fresh_init: bool, precision: str,
                options: RunOptions) -> dict:
    """What a checkpoint (or a finished run) must have been made with to be resumed by this call: the same
    paths and options, and the same contents behind the paths (the input bundle's manifest, the data's rows)."""
    return {"stage": stage, "input": str(bundle_dir.resolve()), "data": str(Path(data).resolve()),
            "train": to_dict(config), "fresh_init": fresh_init, "precision": precision,
            "quantization": options.quantization, "vision_dtype": options.vision_dtype,
            "input_manifest": file_sha256(bundle_dir / MANIFEST),
            "data_fingerprint": data_fingerprint(data)}


RECORD_WORDS = {"input_manifest": "input bundle (its content changed)", "data_fingerprint": "data (its rows changed)"}


# Paths whose contents the record also holds: a run directory copied or moved with its inputs still resumes.
CONTENT_OF = {"input": "input_manifest", "data": "data_fingerprint"}


def _changed(saved: dict, record: dict, prefix: str = "") -> list[str]:
    """What differs between a saved run record and this call's, in words (keys an older record lacks are
    not compared, also inside a nested part such as ``train``: a run checkpointed before an option existed
    resumes; a path is not compared where both records hold the content behind it)."""
    moved = {path for path, content in CONTENT_OF.items() if content in saved and content in record}
    changed = []
    for key in record:
        if key not in saved or key in moved or saved[key] == record[key]:
            continue
        if isinstance(saved[key], dict) and isinstance(record[key], dict):
            changed += _changed(saved[key], record[key], f"{prefix}{key}.")
        else:
            changed.append(RECORD_WORDS.get(key, f"{prefix}{key}"))
    return sorted(changed)


def _start(out_dir: Path, options: RunOptions, force: bool, record: dict, main: bool):
    """Decide how this call starts: ``("done", None)`` (resume of a finished run), ``("resume", path)``
    or ``("fresh", None)``; refuse what would lose or mix up work."""
    if options.resume:
        if (out_dir / MANIFEST).is_file():
            manifest = validate_bundle(out_dir)
            saved = manifest["config"].get("record") or {"train": manifest["config"].get("train")}
            changed = _changed(saved, record)
            if changed:
                raise VpgtransError(f"{out_dir}: holds a finished run made with a different {', '.join(changed)}; "
                                    "use a new --out, or --force to redo it")
            return "done", None
        checkpoint = latest_checkpoint(out_dir)
        if checkpoint is None:
            raise VpgtransError(f"{out_dir}: no checkpoint to resume from (none under {out_dir}/checkpoints); "
                                f"run without --resume")
        changed = _changed(read_state(checkpoint)["record"], record)
        if changed:
            raise VpgtransError(f"{checkpoint}: was made with a different {', '.join(changed)} than this call; "
                                f"resume with the same options, or use --force to start over")
        return "resume", checkpoint
    if out_dir.exists() and not force:
        raise exists_error(out_dir, resumable=True)
    if main:
        clear_checkpoints(out_dir)  # never resume into checkpoints of a run this one replaces
        (out_dir / METRICS_FILE).unlink(missing_ok=True)
    return "fresh", None


def _plan(cursor: DataCursor, config: TrainConfig, rank: int, world: int):
    """This process's micro-batches, step after step, for as long as asked: what the loop's own cursor
    will take, walked ahead by a copy of it (the DataLoader's workers prepare batches before their step).
    Samples go as ``(epoch, index)``: the epoch keys their random choices (``MicroBatches``)."""
    while True:
        yield from split_batch(cursor.take_samples(config.batch_size), rank, world, config.grad_accum)


def _micro_batches(loaded, chunks: list[list[int]]) -> list[tuple[list[int], dict]]:
    """This process's micro-batches of a step as ``(sample indices, tensors on device)``, taken from the
    loader; a micro-batch whose images were all unreadable (counted in the stats) is left out."""
    batches = []
    for chunk in chunks:
        indices, batch = next(loaded)
        if indices != chunk:  # the plan walks a copy of the loop's cursor: they cannot part
            raise RuntimeError(f"data loader out of step: planned {indices}, the step takes {chunk}")
        if batch:
            batches.append((chunk, batch))
    return batches


def _forward_backward(accelerator, model, core, batches: list, last_good: tuple, engine: str, keep_logits: bool):
    """Forward and backward every micro-batch of one optimizer step, gradients accumulated; returns
    ``(totals, targets, bad)``: the summed loss and non-finite pass count over all processes, the global
    batch's target tokens, and this process's sample indices whose loss was not finite.

    One collective does the step's bookkeeping: the global batch's target tokens and the most micro-batches
    any process has. Loss = sum over target tokens / target tokens of the *global* batch: the same update for
    any split into processes and micro-batches (DDP and FSDP average gradients over processes, hence x world)."""
    world = accelerator.num_processes
    cuda_devices = [accelerator.device] if accelerator.device.type == "cuda" else []  # RNGs a padding pass leaves alone
    mine = torch.tensor([[float(sum(count_targets(b, core.is_encoder_decoder) for _, b in batches)),
                          float(len(batches))]])
    every = accelerator.gather(mine)  # (world, 2)
    targets, most = float(every[:, 0].sum()), int(every[:, 1].max())
    scale = world / max(targets, 1.0)
    # Zero-weight passes keep this process in step with the others: under FSDP every forward and backward is
    # collective, so all run `most` passes; under DDP only the last one is, so a process needs one only when
    # none of its images was readable. They draw no dropout randomness.
    passes = [(chunk, batch, 1.0) for chunk, batch in batches]
    passes += [([], last_good[1], 0.0)] * ((most if engine == "fsdp" else 1) - len(passes))
    local_sum, bad, bad_passes = 0.0, [], 0
    for i, (chunk, batch, weight) in enumerate(passes):
        apart = torch.random.fork_rng(devices=cuda_devices) if weight == 0.0 else nullcontext()
        with apart, nullcontext() if i == len(passes) - 1 else accelerator.no_sync(model):
            loss_sum = summed_loss(model, batch, core.is_encoder_decoder, keep_logits) * weight
            if not torch.isfinite(loss_sum):
                bad, bad_passes = bad + chunk, bad_passes + 1
            accelerator.backward(loss_sum * scale)
        local_sum += float(loss_sum.detach())
    totals = accelerator.reduce(torch.tensor([local_sum, float(bad_passes)]), "sum")
    return totals, targets, bad


def run_stage(bundle_dir: Path, data: Path, out_dir: Path, config: TrainConfig, stage: str,
              eval_data: Path | None = None, fresh_init: bool = False, force: bool = False,
              progress=None, options: RunOptions | None = None) -> Path:
    """Train the parts ``config.trainable`` names on ``data`` and write the result as a new bundle. One run
    writes an output at a time (an advisory lock beside it)."""
    with output_lock(out_dir):
        return _run_stage(bundle_dir, data, out_dir, config, stage, eval_data, fresh_init, force, progress, options)


def _run_stage(bundle_dir: Path, data: Path, out_dir: Path, config: TrainConfig, stage: str,
               eval_data: Path | None = None, fresh_init: bool = False, force: bool = False,
               progress=None, options: RunOptions | None = None) -> Path:
    options = options or RunOptions()
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    if out_dir.resolve() == bundle_dir.resolve():
        raise VpgtransError(f"{out_dir}: --out must differ from the input bundle (stages never modify their input)")
    if out_dir.exists() and not (force or options.resume):
        raise exists_error(out_dir, resumable=True)
    # Before anything under out_dir is touched: --force replaces only a vpgtrans output, never an input.
    check_out_dir(out_dir, force=True, inputs=(bundle_dir, data, eval_data))
    engine = launch_engine(options.quantization)  # "ddp" (or one process) / "fsdp"; refuses what it cannot run
    parent = read_manifest(bundle_dir)
    dataset, task, data_stats = load_rows(data)
    eval_set = load_rows(eval_data) if eval_data is not None else None

    # --- setup -------------------------------------------------------------------------------------
    from accelerate.utils import gather_object

    accelerator = _accelerator(options, out_dir)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    check_world_size(config, world)
    if engine == "fsdp" and accelerator.distributed_type != "FSDP":  # accelerate shards several GPU-like processes only
        if main:
            log.warning("FSDP was asked for, but accelerate set it up only for several GPU processes: this %s run is "
                        "not sharded", "1-process" if world == 1 else "CPU")
        engine = "ddp"
    precision = accelerator.mixed_precision
    slow = slow_bf16_warning(precision, accelerator.device)
    if slow and main:
        log.warning(slow)
    record = _run_record(bundle_dir, data, config, stage, fresh_init, precision, options)
    how, checkpoint = _start(out_dir, options, force, record, main)
    if how == "done":
        if main:
            log.warning("%s: already complete; nothing to resume", out_dir)
        return out_dir
    if main:  # where metrics.jsonl and checkpoints go: a read-only or full file system fails here, not after a step
        check_writable(out_dir)
    accelerator.wait_for_everyone()  # rank 0 has cleared stale checkpoints before anyone looks
    frozen_dtype = torch_dtype(precision)
    vision_dtype = frozen_dtype if options.vision_dtype is None else torch_dtype(options.vision_dtype) or torch.float32
    # FSDP: load on the CPU and let prepare() move each process's shard to its device, one unit at a time.
    model = load_model(bundle_dir, device="cpu" if engine == "fsdp" else accelerator.device, dtype=frozen_dtype,
                       vision_dtype=vision_dtype, quantization=options.quantization,
                       gradient_checkpointing=options.gradient_checkpointing)
    if vision_dtype is not None:
        model.vision.to(vision_dtype)  # frozen: 16-bit weights; the trained parts keep fp32 master weights
    if fresh_init:  # train-from-scratch: the architecture of the bundle, none of its trained weights
        for offset, part in enumerate(model.parts):
            part.init_fresh(model, config.seed + offset)
    trained = trained_parts(model, config.trainable)
    counts = set_trainable(model, config.trainable)
    _keep_trained_vision_fp32(model, vision_dtype)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas)
    steps = total_steps(config, len(dataset))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, steps))
    resumed = None
    if checkpoint is not None:  # restore weights before DDP broadcasts them, the optimizer after prepare
        resumed = load_checkpoint(checkpoint, [part.file for part in trained])
        for part in trained:
            part.load(model, resumed["tensors"][part.file], f"{checkpoint}/{part.file}")
    model, optimizer = accelerator.prepare(model, optimizer)
    core = accelerator.unwrap_model(model)
    if engine == "fsdp" and main:
        log.info(sharding_summary(core, world))
    keep_logits = not core.is_encoder_decoder and accepts_logits_to_keep(core.llm)
    collate = Collator(core.tokenizer, core.template, task, core.num_image_tokens, core.image_processor,
                       core.is_encoder_decoder, mode="train", max_target_len=config.max_text_len, stats=data_stats,
                       t5_caption_split=config.t5_caption_split, seed=config.seed,
                       choice_answer=config.choice_answer)
    run_config = {"train": to_dict(config), "run": {**vars(options), "precision": precision, "num_processes": world,
                                                     "engine": engine}}
    if options.report_to != "none":
        accelerator.init_trackers(f"vpgtrans-{stage}", {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                         for k, v in {**run_config["train"], **run_config["run"]}.items()})

    # --- state: fresh, or everything the checkpoint holds -----------------------------------------
    torch.manual_seed(config.seed + rank)  # dropout streams: reproducible, different on each process
    step, cursor, losses, curve, records, skipped, seconds = 0, DataCursor(len(dataset), config.seed), [], [], [], [], 0.0
    # Training wall time (evaluations left out) when each curve point was taken: metrics.train.curve_seconds.
    eval_seconds, curve_seconds = 0.0, []
    if resumed is not None:
        saved = resumed["state"]
        check_optimizer_state(resumed["optimizer"], optimizer, checkpoint)
        optimizer.load_state_dict(shard_optimizer_state(optimizer, resumed["optimizer"]))
        scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"][rank % len(saved["rng"])], checkpoint)
        step, losses, curve, records, skipped = saved["step"], saved["losses"], saved["curve"], saved["records"], saved["skipped"]
        cursor, seconds = DataCursor(len(dataset), config.seed, **saved["position"]), saved["seconds"]
        eval_seconds, curve_seconds = saved.get("eval_seconds", 0.0), saved.get("curve_seconds", [])
        for key, value in saved["data_stats"].items():
            setattr(data_stats, key, value)
        if main:
            log.warning("resuming %s from %s (step %d/%d)", stage, checkpoint, step, steps)
            atomic_write_text(out_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in records))
    started = time.time()

    def emit(entry: dict) -> None:
        records.append(entry)
        if main:
            out_dir.mkdir(parents=True, exist_ok=True)
            with open(out_dir / METRICS_FILE, "a") as fh:
                fh.write(json.dumps(entry) + "\n")
        if options.report_to != "none":
            accelerator.log({f"{entry['type']}/{k}": v for k, v in entry.items() if isinstance(v, (int, float))
                             and k not in ("step", "type")}, step=entry["step"])

    def save(done: int) -> Path | None:
        state = {"record": record, "scheduler": scheduler.state_dict(), "position": cursor.position(), "losses": losses,
                 "curve": curve, "records": records, "skipped": skipped, "seconds": seconds + time.time() - started,
                 "eval_seconds": eval_seconds, "curve_seconds": curve_seconds,
                 "data_stats": data_stats.to_dict(), "num_processes": world}
        rngs = gather_object([rng_state()])  # every process's RNG, in rank order
        # Whole tensors (gathered under FSDP, by every process): resumable on any number of processes.
        tensors = {part.file: part.state_dict(core, gather=full_state_dict) for part in trained}
        optimizer_state, path = full_optimizer_state(optimizer), None
        if main:
            path = save_checkpoint(out_dir, done, tensors, optimizer_state, {**state, "rng": rngs},
                                   keep=options.keep_checkpoints)
            log.info("checkpoint saved: %s", path)
        accelerator.wait_for_everyone()
        return path

    def evaluate_here(done: int) -> None:
        """One curve point; its training wall time so far (evaluations left out) goes to ``curve_seconds``."""
        nonlocal eval_seconds
        clock = time.time()
        curve_seconds.append(round(seconds + clock - started - eval_seconds, 3))
        curve.append(_eval_point(accelerator, core, eval_set, config, done, done * config.batch_size,
                                 options.num_workers))
        eval_seconds += time.time() - clock
        emit({"type": "eval", **curve[-1]})

    # --- train -------------------------------------------------------------------------------------
    if resumed is None and eval_set is not None and config.eval_every:
        evaluate_here(0)
    train_mode(model, core, trained)
    last_good = None
    plan = _plan(DataCursor(len(dataset), config.seed, **cursor.position()), config, rank, world)
    with StopSignal() as stop, closing(load_micro_batches(dataset, collate, plan, options.num_workers,
                                                          accelerator.device)) as loaded:
        while step < steps:
            # The global batch of this optimizer step, the same on any number of processes.
            indices = cursor.take(config.batch_size)
            batches = _micro_batches(loaded, split_batch(indices, rank, world, config.grad_accum))
            if batches:
                last_good = batches[-1]
            elif last_good is None:
                raise VpgtransError(f"step {step + 1}: no readable image in this process's share of the batch")
            totals, targets, bad = _forward_backward(accelerator, model, core, batches, last_good, engine, keep_logits)
            if totals[1] > 0:  # a non-finite loss somewhere: no update from this batch
                optimizer.zero_grad(set_to_none=True)
                bad_samples = sorted(i for shard in gather_object([bad]) for i in shard)
                if len(skipped) < options.skip_nonfinite:
                    skipped.append({"step": step + 1, "samples": bad_samples})
                    if main:
                        log.warning("non-finite loss at step %d (samples %s): batch skipped (%d/%d)", step + 1,
                                    bad_samples, len(skipped), options.skip_nonfinite)
                    continue
                last = latest_checkpoint(out_dir)
                raise VpgtransError(f"non-finite loss at step {step + 1} (samples {bad_samples}); "
                                    + (f"last good checkpoint: {last}; " if last else "")
                                    + "lower the learning rate or check the data (--skip-nonfinite N skips such batches)")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_loss = float(totals[0]) / max(targets, 1.0)
            losses.append(step_loss)
            step += 1
            if progress is not None and main:
                progress(step, steps, step_loss, scheduler.get_last_lr()[0])
            if step % config.log_every == 0 or step == steps:
                lr = scheduler.get_last_lr()[0]
                if main:
                    log.info("step %d/%d loss %.4f lr %.2e", step, steps, step_loss, lr)
                emit({"type": "train", "step": step, "samples": step * config.batch_size, "epoch": cursor.epoch,
                      "loss": step_loss, "lr": lr, "seconds": round(seconds + time.time() - started, 3)})
            if eval_set is not None and config.eval_every and (step % config.eval_every == 0 or step == steps):
                evaluate_here(step)
                train_mode(model, core, trained)
            saved_now = None
            if options.save_every and step % options.save_every == 0 and step < steps:
                saved_now = save(step)
            if _any_process(accelerator, stop.received) and step < steps:  # SIGTERM: save and stop, all together
                path = saved_now or save(step)
                raise TrainingInterrupted(f"stopped by SIGTERM after step {step}/{steps}; checkpoint saved to "
                                          f"{path or out_dir / 'checkpoints'}; re-run the same command with --resume")

    # --- save --------------------------------------------------------------------------------------
    with StopSignal():  # a SIGTERM now waits until the bundle is written (then the run is done)
        seconds += time.time() - started
        steps_here = steps - (resumed["state"]["step"] if resumed else 0)
        metrics = {"train": {"steps": steps, "samples": steps * config.batch_size, "epochs": steps * config.batch_size / len(dataset),
                             "final_loss": losses[-1], "mean_loss_last_10": sum(losses[-10:]) / len(losses[-10:]),
                             "seconds": round(seconds, 2), "train_seconds": round(seconds - eval_seconds, 2),
                             "curve_seconds": curve_seconds,
                             "samples_per_second": round(steps_here * config.batch_size / max(
                                 time.time() - started, 1e-9), 2), "skipped_nonfinite": len(skipped),
                             "skipped_nonfinite_batches": skipped, "resumed": resumed is not None, **counts}}
        if curve:
            metrics["eval"] = {k: v for k, v in curve[-1].items() if k not in ("step", "samples")}
        elif eval_set is not None:
            point = _eval_point(accelerator, core, eval_set, config, steps, steps * config.batch_size,
                                    options.num_workers)
            metrics["eval"] = {k: v for k, v in point.items() if k not in ("step", "samples")}
            records.append({"type": "eval", **point})
        if options.report_to != "none":
            accelerator.end_training()
        result = out_dir
        tensors = {part.file: part.state_dict(core, gather=full_state_dict) for part in core.parts}
        if main:
            config_record = {**run_config, "record": record, "stage_input": str(bundle_dir.resolve()), "task": task,
                             "data": str(Path(data).resolve()), "eval_data": str(Path(eval_data).resolve()) if eval_data else None,
                             "fresh_init": fresh_init, "num_processes": world, "parent_config": parent["config"]}
            logs = _set_aside(out_dir / "logs")
            result = write_bundle(out_dir, stage=stage, tensors=tensors, model=upgrade(parent["model"]),
                                  references=parent["references"], template=parent["template"], config=config_record,
                                  parent=bundle_dir, metrics=metrics, curve=curve, data=data_stats.to_dict(),
                                  force=out_dir.exists())
            atomic_write_text(out_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in records))
            if logs is not None:
                logs.rename(out_dir / "logs")
    accelerator.wait_for_everyone()
    return result


def _any_process(accelerator, flag: bool) -> bool:
    """True on every process if ``flag`` is true on any (one tiny all-reduce per step)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor(float(flag)), "sum") > 0)


def _set_aside(path: Path) -> Path | None:
    """Move tracker logs out of the way of the bundle that replaces their directory (put back after)."""
    if not path.is_dir():
        return None
    aside = path.parent.parent / f".{path.parent.name}.logs-aside"
    if aside.exists():
        import shutil

        shutil.rmtree(aside)
    path.rename(aside)
    return aside


def warmup_projector(bundle_dir: Path, data: Path, out_dir: Path, config: TrainConfig | None = None, **kwargs) -> Path:
    """VPGTrans stage 1: VPG and LLM frozen, projector only, 5x lr, constant, one epoch. A visual kind
    without a ``connector`` part warms up the parts its ``warmup_parts`` names (pool: the pool-adapter)."""
    config = config or TrainConfig.warmup()
    return run_stage(bundle_dir, data, out_dir, _warmup_parts(bundle_dir, config), "warmup", **kwargs)


def _warmup_parts(bundle_dir: Path, config: TrainConfig) -> TrainConfig:
    """``config`` with the visual kind's ``warmup_parts`` in place of the default ``["connector"]``."""
    from vpgtrans.config import replace
    from vpgtrans.model.visual import VISUAL_KINDS

    visual = upgrade(read_manifest(bundle_dir)["model"]).get("visual")
    kind = VISUAL_KINDS.get(visual.get("type")) if isinstance(visual, dict) else None
    parts = list(getattr(kind, "warmup_parts", ()))
    if config.trainable == ["connector"] and parts and "connector" not in kind.parts:
        return replace(config, trainable=parts)
    return config


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
