"""``transfer``: inherit, then a recipe's stages (``vpgtrans.recipes``) — VPGTrans's warm up the projector
-> fine-tune by default, or, with ``from_scratch``, the train-from-scratch baseline on the same target. Each stage's bundle goes under
``out_dir/``; ``out_dir/transfer.json`` sums up the run with one metric curve in optimizer steps
(stage 1's steps count toward VPGTrans's total, as in the paper's speed-up)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from vpgtrans.bundle import MANIFEST, read_manifest, validate_bundle
from vpgtrans.checkpoint import latest_checkpoint
from vpgtrans.config import InheritConfig, PromptTemplate, TrainConfig, replace, to_dict
from vpgtrans.data import load_rows
from vpgtrans.errors import VpgtransError
from vpgtrans.io import atomic_write_text
from vpgtrans.references import is_repo_id, resolve_model
from vpgtrans.outputs import check_out_dir, exists_error
from vpgtrans.sources import read_source
from vpgtrans.stages.inherit import inherit, read_target_llm
from vpgtrans.stages.train import run_stage
from vpgtrans.training import RunOptions


def _combined_curve(stages: list[tuple[str, Path]]) -> list[dict]:
    """The eval curves of consecutive stages on one axis of cumulative optimizer steps and samples."""
    curve, step_offset, sample_offset = [], 0, 0
    for name, path in stages:
        manifest = read_manifest(path)
        for point in manifest["curve"]:
            if curve and point["step"] == 0:
                continue  # the start of a stage is the end of the previous one
            curve.append({**point, "stage": name, "step": point["step"] + step_offset,
                          "samples": point["samples"] + sample_offset})
        train = manifest["metrics"].get("train", {})
        step_offset += train.get("steps", 0)
        sample_offset += train.get("samples", 0)
    return curve


def curve_seconds(stages: list[tuple[str, Path]]) -> list[float | None]:
    """Training wall time (evaluations left out) at each point of ``_combined_curve(stages)``, cumulative over
    the stages; None where a stage's bundle did not record it."""
    seconds, offset = [], 0.0
    for name, path in stages:
        manifest = read_manifest(path)
        train = manifest["metrics"].get("train", {})
        times = train.get("curve_seconds") or [None] * len(manifest["curve"])
        for point, at in zip(manifest["curve"], times):
            if seconds and point["step"] == 0:
                continue
            seconds.append(None if at is None else round(at + offset, 3))
        offset += train.get("train_seconds", 0.0)
    return seconds


