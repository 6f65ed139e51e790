"""``transfer``: the whole VPGTrans recipe — inherit -> warm up the projector -> fine-tune — or, with
``from_scratch``, the train-from-scratch baseline on the same target. Each stage's bundle goes under
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
from vpgtrans.outputs import check_out_dir
from vpgtrans.sources import read_source
from vpgtrans.stages.inherit import inherit, read_target_llm
from vpgtrans.stages.train import finetune, train_from_scratch, warmup_projector
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


def transfer(source: Path, target_llm: Path, data: Path, out_dir: Path, *, finetune_data: Path | None = None,
             warmup_config: TrainConfig | None = None, finetune_config: TrainConfig | None = None,
             inherit_config: InheritConfig | None = None, from_scratch: bool = False, eval_data: Path | None = None,
             vision: Path | None = None, source_llm: Path | None = None, corpus: Path | None = None,
             template: PromptTemplate | None = None, skip_warmup: bool = False, trust_remote_code: bool = False,
             force: bool = False, progress=None, options: RunOptions | None = None) -> dict:
    """Run the recipe; return ``{"stages": {name: path}, "metrics": ..., "curve": [...]}``.

    With ``options.resume``, stages whose bundles exist and validate are kept, the stage that was
    running continues from its latest checkpoint, and the rest run as usual."""
    out_dir = Path(out_dir)
    options = options or RunOptions()
    if options.resume and not out_dir.is_dir():
        raise VpgtransError(f"{out_dir}: nothing to resume (no such directory); run without --resume")
    if out_dir.exists() and not (force or options.resume):
        raise VpgtransError(f"{out_dir}: already exists; choose a new --out, pass --resume to continue it, "
                            f"or --force to replace it")
    check_out_dir(out_dir, force=True, inputs=(source, target_llm, data, finetune_data, eval_data, vision,
                                               source_llm, corpus))
    # Validate every input before the first stage runs: a typo must not cost a stage's compute.
    for path in (source, target_llm, data, finetune_data, eval_data, vision, source_llm, corpus):
        if path is not None and not Path(path).exists():
            raise VpgtransError(f"{path}: no such file or directory")
    for path in (data, finetune_data, eval_data):
        if path is not None:
            load_rows(path)
    read_source(Path(source), vision, source_llm)  # reads only the VPG and projector tensors
    read_target_llm(Path(target_llm), trust_remote_code)
    warmup_config = warmup_config or TrainConfig.warmup()
    finetune_config = finetune_config or TrainConfig.finetune()
    inherit_config = inherit_config or InheritConfig()
    if from_scratch:
        inherit_config = replace(inherit_config, converter="none")  # the weights are re-initialised anyway
    if options.resume:
        _check_resumable(out_dir, from_scratch)
    out_dir.mkdir(parents=True, exist_ok=True)  # with --force, each stage replaces its bundle atomically

    def train_stage(run, name: str, bundle: Path, stage_data: Path, config: TrainConfig) -> Path:
        stage_dir = out_dir / name
        resume = options.resume and _resumable(stage_dir)
        stage_options = replace(options, resume=resume)  # a stage that never started starts fresh
        return run(bundle, stage_data, stage_dir, config, eval_data=eval_data, progress=progress,
                   force=force or (options.resume and not resume), options=stage_options)

    stages: list[tuple[str, Path]] = []
    if options.resume and _finished(out_dir / "inherit"):
        inherited = out_dir / "inherit"
    else:
        inherited = inherit(source, target_llm, out_dir / "inherit", inherit_config, vision=vision,
                            source_llm=source_llm, corpus=corpus, template=template,
                            trust_remote_code=trust_remote_code, force=force or options.resume)
    if from_scratch:
        stages.append(("scratch", train_stage(train_from_scratch, "scratch", inherited, finetune_data or data,
                                              finetune_config)))
    else:
        current = inherited
        if not skip_warmup:
            current = train_stage(warmup_projector, "warmup", current, data, warmup_config)
            stages.append(("warmup", current))
        stages.append(("finetune", train_stage(finetune, "finetune", current, finetune_data or data, finetune_config)))
    summary = {
        "arm": "scratch" if from_scratch else "vpgtrans",
        "stages": {"inherit": str(inherited), **{name: str(path) for name, path in stages}},
        "final_bundle": str(stages[-1][1]),
        "metrics": {name: read_manifest(path)["metrics"] for name, path in [("inherit", inherited), *stages]},
        "curve": _combined_curve(stages),
        "config": {"inherit": to_dict(inherit_config), "warmup": None if from_scratch or skip_warmup else to_dict(warmup_config),
                   "finetune": to_dict(finetune_config)},
    }
    atomic_write_text(out_dir / "transfer.json", json.dumps(summary, indent=2) + "\n")
    # A forced re-run of the other arm leaves the previous arm's stage bundles behind: drop them only now,
    # after this run succeeded, so a failed re-run never costs the user the old results.
    for stale in {"inherit", "warmup", "finetune", "scratch"} - {"inherit", *(name for name, _ in stages)}:
        if (out_dir / stale / "manifest.json").is_file():
            shutil.rmtree(out_dir / stale)
    return summary


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


def _check_resumable(out_dir: Path, from_scratch: bool) -> None:
    """``--resume`` needs something of this arm's run under ``out_dir``."""
    names = ("inherit", "scratch") if from_scratch else ("inherit", "warmup", "finetune")
    if not any((out_dir / name).is_dir() for name in names):
        raise VpgtransError(f"{out_dir}: nothing to resume (no stage of a {'scratch' if from_scratch else 'vpgtrans'} "
                            f"run in it); run without --resume")
