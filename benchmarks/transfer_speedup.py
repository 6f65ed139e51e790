"""The paper's speed-up table at small scale: train-from-scratch vs VPGTrans on the benchmark zoo (zoo-v2),
every arm measured the same way.

    python -m benchmarks.transfer_speedup --write-docs   # builds/reuses zoo-v2 + its stage-1 Q-Former, every arm
    python -m benchmarks.transfer_speedup --smoke        # random-weight tiny zoo, a few steps: plumbing only
    python -m benchmarks.transfer_speedup --docs-from benchmarks/results/transfer_speedup.json   # docs only

For each target LLM — ``opt-l`` (the source opt-s's family and tokenizer) and ``llama-s`` (another family and
tokenizer) — and each seed, these arms run through the toolkit's library API
(``vpgtrans.stages.transfer.transfer``) on the same caption training split, in the same data order:

- ``scratch`` (init ``stage1-pretrained``): the paper's TFS baseline. The VPG is a Q-Former given BLIP-2's
  first-stage pre-training (ITC + ITM, no LLM; ``vpgtrans.demo.stage1``) on the source's own pre-training
  images and captions, connected to the target through a fresh projector and trained (VPG + projector) with a
  linear lr warm-up then cosine decay.
- ``scratch-random`` (init ``random``): today's second baseline, a freshly initialised VPG + projector
  (``--from-scratch``), the same schedule.
- ``vpgtrans`` (init ``inherited``): inherit the source VPG and the converter-merged projector, warm up the
  projector alone for **one epoch** of the training split at 5x lr, constant (the recipe and the paper), then
  fine-tune VPG + projector with the same linear warm-up + cosine as the scratch arms.
- ablations (seed ``ablation_seed``, the vpgtrans arm's lr): ``no-converter`` (fresh projector),
  ``no-warmup`` (fine-tune right after inherit), ``warmup-1x`` (warm-up at the normal lr), ``frozen-vpg`` (the
  fine-tune trains the projector only: how far the inherited VPG goes without adapting to the target).
- ``scratch-long`` (seed ``ablation_seed``, scratch's lr): the scratch arm with ``LONG_FACTOR`` times the
  budget (its cosine that much longer): does scratch's best within the common budget stand for its plateau?
  Reported as plateau evidence and as one more row, vpgtrans over scratch-long's best (the paper's TFS is
  trained for 10 epochs; this row says how much a longer-trained baseline would change the speed-up).

**The source** the inherited arms start from is BLIP-2 on opt-s with its VPG trained ``source_steps`` steps of 64
(``vpgtrans.demo.zoo2.long_source``: the zoo's own source recipe, same init and data, trained 4x longer; built
once, cached beside the zoo); ``--source-steps 0`` takes the zoo's source as built (8000 steps). The scratch
arms do not depend on it: their records are shared between sources (only the inherited arms' record names say
which source they used).

**One measure for every arm.** Every arm trains ``epochs`` epochs in all (VPGTrans: its warm-up epoch +
``epochs - 1`` of fine-tuning; no-warmup: ``epochs`` of fine-tuning), so every cosine schedule has the same
length and ends at ``min_lr_ratio`` x lr; every arm is evaluated (caption CIDEr, ``eval_samples`` images of
the eval split) every ``eval_every_samples`` training samples, warm-up samples counted, so all arms share one
grid. Speed-ups of an arm over a baseline arm (same target, same seed), each in three units:

- ``epochs`` — the paper's measure, DESIGN §7: "epochs for TFS to reach its best score ÷ epochs for VPGTrans
  to beat it, with the warm-up counted as one whole epoch". Computed on the whole-epoch points of the grid
  (epoch 0, before any training, left out); here the warm-up *is* one epoch of data.
- ``samples`` — training samples seen, on the full grid (warm-up samples counted).
- ``seconds`` — training wall time measured in the same run at each grid point (evaluation left out; model
  loading and the inherit step, which fits the converter in well under a second here, left out).

each at two bars: ``at_best`` (the paper's rule: the baseline's first point at its best ÷ the arm's first
point strictly above that best) and ``at_95`` (first point reaching 95% of the baseline's best, on trailing
``smooth_window``-point moving averages for samples and seconds, on the raw per-epoch points for epochs).

**Learning rates**: each searched arm (scratch, scratch-random, vpgtrans) and target gets its own lr from
``lr_grid``, chosen by the best smoothed CIDEr on a **dev split** (``dev_rows`` fresh world scenes, never the
eval split) of one run with seed ``search_seed`` and the arm's full schedule; the search is in the JSON. Where the
pick is the grid's largest (smallest) lr, the grid is extended by its own end ratio in that direction and searched
again, up to ``lr_grid_extend`` times (the same rule for every arm), so an arm is not left under-tuned by a grid
that stops too early.
**Plateau evidence** for every run: the gain of its smoothed curve in the last ``plateau_fraction`` of the
budget over its best before, and the slope there.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from benchmarks import curves
from benchmarks.common import (RunRecords, add_zoo_options, machine_info, quiet_libraries, require_matplotlib,
                               result_config, result_parser, save_result, search_lr_grid, spread,
                               without_times, write_docs_section, zoo_v2)

BASELINES = ("scratch", "scratch-random")
ARMS = (*BASELINES, "vpgtrans")
ABLATIONS = ("no-converter", "no-warmup", "warmup-1x", "frozen-vpg", "scratch-long")
LONG_FACTOR = 2  # scratch-long: the scratch arm with this many times the budget (is scratch's best its plateau?)
INIT = {"scratch": "stage1-pretrained", "scratch-random": "random", "vpgtrans": "inherited",
        "no-converter": "inherited", "no-warmup": "inherited", "warmup-1x": "inherited", "frozen-vpg": "inherited",
        "scratch-long": "stage1-pretrained"}
SEARCHED = ARMS  # ablations take the vpgtrans arm's lr
MEASURES = ("epochs", "samples", "seconds")
METRIC = "cider"
LOADED = 3.0  # a run started above this 1-minute load average shared the 2 cores with other work
DOCS_BEGIN, DOCS_END = "<!-- transfer_speedup:begin -->", "<!-- transfer_speedup:end -->"
PAPER_MEASURE = ("epochs for TFS to reach its best score ÷ epochs for VPGTrans to beat it, with the warm-up "
                 "counted as one whole epoch")


@dataclass
class SpeedupConfig:
    MAY_BE_EMPTY: ClassVar[tuple[str, ...]] = ("ablations",)  # `--ablations` alone: no ablation
    targets: list[str] = field(default_factory=lambda: ["opt-l", "llama-s"])
    arms: list[str] = field(default_factory=lambda: list(ARMS))  # a process may run some (they share --work-dir)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    ablations: list[str] = field(default_factory=lambda: list(ABLATIONS))
    ablation_seed: int = 0
    zoo_seed: int = 0
    batch_size: int = 40  # 6000 training rows = 150 steps an epoch, a whole number
    epochs: float = 20.0  # every arm's budget, warm-up included (10 did not let scratch plateau; scratch-long: 2x)
    eval_every_samples: int = 1200  # the one grid of every arm: a fifth of an epoch
    lr_warmup_samples: int = 1200  # linear lr warm-up of every cosine schedule (scratch arms, VPGTrans fine-tune)
    min_lr_ratio: float = 0.1  # cosine floor / lr (the paper's TFS: 1e-4 -> 1e-5)
    warmup_lr_multiplier: float = 5.0  # VPGTrans's projector warm-up at 5x lr, constant, one epoch
    lr_grid: list[float] = field(default_factory=lambda: [2e-3, 4e-3, 8e-3])  # extended beyond an edge pick
    lr_grid_extend: int = 2  # at most this many lrs added beyond an edge pick, each the grid's end ratio further
    search_seed: int = 100  # the lr-search runs' seed (data order, fresh parts); not one of the measured seeds
    search_eval_every_samples: int = 3000
    dev_rows: int = 200
    eval_samples: int = 64  # caption-eval images per curve point
    final_eval_samples: int = 200  # caption and VQA eval rows for the final scores
    smooth_window: int = 3
    plateau_fraction: float = 0.25
    plateau_tolerance: float = 0.02  # plateaued: the last quarter gains < 2% over the best before it
    max_new_tokens: int = 40  # a three-object caption is ~30 tokens
    threads: int = 1  # on a shared 2-core machine, two threads make these small matmuls several times slower
    source_steps: int = 32000  # the source's recipe trained this long (long_source); 0: the zoo's (8000 steps)


SMOKE = dict(targets=["opt-l", "llama-s"], seeds=[0], batch_size=4, epochs=2.0, eval_every_samples=8,
             lr_warmup_samples=4, lr_grid=[1e-3, 2e-3], lr_grid_extend=0, search_eval_every_samples=8, dev_rows=4, eval_samples=4,
             final_eval_samples=4, max_new_tokens=3, source_steps=2)


# ------------------------------------------------------------------------------------------- schedules

def plan_steps(cfg: SpeedupConfig, n_train: int) -> dict:
    """The step budgets every arm shares, from the training split's size. Raises when the grid cannot be
    common (an epoch must be a whole number of eval intervals, so VPGTrans's fine-tune starts on the grid)."""
    from vpgtrans.errors import VpgtransError

    problems = [f"{name} ({getattr(cfg, name)}) is not a multiple of batch_size ({cfg.batch_size})"
                for name in ("eval_every_samples", "lr_warmup_samples", "search_eval_every_samples")
                if getattr(cfg, name) % cfg.batch_size]
    epoch_steps = round(n_train / cfg.batch_size)
    eval_every = cfg.eval_every_samples // cfg.batch_size
    for name in ("eval_every_samples", "search_eval_every_samples"):
        interval = getattr(cfg, name) // cfg.batch_size
        if not problems and epoch_steps % interval:
            problems.append(f"one epoch ({epoch_steps} steps of {cfg.batch_size}) is not a whole number of "
                            f"{name} intervals ({interval} steps)")
    total = round(cfg.epochs * epoch_steps)
    if total <= epoch_steps:
        problems.append(f"epochs ({cfg.epochs}) must leave VPGTrans some fine-tuning after its warm-up epoch")
    if problems:
        raise VpgtransError("transfer_speedup: " + "; ".join(problems))
    return {"n_train": n_train, "epoch_steps": epoch_steps, "total_steps": total, "eval_every": eval_every,
            "search_eval_every": cfg.search_eval_every_samples // cfg.batch_size,
            "lr_warmup_steps": cfg.lr_warmup_samples // cfg.batch_size,
            "warmup_epochs": epoch_steps * cfg.batch_size / n_train}


def arm_configs(cfg: SpeedupConfig, plan: dict, arm: str, seed: int, lr: float, eval_every: int) -> dict:
    """``transfer`` keyword arguments of one arm: stage configs, inherit config, which source, skip_warmup."""
    from vpgtrans.config import InheritConfig, TrainConfig

    common = dict(batch_size=cfg.batch_size, seed=seed, eval_max_samples=cfg.eval_samples,
                  max_new_tokens=cfg.max_new_tokens, eval_every=eval_every)

    def cosine(steps: int) -> TrainConfig:  # every arm's VPG + projector stage: linear warm-up, then cosine
        parts = {"trainable": ["connector"]} if arm == "frozen-vpg" else {}
        return TrainConfig.finetune(lr=lr, min_lr=lr * cfg.min_lr_ratio, warmup_steps=plan["lr_warmup_steps"],
                                    max_steps=steps, **parts, **common)

    if arm == "scratch-random":
        return dict(source="source", from_scratch=True, finetune_config=cosine(plan["total_steps"]),
                    inherit_config=InheritConfig(seed=seed))
    if arm in ("scratch", "scratch-long"):  # the stage-1 Q-Former, a fresh projector (no converter), one stage
        return dict(source="stage1", skip_warmup=True, finetune_config=cosine(plan["total_steps"]),
                    inherit_config=InheritConfig(converter="none", seed=seed))
    inherit = InheritConfig(converter="none" if arm == "no-converter" else "shared-tokens", seed=seed)
    if arm == "no-warmup":
        return dict(source="source", skip_warmup=True, finetune_config=cosine(plan["total_steps"]),
                    inherit_config=inherit)
    multiplier = 1.0 if arm == "warmup-1x" else cfg.warmup_lr_multiplier
    warmup = TrainConfig.warmup(lr=lr * multiplier, max_steps=plan["epoch_steps"], **common)  # constant, one epoch
    return dict(source="source", warmup_config=warmup, finetune_config=cosine(plan["total_steps"] - plan["epoch_steps"]),
                inherit_config=inherit)


# ------------------------------------------------------------------------------------------------ arms

def run_arm(cfg: SpeedupConfig, zoo: dict, plan: dict, target: str, arm: str, seed: int, lr: float, out_dir: Path,
            eval_data: Path, eval_every: int, final: bool = True) -> dict:
    """Train one arm through ``vpgtrans.stages.transfer.transfer``; its curve on the samples grid with the
    training seconds at each point; with ``final``, its final bundle scored on the eval splits. The bundles go
    to ``out_dir.PID`` (one process's: a killed run's leftovers or another process training the same run are
    never in the way) and are deleted once scored: the returned record is the run."""
    from vpgtrans.evaluate import evaluate
    from vpgtrans.stages.transfer import transfer

    world = Path(zoo["world"])
    kwargs = arm_configs(cfg, plan, arm, seed, lr, eval_every)
    source = zoo[kwargs.pop("source")]
    out_dir = out_dir.with_name(f"{out_dir.name}.{os.getpid()}")
    shutil.rmtree(out_dir, ignore_errors=True)
    load = os.getloadavg()
    started = time.perf_counter()
    summary = transfer(source, zoo[target], world / "caption_train", out_dir, eval_data=eval_data, force=True, **kwargs)
    wall = time.perf_counter() - started
    curve = [{"samples": p["samples"], "step": p["step"], "epoch": p["samples"] / plan["n_train"], "stage": p["stage"],
              "train_seconds": seconds, METRIC: p[METRIC]} for p, seconds in zip(summary["curve"], summary["curve_seconds"])]
    stages = {name: c for name, c in summary["config"].items() if name != "inherit"}
    run = {"target": target, "arm": arm, "seed": seed, "init": INIT[arm], "lr": lr,
           "stage_lrs": {name: {"lr": c["lr"], "min_lr": c["min_lr"], "warmup_steps": c["warmup_steps"],
                                "steps": c["max_steps"], "trainable": c["trainable"]} for name, c in stages.items()},
           "eval_every_samples": eval_every * cfg.batch_size,
           "warmup_epochs": plan["warmup_epochs"] if "warmup" in stages else 0.0,
           "total_samples": sum(c["max_steps"] for c in stages.values()) * cfg.batch_size,
           "curve": curve, "plateau": plateau(curve, cfg),
           "converter_heldout_cosine": summary["metrics"]["inherit"].get("converter", {}).get("heldout_cosine"),
           "train_seconds": round(sum(summary["metrics"][name]["train"]["train_seconds"] for name in stages), 2),
           "wall_seconds": round(wall, 1), "loadavg_before": [round(x, 2) for x in load],
           "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    if final:
        bundle = Path(summary["final_bundle"])
        run["final"] = {
            "caption": evaluate(bundle, world / "caption_eval", max_samples=cfg.final_eval_samples, batch_size=50,
                                max_new_tokens=cfg.max_new_tokens)["scores"],
            "vqa": evaluate(bundle, world / "vqa_eval", max_samples=cfg.final_eval_samples, batch_size=50,
                            max_new_tokens=min(8, cfg.max_new_tokens))["scores"]}
    shutil.rmtree(out_dir)
    return run


def search_lr(cfg: SpeedupConfig, zoo: dict, plan: dict, target: str, arm: str, dev: Path, work_dir: Path, log,
              records: RunRecords) -> dict:
    """One run per lr of ``lr_grid`` (seed ``search_seed``, the arm's full schedule, dev split every
    ``search_eval_every_samples``), extended beyond an edge pick up to ``lr_grid_extend`` times
    (``search_lr_grid``); the lr with the best smoothed dev CIDEr wins."""
    def trial(lr: float) -> dict:
        name = f"search-{target}-{arm}-{lr:g}{source_tag(cfg, arm)}"
        run = records.get(name, lambda: run_arm(cfg, zoo, plan, target, arm, cfg.search_seed, lr, work_dir / name,
                                                dev, plan["search_eval_every"], final=False))
        found = {"lr": lr, "dev_best_smoothed": curves.best(curves.smooth(_points(run), cfg.smooth_window)),
                 "dev_best": curves.best(_points(run)), "dev_last": run["curve"][-1][METRIC],
                 "curve": [(p["samples"], p[METRIC]) for p in run["curve"]], "train_seconds": run["train_seconds"],
                 "wall_seconds": run["wall_seconds"], "code": run.get("code")}
        log(f"  lr search {target} {arm} lr {lr:g}: dev best (smoothed) {found['dev_best_smoothed']:.3f}")
        return found

    found = search_lr_grid(cfg.lr_grid, trial, lambda t: t["dev_best_smoothed"], cfg.lr_grid_extend)
    return {"target": target, "arm": arm, "split": "dev", "dev_rows": cfg.dev_rows, "seed": cfg.search_seed,
            "criterion": f"best {cfg.smooth_window}-point moving average of dev CIDEr over the run", **found}


# ------------------------------------------------------------------------------------------- measures

def _points(run: dict, unit: str = "samples") -> curves.Curve:
    key = {"samples": "samples", "seconds": "train_seconds", "epochs": "epoch"}[unit]
    return [(p[key], p[METRIC]) for p in run["curve"]]


def plateau(curve: list[dict], cfg: SpeedupConfig) -> dict:
    """Did the run stop improving? On the smoothed curve: the best in the last ``plateau_fraction`` of the
    samples budget against the best before it, and the least-squares slope there (CIDEr per epoch)."""
    smoothed = curves.smooth([(p["samples"], p[METRIC]) for p in curve], cfg.smooth_window)
    start = curve[-1]["samples"] * (1 - cfg.plateau_fraction)
    before = [s for x, s in smoothed if x < start]
    last = [(p["epoch"], s) for p, (x, s) in zip(curve, smoothed) if x >= start]
    gain = None if not before or max(before) <= 0 else (max(s for _, s in last) - max(before)) / max(before)
    slope = None
    if len(last) > 1:
        mx, my = statistics.fmean(x for x, _ in last), statistics.fmean(y for _, y in last)
        var = sum((x - mx) ** 2 for x, _ in last)
        slope = None if var == 0 else sum((x - mx) * (y - my) for x, y in last) / var
    best_at = curves.steps_to_best(smoothed)
    return {"last_fraction": cfg.plateau_fraction, "points_in_last": len(last),
            "best_before_last": max(before) if before else None, "best_in_last": max(s for _, s in last),
            "relative_gain_in_last": gain, "slope_per_epoch_in_last": slope,
            "smoothed_best_at_samples": best_at, "smoothed_best_at_fraction": best_at / max(curve[-1]["samples"], 1),
            "plateaued": gain is not None and gain < cfg.plateau_tolerance}


def _first(curve: curves.Curve, threshold: float, strict: bool) -> int | None:
    """Index of the first point at (strictly: above) ``threshold``."""
    return next((i for i, (_, s) in enumerate(curve) if s > threshold or (not strict and s >= threshold)), None)


def _ratio(base: float | None, other: float | None) -> float | None:
    """base / other; undefined (None) when either never got there or either is at 0 (a baseline whose best is
    its untrained start, or an arm above the bar before any training)."""
    return None if base is None or other is None or other <= 0 or base <= 0 else base / other


def _per_epoch(run: dict, n_train: int) -> curves.Curve:
    """The paper's grid: (epoch, score) at every whole epoch after epoch 0."""
    return [(p["samples"] // n_train, p[METRIC]) for p in run["curve"] if p["samples"] > 0 and p["samples"] % n_train == 0]


def speedups(baseline: dict, other: dict, cfg: SpeedupConfig, n_train: int) -> dict:
    """``{unit: {"at_best": {...}, "at_95": {...}}}`` of ``other`` over ``baseline`` (same target and seed)."""
    out = {}
    # samples and seconds: the crossing points found on the samples grid, the seconds read at those points
    raw_b, raw_o = _points(baseline), _points(other)
    sm_b, sm_o = curves.smooth(raw_b, cfg.smooth_window), curves.smooth(raw_o, cfg.smooth_window)
    best = curves.best(raw_b)
    crossings = {"at_best": (raw_b.index(next(p for p in raw_b if p[1] == best)), _first(raw_o, best, strict=True), best),
                 "at_95": (_first(sm_b, 0.95 * curves.best(sm_b), False), _first(sm_o, 0.95 * curves.best(sm_b), False),
                           0.95 * curves.best(sm_b))}
    for unit in ("samples", "seconds"):
        xs_b, xs_o = [x for x, _ in _points(baseline, unit)], [x for x, _ in _points(other, unit)]
        out[unit] = {}
        for bar, (i_b, i_o, threshold) in crossings.items():
            b = None if i_b is None else xs_b[i_b]
            o = None if i_o is None else xs_o[i_o]
            out[unit][bar] = {"threshold": threshold, "baseline": b, "arm": o, "speedup": _ratio(b, o)}
    # epochs: the paper's per-epoch evaluation, the whole-epoch points after epoch 0, raw
    ep_b, ep_o = _per_epoch(baseline, n_train), _per_epoch(other, n_train)
    out["epochs"] = {}
    if ep_b and ep_o:
        top = curves.best(ep_b)
        for bar, threshold, strict in (("at_best", top, True), ("at_95", 0.95 * top, False)):
            b = curves.steps_to_best(ep_b) if bar == "at_best" else curves.first_step_reaching(ep_b, threshold)
            o = curves.first_step_reaching(ep_o, threshold, strict=strict)
            out["epochs"][bar] = {"threshold": threshold, "baseline": b, "arm": o, "speedup": _ratio(b, o)}
    return out


def after_warmup(runs: list[dict], n_train: int) -> dict:
    """Each arm with a warm-up stage: its score at the end of the one-epoch projector warm-up (the VPG as
    inherited, only the projector trained), over its runs."""
    arms = dict.fromkeys(r["arm"] for r in runs if r.get("warmup_epochs"))
    return {arm: spread([next(p[METRIC] for p in r["curve"] if p["samples"] == n_train) for r in runs if r["arm"] == arm])
            for arm in arms}


def summarize(runs: list[dict], cfg: SpeedupConfig, n_train: int) -> dict:
    """Per target: ``speedup`` / ``speedup_95`` = the headline means (vpgtrans over the stage-1 scratch arm)
    keyed by measure (epochs, samples, seconds), ``rows`` = every comparison with its spread, ``baselines``."""
    by_key = {(r["target"], r["arm"], r["seed"]): r for r in runs}
    comparisons = [("vpgtrans", "scratch"), ("vpgtrans", "scratch-random"), ("scratch", "scratch-random"),
                   *((a, "scratch") for a in cfg.ablations if a != "scratch-long"),
                   *([("vpgtrans", "scratch-long")] if "scratch-long" in cfg.ablations else [])]
    summary = {}
    for target in cfg.targets:
        rows = []
        for arm, base in comparisons:
            seeds = [s for s in (cfg.seeds if arm in ARMS else [cfg.ablation_seed])
                     if (target, arm, s) in by_key and (target, base, s) in by_key]
            if not seeds:
                continue
            per_seed = [{"seed": s, **speedups(by_key[(target, base, s)], by_key[(target, arm, s)], cfg, n_train)}
                        for s in seeds]
            finals = [by_key[(target, arm, s)].get("final") for s in seeds]
            rows.append({"arm": arm, "baseline": base, "seeds": seeds, "per_seed": per_seed,
                         **{unit: {bar: spread([c[unit].get(bar, {}).get("speedup") for c in per_seed])
                                   for bar in ("at_best", "at_95")} for unit in MEASURES},
                         "final_cider": spread([f and f["caption"]["cider"] for f in finals]),
                         "final_vqa": spread([f and f["vqa"]["vqa_accuracy"] for f in finals])})
        headline = next((r for r in rows if (r["arm"], r["baseline"]) == ("vpgtrans", "scratch")), None)
        baselines = {}
        for base in (*BASELINES, "scratch-long"):
            found = [by_key[(target, base, s)] for s in sorted({*cfg.seeds, cfg.ablation_seed}) if (target, base, s) in by_key]
            if found:
                baselines[base] = {"seeds": [r["seed"] for r in found],
                                   "best_cider": spread([curves.best(_points(r)) for r in found]),
                                   "samples_to_best": spread([curves.steps_to_best(_points(r)) for r in found]),
                                   "epoch_of_best": spread([curves.steps_to_best(_per_epoch(r, n_train)) for r in found]),
                                   "plateaued": [r["plateau"]["plateaued"] for r in found],
                                   "relative_gain_in_last": spread([r["plateau"]["relative_gain_in_last"] for r in found])}
        summary[target] = {
            "baseline": "scratch", "arm": "vpgtrans",
            "speedup": {unit: headline[unit]["at_best"]["mean"] if headline else None for unit in MEASURES},
            "speedup_95": {unit: headline[unit]["at_95"]["mean"] if headline else None for unit in MEASURES},
            "rows": rows, "baselines": baselines,
            "after_warmup": after_warmup([r for r in runs if r["target"] == target], n_train)}
    return summary


# ----------------------------------------------------------------------------------------------- output

def _fmt(spread: dict, digits: int = 2, suffix: str = "", undefined: str = "never") -> str:
    if spread["mean"] is None:
        return undefined if spread.get("missing") else "–"
    text = f"{spread['mean']:.{digits}f}{suffix}"
    if spread["n"] > 1:
        text += f" ± {spread['std']:.{digits}f} [{spread['min']:.{digits}f}, {spread['max']:.{digits}f}]"
    if spread["missing"]:
        text += f" ({spread['missing']} never)"
    return text


def _table_rows(block: dict) -> list[list[str]]:
    return [[row["arm"], row["baseline"], ",".join(map(str, row["seeds"])),
             *(_fmt(row[unit][bar], 1, "×") for unit in MEASURES for bar in ("at_best", "at_95")),
             _fmt(row["final_cider"], 3), _fmt(row["final_vqa"], 3)] for row in block["rows"]]


COLUMNS = ["arm", "over", "seeds", *(f"{unit} to {'best' if bar == 'at_best' else '95%'}" for unit in MEASURES
                                     for bar in ("at_best", "at_95")),
           "final CIDEr", "final VQA acc"]


def render(result: dict):
    from rich.console import Group
    from rich.table import Table

    tables = []
    for target, block in result["summary"].items():
        table = Table(title=f"{result['source']} -> {target}: speed-ups (mean ± std [min, max] over seeds)")
        for column in COLUMNS:
            table.add_column(column, justify="left" if column in ("arm", "over") else "right")
        for row in _table_rows(block):
            table.add_row(*row)
        tables.append(table)
    return Group(*tables)


def markdown(result: dict | None, cfg: SpeedupConfig) -> str:
    """The ``docs/benchmarks.md`` section, from a result JSON (``None`` or a smoke result: the protocol only,
    every number "to be re-measured")."""
    measured = result is not None and not result.get("smoke") and "summary" in result
    lines = [DOCS_BEGIN, "", "*This section is written by `python -m benchmarks.transfer_speedup --write-docs` "
             "(or `--docs-from JSON`); do not edit it by hand.*", "",
             f"Protocol (`SpeedupConfig`): batch {cfg.batch_size}; every arm {cfg.epochs:g} epochs of the caption "
             f"training split in all; eval every {cfg.eval_every_samples} samples (warm-up counted) on "
             f"{cfg.eval_samples} eval images; every cosine schedule: linear lr warm-up over {cfg.lr_warmup_samples} "
             f"samples, then cosine to {cfg.min_lr_ratio:g} × lr at the end of the arm's budget; VPGTrans's projector "
             f"warm-up: one epoch at {cfg.warmup_lr_multiplier:g}× lr, constant; lr per arm and target from "
             f"{cfg.lr_grid} on a {cfg.dev_rows}-row dev split (seed {cfg.search_seed}), extended by the grid's end ratio "
             f"beyond an edge pick, up to {cfg.lr_grid_extend} times; seeds {cfg.seeds}.", "",
             f"Measures: **epochs** — the paper's: \"{PAPER_MEASURE}\" (DESIGN §7's statement of the paper's "
             "measure; whole-epoch grid points, epoch 0 left out); **samples** seen (warm-up counted); **seconds** "
             "of training wall time in the same run (evaluation left out). *to best* = the baseline's first point at "
             "its best ÷ the arm's first point strictly above it; *to 95%* = first points reaching 95% of the "
             "baseline's best (smoothed for samples and seconds); *never* = not reached within the budget, or undefined "
             "(a baseline whose best is its untrained start).", ""]
    if not measured:
        lines += ["**Numbers: to be re-measured.** No full run of this protocol has been recorded yet "
                  "(`benchmarks/results/transfer_speedup.json` must come from `python -m benchmarks.transfer_speedup`).",
                  "", DOCS_END]
        return "\n".join(lines)
    machine = result["machine"]
    lines += [f"Run: {result.get('finished', '?')}, {machine['cpu']}, {machine['cores']} cores, torch "
              f"{machine['torch']}; load average at the start {result.get('loadavg_start')}, at the end "
              f"{result.get('loadavg_end')}; {_run_time(result)}.", ""]
    build = result.get("source_build")
    if build:  # results written before source_build existed say nothing here
        metrics = build["metrics"]
        lines += [f"Source of the inherited arms: BLIP-2 on {result['source']} (`{build['dir']}/`), its VPG + projector "
                  f"trained {build['samples']:,} samples ({build['steps']:,} steps × 64); on its own it scores caption "
                  f"attribute accuracy {metrics.get('caption_eval/attribute_accuracy', float('nan')):.3f} and VQA accuracy "
                  f"{metrics.get('vqa_eval/vqa_accuracy', float('nan')):.3f} on the world's eval splits.", ""]
    for target, block in result["summary"].items():
        lines += [f"**{result['source']} → {target}**", "", "| " + " | ".join(COLUMNS) + " |",
                  "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(row) + " |" for row in _table_rows(block)]
        for base, info in block["baselines"].items():
            lines.append(f"\n{base}: best CIDEr {_fmt(info['best_cider'], 3)} at {_fmt(info['samples_to_best'], 0)} "
                         f"samples; plateaued (last {cfg.plateau_fraction:.0%} gains < {cfg.plateau_tolerance:.0%}): "
                         f"{info['plateaued']}, gain in the last part {_fmt(info['relative_gain_in_last'], 3, undefined='n/a')}; "
                         f"best of the whole-epoch points at epoch {_fmt(info['epoch_of_best'], 1)}.")
        if block.get("after_warmup"):
            lines.append("\nCIDEr at the end of the one-epoch projector warm-up (the VPG as inherited): " + "; ".join(
                f"{arm} {_fmt(found, 3)}" for arm, found in block["after_warmup"].items()) + ".")
        searched = [s for s in result["lr_search"] if s["target"] == target]
        lines.append("\nlr chosen on dev: " + "; ".join(
            f"{s['arm']} {s['chosen_lr']:g}{' (grid edge)' if s['at_grid_edge'] else ''}"
            f"{' (grid extended: ' + ', '.join(f'{x:g}' for x in s['extended']) + ')' if s.get('extended') else ''}"
            for s in searched) + "\n")
    if result.get("plot") and Path(result["plot"]).parent.name == "docs":
        lines.append(f"![caption CIDEr vs epochs, every arm]({Path(result['plot']).name})\n")
    lines.append(DOCS_END)
    return "\n".join(lines)


def _run_time(result: dict) -> str:
    """How long the runs took, and whether some were read back from an earlier process's records."""
    text = f"{result.get('run_wall_seconds', result['seconds']):.0f} s of wall time in the runs (lr search included)"
    records = result.get("records") or {}
    if records.get("reused"):
        text += (f"; {records['reused']} runs were recorded by earlier or parallel processes of the same protocol "
                 f"and zoo (`RunRecords`) and read back; each run's own load average is in the JSON")
    loads = [(r["loadavg_before"][0], f"{r['target']} {r['arm']} s{r['seed']}") for r in result["runs"]
             if r.get("loadavg_before")]
    if loads:  # the seconds measure depends on what else ran: say how loaded the machine was, run by run
        busy = [name for load, name in loads if load > LOADED]
        text += (f". 1-minute load average at the start of the measured runs: {min(l for l, _ in loads):.2f}–"
                 f"{max(l for l, _ in loads):.2f} (one torch thread per process, two processes: ~2 is a full "
                 f"machine); {len(busy)} of {len(loads)} runs started above {LOADED:g}"
                 + (f" ({', '.join(busy)}): their seconds are inflated by other work" if busy else ""))
    return text


def write_docs(text: str, path: Path = Path("docs/benchmarks.md")) -> Path:
    """Replace the marked section of ``path`` with ``text``."""
    return write_docs_section(text, DOCS_BEGIN, DOCS_END, path)


def plot(result: dict, path: Path) -> Path:
    plt = require_matplotlib()
    targets = list(result["summary"])
    fig, axes = plt.subplots(1, len(targets), figsize=(6.5 * len(targets), 4.5), squeeze=False)
    colours = {"scratch": "tab:grey", "scratch-random": "black", "vpgtrans": "tab:red", "no-converter": "tab:blue",
               "no-warmup": "tab:green", "warmup-1x": "tab:orange", "frozen-vpg": "tab:pink",
               "scratch-long": "tab:brown"}
    for ax, target in zip(axes[0], targets):
        labelled = set()
        for run in result["runs"]:
            if run["target"] != target:
                continue
            xs, scores = zip(*[(p["epoch"], p[METRIC]) for p in run["curve"]])
            headline = run["arm"] in ARMS
            ax.plot(xs, scores, color=colours.get(run["arm"], "purple"), alpha=0.85 if headline else 0.7,
                    linestyle="-" if headline else "--", linewidth=1.6 if headline else 1.2,
                    label=None if run["arm"] in labelled else run["arm"])
            labelled.add(run["arm"])
        ax.set_xlabel("epochs of the caption training split (samples / rows; VPGTrans's warm-up included)")
        ax.set_ylabel("caption CIDEr (eval split)")
        ax.set_title(f"{result['source']} -> {target}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------- main

def searched_arm(arm: str) -> str:
    """Whose lr search an arm takes: its own, scratch's for scratch-long, else (ablations) vpgtrans's."""
    return arm if arm in SEARCHED else "scratch" if arm == "scratch-long" else "vpgtrans"


def run_identity(cfg: SpeedupConfig, zoo: dict) -> dict:
    """What determines one run's record: the protocol (all of the config but which targets, seeds, ablations
    and lrs are run: a run's lr is in its record's name; the source's steps are in the inherited arms' names) and
    the zoo it trains on (its record, the stage-1
    Q-Former's). So widening ``lr_grid`` trains only the new lrs' trials (and the runs of an arm whose pick
    changes)."""
    # source_steps: only the inherited arms' runs depend on it, and it is in their names (source_tag)
    protocol = {k: v for k, v in asdict(cfg).items() if k not in (
        "targets", "arms", "seeds", "ablations", "ablation_seed", "lr_grid", "lr_grid_extend", "source_steps")}

    zoo_record = json.loads((Path(zoo["root"]) / "zoo.json").read_text())
    return {"protocol": protocol, "zoo": without_times(zoo_record), "stage1": without_times(zoo.get("stage1_record"))}


def uses_source(arm: str) -> bool:
    """Whether an arm's run depends on which source it inherits (the scratch arms do not: stage-1 Q-Former,
    or a fresh VPG on the source's frozen ViT, the same in every source build)."""
    return INIT[arm] == "inherited"


def source_tag(cfg: SpeedupConfig, arm: str) -> str:
    """The part of a run's record name that says which source it inherited: the zoo's (none) or the long one."""
    return f"-source{cfg.source_steps}" if cfg.source_steps and uses_source(arm) else ""


def run(cfg: SpeedupConfig, zoo: dict, work_dir: Path, log=print, keep_records: bool = False,
        reverse: bool = False) -> dict:
    """The lr search on the dev split, then every arm of every target and seed, then the summary. With
    ``keep_records``, every finished run is recorded under ``work_dir/records`` and a run already recorded
    there for the same protocol and zoo is read back, not trained again (``RunRecords``). ``reverse`` trains
    the measured runs last-first, so a second process on the same work dir and target shares them (the two
    meet in the middle; the lr search stays in order: its extensions depend on its earlier trials)."""
    import torch

    from vpgtrans.demo import world2

    n_train = sum(1 for _ in open(Path(zoo["world"]) / "caption_train" / "data.jsonl"))
    plan = plan_steps(cfg, n_train)
    dev = work_dir / "caption_dev"
    if not (dev / "data.jsonl").is_file():  # built aside, then moved in: processes sharing work_dir never see half
        built = world2.make_split(work_dir / f".caption_dev.{os.getpid()}", "caption", cfg.dev_rows,
                                  seed=10_000 + cfg.zoo_seed)
        try:
            os.rename(built, dev)
        except OSError:  # another process got there first; its split is the same
            shutil.rmtree(built, ignore_errors=True)
    records = RunRecords(work_dir / "records" if keep_records else None, run_identity(cfg, zoo))
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    started, load = time.perf_counter(), os.getloadavg()
    runs, searches = [], []
    try:
        searched = {searched_arm(arm) for arm in (*cfg.arms, *cfg.ablations)}
        for target in cfg.targets:
            for arm in (a for a in SEARCHED if a in searched):
                searches.append(search_lr(cfg, zoo, plan, target, arm, dev, work_dir, log, records))
        lrs = {(s["target"], s["arm"]): s["chosen_lr"] for s in searches}
        long_plan = {**plan, "total_steps": plan["total_steps"] * LONG_FACTOR}
        jobs = [(t, a, s) for t in cfg.targets for a in ARMS if a in cfg.arms for s in cfg.seeds] + \
               [(t, a, cfg.ablation_seed) for t in cfg.targets for a in cfg.ablations]
        for i, (target, arm, seed) in enumerate(reversed(jobs) if reverse else jobs, 1):
            lr = lrs[(target, searched_arm(arm))]
            name = f"{target}-{arm}-seed{seed}-lr{lr:g}{source_tag(cfg, arm)}"
            arm_plan = long_plan if arm == "scratch-long" else plan
            run_ = records.get(name, lambda: run_arm(cfg, zoo, arm_plan, target, arm, seed, lr, work_dir / name,
                                                     Path(zoo["world"]) / "caption_eval", plan["eval_every"]))
            search = next(x for x in searches if (x["target"], x["arm"]) == (target, searched_arm(arm)))
            run_["lr_search"] = {"searched_arm": search["arm"], "chosen_lr": search["chosen_lr"], "grid": search["grid"],
                                 "split": "dev", "criterion": search["criterion"], "at_grid_edge": search["at_grid_edge"],
                                 "dev_best_smoothed": {str(t["lr"]): t["dev_best_smoothed"] for t in search["trials"]}}
            runs.append(run_)
            log(f"[{i}/{len(jobs)}] {target} {arm} seed {seed} lr {lr:g}: best CIDEr {curves.best(_points(run_)):.3f}, "
                f"final CIDEr {run_['final']['caption']['cider']:.3f}, plateaued {run_['plateau']['plateaued']} "
                f"({run_['wall_seconds']:.0f}s)")
    finally:
        torch.set_num_threads(threads)
    zoo_record = json.loads((Path(zoo["root"]) / "zoo.json").read_text())
    return {"benchmark": "transfer_speedup", "config": asdict(cfg), "plan": plan, "machine": machine_info(),
            "source": "opt-s", "source_build": source_build(cfg, zoo, zoo_record), "paper_measure": PAPER_MEASURE,
            "zoo": {"root": str(zoo["root"]), "version": zoo_record["zoo_version"], "seed": zoo_record["seed"],
                    "trained": zoo_record["trained"], "metrics": zoo_record["metrics"],
                    "build_seconds": zoo_record.get("build_seconds"), "stage1": zoo.get("stage1_record")},
            "lr_search": searches, "runs": runs, "summary": summarize(runs, cfg, n_train),
            "loadavg_start": [round(x, 2) for x in load], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "seconds": round(time.perf_counter() - started, 1),
            "run_wall_seconds": round(sum(r["wall_seconds"] for r in runs)
                                      + sum(t["wall_seconds"] for x in searches for t in x["trials"]), 1),
            "records": {"kept": keep_records, "reused": records.reused, "identity": records.digest,
                        "code": [json.loads(c) for c in sorted({json.dumps(r.get("code"), sort_keys=True) for r in runs})]}}


def source_build(cfg: SpeedupConfig, zoo: dict, zoo_record: dict) -> dict | None:
    """How the inherited arms' source was trained and how good it is on its own (caption attribute accuracy,
    VQA accuracy on the world's eval splits): the zoo's source, or ``long_source``'s when ``source_steps``
    (None when no arm of this call inherited one, so the long source was not loaded)."""
    if cfg.source_steps:
        record = zoo.get("source_record")
        return record and {"dir": Path(zoo["source"]).name, "steps": cfg.source_steps,
                           "samples": record["metrics"]["samples"], "metrics": record["metrics"],
                           "seconds": record.get("seconds")}
    metrics = zoo_record["metrics"]
    return {"dir": Path(zoo["source"]).name, "steps": metrics.get("source/steps"), "samples": metrics.get("source/samples"),
            "metrics": {k.removeprefix("source/"): v for k, v in metrics.items() if k.startswith("source/")}}


def main(argv: list[str] | None = None) -> dict | None:
    parser = result_parser("transfer_speedup", __doc__, "random-weight tiny zoo and a few steps (plumbing only)",
                           SpeedupConfig)
    add_zoo_options(parser)
    parser.add_argument("--write-docs", action="store_true",
                        help="after a full run, regenerate the speed-up section of docs/benchmarks.md from its JSON")
    parser.add_argument("--reverse", action="store_true",
                        help="train the measured runs last-first (a second process sharing a --work-dir and target)")
    parser.add_argument("--docs-from", type=Path, default=None,
                        help="only regenerate the docs section from this result JSON (no run)")
    args = parser.parse_args(argv)
    if args.docs_from is not None:
        result = json.loads(args.docs_from.read_text()) if args.docs_from.is_file() else None
        cfg = SpeedupConfig(**result["config"]) if result and "plan" in result else SpeedupConfig()
        print(f"wrote {write_docs(markdown(result if result and 'plan' in result else None, cfg))}")
        return result
    cfg = result_config(args, SpeedupConfig, SMOKE)
    for name, known in (("ablations", ABLATIONS), ("arms", ARMS)):
        unknown = sorted(set(getattr(cfg, name)) - set(known))
        if unknown:
            parser.error(f"unknown {name} {unknown}; known: {list(known)}")
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="vpgtrans-speedup-") as tmp:
        zoo_started = time.perf_counter()
        zoo = dict(zoo_v2(args, cfg.zoo_seed, Path(tmp)))
        from vpgtrans.demo.zoo2 import stage1_qformer

        zoo["stage1"], zoo["stage1_record"] = stage1_qformer(zoo, cfg.zoo_seed, log=print)
        if cfg.source_steps and any(map(uses_source, (*cfg.arms, *cfg.ablations))):
            # a stronger source: the zoo's recipe trained longer (built once, cached)
            from vpgtrans.demo.zoo2 import long_source

            zoo["source"], zoo["source_record"] = long_source(zoo, cfg.source_steps, cfg.zoo_seed, log=print)
        print(f"zoo-v2 + stage-1 Q-Former ready in {time.perf_counter() - zoo_started:.0f}s: {zoo['root']}")
        result = run(cfg, zoo, args.work_dir or Path(tmp) / "runs", keep_records=args.work_dir is not None,
                     reverse=args.reverse)
    result["smoke"] = bool(args.smoke)
    out = save_result("transfer_speedup", args, result, plot)
    if args.write_docs and not args.smoke:
        print(f"wrote {write_docs(markdown(result, cfg))}")
    from rich.console import Console

    Console(width=200).print(render(result))
    print(f"results: {out} ({_run_time(result)})")
    return result


if __name__ == "__main__":
    main()
