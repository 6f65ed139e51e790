"""The LaVIN connector vs the BLIP-2 projector path vs a text-only baseline, on the synthetic
multiple-choice split of the demo world (``vpgtrans.demo.choices``).

    python -m benchmarks.lavin_choice            # builds/reuses zoo-v1, then 3 arms x 3 seeds
    python -m benchmarks.lavin_choice --smoke    # random-weight tiny models, a few steps: plumbing only

Every arm runs through the toolkit's library API (``vpgtrans.stages.transfer.transfer``) from the zoo's
source BLIP-2 (``source-blip2-opt-s``) to the same target (``llama-s``, another family and tokenizer),
on the same training split in the same data order per seed, evaluated on the same questions:

- **lavin**: ``--connector lavin`` (multi-layer [CLS] connector + mixture-of-modality adapters in the LLM
  and the ViT), the lavin recipe's optimiser and schedule, ``steps`` steps at ``lavin_lr``;
- **blip2**: ``--connector linear`` with the vpgtrans recipe: inherited VPG, converter-initialised
  projector, ``warmup_steps`` of projector warm-up at 5x ``blip2_lr``, then VPG + projector for the rest;
- **text-only**: the lavin arm's recipe on the same rows with every image removed (LaVIN's "Image: N/A"),
  evaluated on the eval rows without images too: what the questions give away without vision.

Reported per arm (mean, min, max over seeds): final accuracy on image questions, on text-only questions
and overall, unparseable answers, trainable parameters, wall seconds, and the optimizer steps to reach
``target_accuracy`` overall on the eval curve (None when never reached). Budgets and learning rates are
fixed in ``ChoiceConfig`` before any run; nothing is tuned on the eval split.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.common import machine_info, result_config, result_parser, save_result

ARMS = ("lavin", "blip2", "text-only")


@dataclass
class ChoiceConfig:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    zoo_seed: int = 0
    target: str = "llama-s"
    n_train: int = 1500
    n_eval: int = 120
    text_fraction: float = 0.3
    batch_size: int = 16
    steps: int = 300  # optimizer steps of every arm (blip2: warm-up included)
    warmup_steps: int = 30  # blip2's projector warm-up
    lavin_lr: float = 3e-3  # lavin and text-only (the recipe's 9e-3 x batch/256 would be 5.6e-4 at batch 16)
    blip2_lr: float = 1e-3  # as benchmarks.transfer_speedup (warm-up at 5x)
    eval_every: int = 50
    target_accuracy: float = 0.6
    max_new_tokens: int = 24


SMOKE = {"seeds": [0], "n_train": 12, "n_eval": 6, "batch_size": 4, "steps": 2, "warmup_steps": 1, "eval_every": 1,
         "max_new_tokens": 4}


def make_splits(root: Path, cfg: ChoiceConfig) -> dict[str, Path]:
    from vpgtrans.demo.choices import make_choice_split, strip_images

    splits = {"train": make_choice_split(root / "train", cfg.n_train, 2 * cfg.zoo_seed, text_fraction=cfg.text_fraction),
              "eval": make_choice_split(root / "eval", cfg.n_eval, 2 * cfg.zoo_seed + 1, text_fraction=cfg.text_fraction)}
    splits["train-text"] = strip_images(splits["train"], root / "train-text")
    splits["eval-text"] = strip_images(splits["eval"], root / "eval-text")
    return splits


def run_arm(arm: str, seed: int, zoo: dict, splits: dict, work: Path, cfg: ChoiceConfig) -> dict:
    """One arm, one seed: train, then score the final bundle on the eval questions by question kind."""
    from vpgtrans.config import InheritConfig
    from vpgtrans.recipes import stage
    from vpgtrans.stages.transfer import transfer

    text = arm == "text-only"
    train, evaluation = (splits["train-text"], splits["eval-text"]) if text else (splits["train"], splits["eval"])
    common = {"batch_size": cfg.batch_size, "seed": seed, "eval_every": cfg.eval_every, "eval_max_samples": cfg.n_eval,
              "max_new_tokens": cfg.max_new_tokens}
    if arm == "blip2":
        configs = {"warmup_config": stage("vpgtrans", "warmup").config(lr=5 * cfg.blip2_lr, max_steps=cfg.warmup_steps,
                                                                       **common),
                   "finetune_config": stage("vpgtrans", "finetune").config(
                       lr=cfg.blip2_lr, min_lr=cfg.blip2_lr / 2, max_steps=cfg.steps - cfg.warmup_steps, **common)}
        inherit_config = InheritConfig(connector="linear")
    else:
        configs = {"finetune_config": stage("lavin", "finetune").config(lr=cfg.lavin_lr, max_steps=cfg.steps, **common)}
        inherit_config = InheritConfig(connector="lavin", seed=seed)
    out = work / f"{arm}-seed{seed}"
    started = time.perf_counter()
    summary = transfer(zoo["source"], zoo[cfg.target], train, out, eval_data=evaluation, inherit_config=inherit_config,
                       force=True, **configs)
    seconds = time.perf_counter() - started
    final = Path(summary["final_bundle"])
    manifest = json.loads((final / "manifest.json").read_text())
    curve = [{"step": p["step"], "accuracy": p["accuracy"], "accuracy_image": p.get("accuracy_image")}
             for p in summary["curve"]]
    reached = next((p["step"] for p in curve if p["accuracy"] >= cfg.target_accuracy), None)
    return {"arm": arm, "seed": seed, "curve": curve, "final": final_scores(final, splits, text, cfg),
            "trainable_params": manifest["metrics"]["train"]["trainable"], "steps": curve[-1]["step"],
            "seconds": round(seconds, 1), "steps_to_target": reached}


def final_scores(bundle: Path, splits: dict, text: bool, cfg: ChoiceConfig) -> dict:
    """Scores on the eval questions, split by whether the question came with an image (the text-only
    arm sees none, but its image questions are still the image questions)."""
    from vpgtrans import load_model
    from vpgtrans.data import load_rows
    from vpgtrans.evaluate import evaluate_model
    from vpgtrans.multiple_choice import multiple_choice_scores

    rows = list(load_rows(splits["eval-text"] if text else splits["eval"])[0])
    had_image = [r["image"] is not None for r in load_rows(splits["eval"])[0]]
    result = evaluate_model(load_model(bundle, device="cpu"), rows, "multiple-choice", batch_size=32,
                            max_new_tokens=cfg.max_new_tokens)
    references = [{**ref, "image": image} for ref, image in zip(result["references"], had_image)]
    return multiple_choice_scores(result["predictions"], references)


def _spread(values: list) -> dict:
    known = [v for v in values if v is not None]
    if not known:
        return {"mean": None, "min": None, "max": None, "missing": len(values)}
    return {"mean": statistics.fmean(known), "min": min(known), "max": max(known), "missing": len(values) - len(known)}


def summarize(runs: list[dict]) -> dict:
    by_arm: dict[str, list[dict]] = {}
    for run in runs:
        by_arm.setdefault(run["arm"], []).append(run)
    return {arm: {"seeds": [r["seed"] for r in rs],
                  **{key: _spread([r["final"][key] for r in rs]) for key in
                     ("accuracy", "accuracy_image", "accuracy_text", "unparseable")},
                  "trainable_params": rs[0]["trainable_params"],
                  "seconds": _spread([r["seconds"] for r in rs]),
                  "steps_to_target": _spread([r["steps_to_target"] for r in rs])}
            for arm, rs in by_arm.items()}


def plot(result: dict, path: Path) -> Path:
    from benchmarks.common import require_matplotlib

    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in result["runs"]:
        ax.plot([p["step"] for p in run["curve"]], [p["accuracy"] for p in run["curve"]], label=f"{run['arm']} s{run['seed']}",
                color={"lavin": "tab:blue", "blip2": "tab:orange", "text-only": "tab:gray"}[run["arm"]], alpha=0.8)
    ax.axhline(result["config"]["target_accuracy"], ls=":", color="k")
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("multiple-choice accuracy (eval)")
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = result_parser("lavin_choice", __doc__, "tiny random models, a few steps: plumbing only", ChoiceConfig)
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the runs' bundles here (default: a temp dir)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="zoo cache (default $VPGTRANS_CACHE or ~/.cache/vpgtrans)")
    args = parser.parse_args(argv)
    cfg = result_config(args, ChoiceConfig, SMOKE)
    unknown = sorted(set(cfg.arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
    logging.getLogger("vpgtrans").setLevel(logging.WARNING)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        if args.smoke:
            from vpgtrans.demo.zoo import build_tiny_models

            zoo = build_tiny_models(work / "zoo", seed=cfg.zoo_seed)
        else:
            from vpgtrans.demo.zoo import build_zoo

            zoo = build_zoo(args.cache_dir, seed=cfg.zoo_seed)
        splits = make_splits(work / "splits", cfg)
        runs = [run_arm(arm, seed, zoo, splits, work / "runs", cfg) for seed in cfg.seeds for arm in cfg.arms]
    result = {"benchmark": "lavin_choice", "smoke": args.smoke, "config": asdict(cfg), "machine": machine_info(),
              "runs": runs, "summary": summarize(runs), "seconds": round(time.perf_counter() - started, 1)}
    path = save_result("lavin_choice", args, result, plot)
    print(json.dumps(result["summary"], indent=2))
    print(f"written to {path}")
    return result


if __name__ == "__main__":
    main()
