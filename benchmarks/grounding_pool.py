"""InfMLLM's claim at small scale: a pool-adapter, which keeps the ViT's patches in their spatial order,
grounds referring expressions better than BLIP-2's Q-Former + projector, which reads the patches through
K learned queries. On the synthetic grounding split (``vpgtrans.demo.grounding_world``: 2-3 objects per
image, the expression names one by attributes only, the answer is its box).

    python -m benchmarks.grounding_pool            # builds/reuses zoo-v2, then 2 arms x 3 seeds
    python -m benchmarks.grounding_pool --smoke    # random-weight tiny zoo, a few steps: plumbing only

Both arms start from the zoo's source BLIP-2 (``source-blip2-opt-s``) and go to the same target
(``llama-s``), through the library (``vpgtrans.stages.inherit`` and ``run_stage``), on the same rows in the
same order per seed, evaluated every ``eval_every`` steps on the same eval rows (accuracy at IoU >= 0.5):

- **pool**: ``--connector infmllm --pool-size pool_size``: ``align`` (pool-adapter) for ``warmup_steps``,
  then ``multitask`` (pool-adapter + ln_vision) for the rest, both at ``lr`` (align constant, multitask
  cosine to lr/2). The LoRA stage is not run: the comparison is of the visual side.
- **qformer**: ``--connector linear``: projector warm-up for ``warmup_steps`` at 5x ``lr``, then VPG +
  projector at ``lr`` cosine to lr/2 (the vpgtrans recipe's shape).

Reported per arm (mean, min, max over seeds): final acc_iou50, mean IoU, unparseable answers, trainable
parameters, seconds, steps to reach ``target_accuracy``; and the centre-box and largest-object baselines
of the eval rows. Budgets and learning rates are fixed in ``GroundingConfig`` before any run.
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

ARMS = ("pool", "qformer")


@dataclass
class GroundingConfig:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    zoo_seed: int = 0
    target: str = "llama-s"
    n_train: int = 3000
    n_eval: int = 150
    pool_size: int = 3  # zoo-v2's ViT: 48 px / patch 8 = a 6x6 grid -> 3x3 = 9 tokens (the Q-Former has 12)
    batch_size: int = 16
    steps: int = 600  # optimizer steps of every arm, warm-up included
    warmup_steps: int = 60
    lr: float = 1e-3
    eval_every: int = 100
    target_accuracy: float = 0.5
    max_new_tokens: int = 24


SMOKE = {"seeds": [0], "n_train": 12, "n_eval": 6, "batch_size": 4, "steps": 2, "warmup_steps": 1, "eval_every": 1,
         "max_new_tokens": 4}


def _stage_config(trainable: list[str], lr: float, min_lr: float | None, steps: int, seed: int, cfg: GroundingConfig):
    from vpgtrans.config import TrainConfig

    return TrainConfig(trainable=trainable, lr=lr, min_lr=min_lr, max_steps=steps, batch_size=cfg.batch_size, seed=seed,
                       eval_every=cfg.eval_every, eval_max_samples=cfg.n_eval, max_new_tokens=cfg.max_new_tokens)


def run_arm(arm: str, seed: int, zoo: dict, splits: dict, work: Path, cfg: GroundingConfig) -> dict:
    """One arm, one seed: inherit, two stages, the combined eval curve and the final scores."""
    from vpgtrans.config import InheritConfig
    from vpgtrans.stages.inherit import inherit
    from vpgtrans.stages.train import run_stage

    out = work / f"{arm}-seed{seed}"
    if arm == "pool":
        inherit_config = InheritConfig(connector="infmllm", seed=seed, visual_options={"pool_size": cfg.pool_size})
        stages = [("align", _stage_config(["pool_adapter"], cfg.lr, None, cfg.warmup_steps, seed, cfg)),
                  ("multitask", _stage_config(["ln_vision", "pool_adapter"], cfg.lr, cfg.lr / 2,
                                              cfg.steps - cfg.warmup_steps, seed, cfg))]
    else:
        inherit_config = InheritConfig(connector="linear", seed=seed)
        stages = [("warmup", _stage_config(["connector"], 5 * cfg.lr, None, cfg.warmup_steps, seed, cfg)),
                  ("finetune", _stage_config(["vpg", "connector"], cfg.lr, cfg.lr / 2, cfg.steps - cfg.warmup_steps,
                                             seed, cfg))]
    started = time.perf_counter()
    bundle = inherit(zoo["source"], zoo[cfg.target], out / "inherit", inherit_config, force=True)
    curve, offset = [], 0
    for name, config in stages:
        bundle = run_stage(bundle, splits["grounding_train"], out / name, config, name,
                           eval_data=splits["grounding_eval"], force=True)
        manifest = json.loads((bundle / "manifest.json").read_text())
        curve += [{"step": p["step"] + offset, "acc_iou50": p["acc_iou50"], "mean_iou": p["mean_iou"]}
                  for p in manifest["curve"] if not (curve and p["step"] == 0)]
        offset += manifest["metrics"]["train"]["steps"]
    final = manifest["metrics"]["eval"]
    reached = next((p["step"] for p in curve if p["acc_iou50"] >= cfg.target_accuracy), None)
    return {"arm": arm, "seed": seed, "curve": curve,
            "final": {k: final[k] for k in ("acc_iou50", "mean_iou", "parsed", "unparseable")},
            "trainable_params": manifest["metrics"]["train"]["trainable"], "steps": offset,
            "seconds": round(time.perf_counter() - started, 1), "steps_to_target": reached}


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
                  **{key: _spread([r["final"][key] for r in rs]) for key in ("acc_iou50", "mean_iou", "unparseable")},
                  "trainable_params": rs[0]["trainable_params"], "seconds": _spread([r["seconds"] for r in rs]),
                  "steps_to_target": _spread([r["steps_to_target"] for r in rs])}
            for arm, rs in by_arm.items()}


def plot(result: dict, path: Path) -> Path:
    from benchmarks.common import require_matplotlib

    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in result["runs"]:
        ax.plot([p["step"] for p in run["curve"]], [p["acc_iou50"] for p in run["curve"]],
                label=f"{run['arm']} s{run['seed']}", color={"pool": "tab:blue", "qformer": "tab:orange"}[run["arm"]])
    for name, style in (("centre_box", ":"), ("largest_object", "--")):
        value = result["baselines"][name]["acc_iou50"]
        if value is not None:
            ax.axhline(value, ls=style, color="k", label=name.replace("_", " "))
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("accuracy at IoU >= 0.5 (eval)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = result_parser("grounding_pool", __doc__, "tiny random models, a few steps: plumbing only", GroundingConfig)
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the runs' bundles here (default: a temp dir)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="zoo cache (default $VPGTRANS_CACHE or ~/.cache/vpgtrans)")
    args = parser.parse_args(argv)
    cfg = result_config(args, GroundingConfig, SMOKE)
    unknown = sorted(set(cfg.arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
    logging.getLogger("vpgtrans").setLevel(logging.WARNING)
    from vpgtrans.data import load_rows
    from vpgtrans.demo.grounding_world import make_grounding_world
    from vpgtrans.grounding import grounding_baselines

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        if args.smoke:
            from vpgtrans.demo.zoo2 import build_tiny_zoo_v2

            zoo = build_tiny_zoo_v2(work / "zoo", seed=cfg.zoo_seed)
        else:
            from vpgtrans.demo.zoo2 import build_zoo_v2

            zoo = build_zoo_v2(args.cache_dir, seed=cfg.zoo_seed, log=print)
        splits = make_grounding_world(work / "splits", cfg.n_train, cfg.n_eval, seed=cfg.zoo_seed)
        baselines = grounding_baselines(list(load_rows(splits["grounding_eval"])[0]))
        runs = [run_arm(arm, seed, zoo, splits, work / "runs", cfg) for seed in cfg.seeds for arm in cfg.arms]
    result = {"benchmark": "grounding_pool", "smoke": args.smoke, "config": asdict(cfg), "machine": machine_info(),
              "baselines": baselines, "runs": runs, "summary": summarize(runs),
              "seconds": round(time.perf_counter() - started, 1)}
    path = save_result("grounding_pool", args, result, plot)
    print(json.dumps({"baselines": baselines, "summary": result["summary"]}, indent=2))
    print(f"written to {path}")
    return result


if __name__ == "__main__":
    main()