def transfer(source: Path, target_llm: Path, data: Path, out_dir: Path, *, finetune_data: Path | None = None,
             instruct_data: Path | None = None,
             recipe: str | None = None, configs: dict[str, TrainConfig] | None = None,
             warmup_config: TrainConfig | None = None, finetune_config: TrainConfig | None = None,
             inherit_config: InheritConfig | None = None, from_scratch: bool = False, eval_data: Path | None = None,
             vision: Path | None = None, source_llm: Path | None = None, corpus: Path | None = None,
             template: PromptTemplate | None = None, skip_warmup: bool = False, trust_remote_code: bool = False,
             force: bool = False, progress=None, options: RunOptions | None = None) -> dict:
    """Run ``inherit`` then a recipe's stages; return ``{"stages": {name: path}, "metrics": ..., "curve": [...]}``.

    ``recipe``: a ``vpgtrans.recipes.RECIPES`` name (default: the connector's; ``from_scratch`` runs the
    ``scratch`` baseline). ``configs`` replaces a stage's ``TrainConfig`` by stage name;
    ``warmup_config`` / ``finetune_config`` are the names for the VPGTrans stages (``finetune_config``
    also for ``scratch``). ``skip_warmup`` drops the ``warmup`` stage (the paper's ablation). A stage reads
    ``data``, ``finetune_data`` or ``instruct_data`` as its recipe says, each falling back to the one before.

    With ``options.resume``, stages whose bundles exist and validate are kept, the stage that was
    running continues from its latest checkpoint, and the rest run as usual."""
    from vpgtrans.model.connectors import connector as connector_entry
    from vpgtrans.recipes import recipe as recipe_stages

    out_dir = Path(out_dir)
    options = options or RunOptions()
    inherit_config = inherit_config or InheritConfig()
    recipe = "scratch" if from_scratch else recipe or connector_entry(inherit_config.connector).recipe
    stages_to_run = [stage for stage in recipe_stages(recipe) if not (skip_warmup and stage.name == "warmup")]
    named = {"warmup": warmup_config, "finetune": finetune_config, "scratch": finetune_config, **(configs or {})}
    unknown = sorted(set(configs or {}) - {stage.name for stage in stages_to_run})
    if unknown:
        raise VpgtransError(f"recipe {recipe!r} has no stage {', '.join(map(repr, unknown))}")
    stage_configs = {stage.name: named.get(stage.name) or stage.config() for stage in stages_to_run}
    _check_trainable(stage_configs, inherit_config)
    if options.resume and not out_dir.is_dir():
        raise VpgtransError(f"{out_dir}: nothing to resume (no such directory); run without --resume")
    if out_dir.exists() and not (force or options.resume):
        raise exists_error(out_dir, resumable=True)
    check_out_dir(out_dir, force=True, inputs=(source, target_llm, data, finetune_data, instruct_data, eval_data, vision,
                                               source_llm, corpus))
    # Validate every input before the first stage runs: a typo must not cost a stage's compute.
    for path in (source, target_llm, vision, source_llm, corpus):
        if path is not None and not Path(path).exists() and not is_repo_id(str(path).rsplit("@", 1)[0]):
            raise VpgtransError(f"{path}: no such file or directory")
    for path in (data, finetune_data, instruct_data, eval_data):  # any form of data, datasets names included
        if path is not None:
            load_rows(path)
    models = {name: None if value is None else resolve_model(value, what=name.replace("_", " "))[0]
              for name, value in (("source", source), ("target_llm", target_llm), ("vision", vision),
                                  ("source_llm", source_llm))}  # Hub ids: through the HF cache
    read_source(models["source"], models["vision"], models["source_llm"])  # reads only the VPG and projector tensors
    read_target_llm(models["target_llm"], trust_remote_code)
    if any(stage.fresh_init for stage in stages_to_run):
        inherit_config = replace(inherit_config, converter="none")  # the weights are re-initialised anyway
    if options.resume:
        _check_resumable(out_dir, [stage.name for stage in stages_to_run])
    # Under torchrun / accelerate launch every process runs this function: all have checked --out before
    # any writes to it, only the main process writes what is not a training stage (inherit, transfer.json).
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # as the stages' Accelerator: gloo on CPU-only machines
    state.wait_for_everyone()
    out_dir.mkdir(parents=True, exist_ok=True)  # with --force, each stage replaces its bundle atomically

    current = inherited = out_dir / "inherit"
    if options.resume and _finished(inherited):
        _check_same_inherit(inherited, models, inherit_config)
    else:
        if state.is_main_process:
            inherit(source, target_llm, inherited, inherit_config, vision=vision, source_llm=source_llm, corpus=corpus,
                    template=template, trust_remote_code=trust_remote_code, force=force or options.resume)
        state.wait_for_everyone()
    stages: list[tuple[str, Path]] = []
    for stage in stages_to_run:
        stage_dir = out_dir / stage.name
        resume = options.resume and _resumable(stage_dir)
        stage_options = replace(options, resume=resume)  # a stage that never started starts fresh
        stage_data = {"data": data, "finetune_data": finetune_data or data,
                      "instruct_data": instruct_data or finetune_data or data}[stage.data]
        current = run_stage(current, stage_data, stage_dir, stage_configs[stage.name], stage.name,
                            eval_data=eval_data, fresh_init=stage.fresh_init, progress=progress,
                            force=force or (options.resume and not resume), options=stage_options)
        stages.append((stage.name, current))
    summary = {
        "arm": "scratch" if from_scratch else recipe,
        "recipe": recipe,
        "stages": {"inherit": str(inherited), **{name: str(path) for name, path in stages}},
        "final_bundle": str(stages[-1][1]),
        "metrics": {name: read_manifest(path)["metrics"] for name, path in [("inherit", inherited), *stages]},
        "curve": _combined_curve(stages),
        "curve_seconds": curve_seconds(stages),
        "config": {"inherit": to_dict(inherit_config), **{name: to_dict(c) for name, c in stage_configs.items()}},
    }
    if not state.is_main_process:
        return summary
    atomic_write_text(out_dir / "transfer.json", json.dumps(summary, indent=2) + "\n")
    # A forced re-run of another recipe leaves the previous run's stage bundles behind: drop them only now,
    # after this run succeeded, so a failed re-run never costs the user the old results.
    from vpgtrans.recipes import RECIPES

    recipe_stage_names = {stage.name for stages_of in RECIPES.values() for stage in stages_of}
    for stale in recipe_stage_names - {name for name, _ in stages}:
        if (out_dir / stale / MANIFEST).is_file():
            shutil.rmtree(out_dir / stale)
    return summary


def _check_trainable(stage_configs: dict[str, TrainConfig], inherit_config: InheritConfig) -> None:
    """Every stage trains parts the connector's model has: a typo in a later stage must not cost the earlier ones."""
    from vpgtrans.model.connectors import connector as connector_entry
    from vpgtrans.model.visual import visual_kind

    entry = connector_entry(inherit_config.connector)
    known = [*visual_kind(entry.visual).parts, *(adapter["type"] for adapter in entry.adapters)]
    bad = [f"{name}: {', '.join(map(repr, sorted(set(config.trainable) - set(known))))}"
           for name, config in stage_configs.items() if set(config.trainable) - set(known)]
    if bad:
        raise VpgtransError(f"trainable parts that are not parts of a {inherit_config.connector!r} model (it has "
                            f"{', '.join(known)}): {'; '.join(bad)}")


def _check_same_inherit(inherited: Path, models: dict, inherit_config: InheritConfig) -> None:
    """``--resume`` keeps a finished inherit bundle only if this call would make the same one: the same source
    and target LLM (by content) and the same inherit settings."""
    from vpgtrans.bundle import fingerprint

    manifest = read_manifest(inherited)
    refs, changed = manifest["references"], []
    for role, model in (("source", models["source"]), ("llm", models["target_llm"])):
        recorded = refs.get(role, {}).get("fingerprint")
        if recorded and recorded != fingerprint(Path(model)):
            changed.append({"source": "--source", "llm": "--target-llm"}[role])
    if manifest["config"].get("inherit") != to_dict(inherit_config):
        changed.append("inherit settings (converter, connector, ridge, ...)")
    if changed:
        raise VpgtransError(f"{inherited}: was made with a different {', '.join(changed)} than this call; resume "
                            "with the same inputs, use a new --out, or --force to start over")


def _finished(stage_dir: Path) -> bool:
    """A stage bundle that exists and validates (hashes included): a resumed transfer keeps it."""
    if not (stage_dir / MANIFEST).is_file():
        return False
    try:
        validate_bundle(stage_dir)
    except VpgtransError:
        return False
    return True


def _resumable(stage_dir: Path) -> bool:
    """A stage to continue: finished (the stage returns it as it is) or with a checkpoint."""
    return _finished(stage_dir) or latest_checkpoint(stage_dir) is not None


def _check_resumable(out_dir: Path, stage_names: list[str]) -> None:
    """``--resume`` needs something of this recipe's run under ``out_dir``."""
    if not any((out_dir / name).is_dir() for name in ("inherit", *stage_names)):
        raise VpgtransError(f"{out_dir}: nothing to resume (no stage of a {' -> '.join(stage_names)} run in it); "
                            "run without --resume")
