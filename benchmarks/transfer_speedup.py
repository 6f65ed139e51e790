"""The paper's speed-up table at small scale: train-from-scratch vs VPGTrans on the benchmark zoo (zoo-v2).

    python -m benchmarks.transfer_speedup            # builds/reuses zoo-v2, then every arm (see docs/benchmarks.md)
    python -m benchmarks.transfer_speedup --smoke    # random-weight tiny zoo, a few steps: plumbing only

For each target LLM — ``opt-l`` (same family and tokenizer as the source's opt-s) and ``llama-s`` (another
family and tokenizer) — and each seed, two arms run through the toolkit's own library API
(``vpgtrans.stages.transfer.transfer``), on the same caption training split, in the same data order,
with the same frozen ViT and the same evaluation (caption CIDEr on the eval split every few steps):

- **scratch**: a freshly initialised VPG + projector on the target, trained with the normal recipe
  (``--from-scratch``), ``scratch_steps`` optimizer steps, lr ``lr`` cosine to lr/2;
- **vpgtrans**: inherit the source VPG, converter-initialised projector, warm-up of the projector alone at
  5x lr (``warmup_steps``, constant), then fine-tune VPG + projector (``finetune_steps``, lr cosine to lr/2).

Ablations (seed ``ablation_seed``): no converter init (``converter="none"``: fresh projector), no warm-up
(fine-tune right after inherit), warm-up at 1x lr. Final scores of every arm: caption CIDEr and zero-shot
VQA accuracy (all arms train on captions only, as BLIP-2 pre-training does) on the eval splits.

Speed-up = steps for scratch to reach its best / steps for VPGTrans to exceed it (warm-up counted);
also to 95% / 100% of scratch's best on smoothed curves (``benchmarks.curves``). Nothing is tuned on the
eval split: the budgets and learning rates are fixed in ``SpeedupConfig`` before any run.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks import curves
from benchmarks.common import (machine_info, quiet_libraries, require_matplotlib, result_config,
                               result_parser, save_result)

ARMS = ("scratch", "vpgtrans")
ABLATIONS = ("no-converter", "no-warmup", "warmup-1x")
METRIC = "cider"


@dataclass
class SpeedupConfig:
    targets: list[str] = field(default_factory=lambda: ["opt-l", "llama-s"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    ablations: list[str] = field(default_factory=lambda: list(ABLATIONS))
    ablation_seed: int = 0
    zoo_seed: int = 0
    batch_size: int = 32
    lr: float = 1e-3  # the normal lr of both arms (BLIP-2's 1e-4 is for a 100M-parameter Q-Former at batch 2k)
    warmup_lr_multiplier: float = 5.0
    scratch_steps: int = 800
    warmup_steps: int = 20  # 640 samples: a tenth of an epoch of the 6000-row caption split
    finetune_steps: int = 180
    scratch_eval_every: int = 50
    vpgtrans_eval_every: int = 20
    eval_samples: int = 64  # caption-eval images per curve point
    final_eval_samples: int = 200  # caption and VQA eval rows for the final scores
    smooth_window: int = 3
    max_new_tokens: int = 40  # a three-object caption is ~30 tokens
    threads: int = 1  # on a shared 2-core machine, two threads make these small matmuls several times slower


SMOKE = dict(targets=["opt-l", "llama-s"], seeds=[0], batch_size=4, scratch_steps=4, warmup_steps=2,
             finetune_steps=2, scratch_eval_every=2, vpgtrans_eval_every=2, eval_samples=4, final_eval_samples=4, max_new_tokens=3)


# -------------------------------------------------------------------------------------------- one arm

def _train_configs(cfg: SpeedupConfig, arm: str, seed: int):
    """(warmup_config or None, finetune_config, inherit_config, skip_warmup) of one arm."""
    from vpgtrans.config import InheritConfig, TrainConfig

    common = dict(batch_size=cfg.batch_size, seed=seed, eval_max_samples=cfg.eval_samples,
                  max_new_tokens=cfg.max_new_tokens)
    if arm == "scratch":
        return None, TrainConfig.finetune(lr=cfg.lr, min_lr=cfg.lr / 2, max_steps=cfg.scratch_steps,
                                          eval_every=cfg.scratch_eval_every, **common), InheritConfig(), False
    multiplier = 1.0 if arm == "warmup-1x" else cfg.warmup_lr_multiplier
    warmup = TrainConfig.warmup(lr=cfg.lr * multiplier, max_steps=cfg.warmup_steps,
                                eval_every=cfg.vpgtrans_eval_every, **common)
    finetune = TrainConfig.finetune(lr=cfg.lr, min_lr=cfg.lr / 2, max_steps=cfg.finetune_steps,
                                    eval_every=cfg.vpgtrans_eval_every, **common)
    inherit = InheritConfig(converter="none" if arm == "no-converter" else "shared-tokens")
    return warmup, finetune, inherit, arm == "no-warmup"


def run_arm(cfg: SpeedupConfig, zoo: dict, target: str, arm: str, seed: int, out_dir: Path) -> dict:
    """Train one arm through ``vpgtrans.stages.transfer.transfer`` and score its final bundle."""
    from vpgtrans.evaluate import evaluate
    from vpgtrans.stages.transfer import transfer

    world = Path(zoo["world"])
    warmup, finetune, inherit, skip_warmup = _train_configs(cfg, arm, seed)
    started = time.perf_counter()
    summary = transfer(zoo["source"], zoo[target], world / "caption_train", out_dir, warmup_config=warmup,
                       finetune_config=finetune, inherit_config=inherit, from_scratch=arm == "scratch",
                       skip_warmup=skip_warmup, eval_data=world / "caption_eval", force=True)
    train_seconds = time.perf_counter() - started
    final = Path(summary["final_bundle"])
    caption = evaluate(final, world / "caption_eval", max_samples=cfg.final_eval_samples, batch_size=50,
                       max_new_tokens=cfg.max_new_tokens)["scores"]
    vqa = evaluate(final, world / "vqa_eval", max_samples=cfg.final_eval_samples, batch_size=50,
                   max_new_tokens=min(8, cfg.max_new_tokens))["scores"]
    curve = [{"step": p["step"], "samples": p["samples"], "stage": p["stage"], METRIC: p[METRIC]}
             for p in summary["curve"]]
    converter = summary["metrics"]["inherit"].get("converter", {})
    return {"target": target, "arm": arm, "seed": seed, "curve": curve,
            "steps": curve[-1]["step"], "final": {"caption": caption, "vqa": vqa},
            "converter_heldout_cosine": converter.get("heldout_cosine"),
            "lr": {"warmup": None if warmup is None or skip_warmup else warmup.lr, "finetune": finetune.lr},
            "train_seconds": round(train_seconds, 1), "seconds": round(time.perf_counter() - started, 1)}


# --------------------------------------------------------------------------------------------- summary

def _points(run: dict) -> curves.Curve:
    return [(p["step"], p[METRIC]) for p in run["curve"]]


def compare(scratch: dict, other: dict, cfg: SpeedupConfig) -> dict:
    """The speed-up measures of ``other`` against ``scratch`` (same target, same seed)."""
    s, v = _points(scratch), _points(other)
    paper = curves.speedup(s, v)
    samples_per_step = cfg.batch_size
    fraction = None if paper["vpgtrans_steps"] is None else \
        paper["vpgtrans_steps"] * samples_per_step / max(paper["scratch_steps"] * samples_per_step, 1)
    return {"speedup": paper["speedup"], "scratch_best": paper["scratch_best"], "scratch_steps": paper["scratch_steps"],
            "vpgtrans_steps": paper["vpgtrans_steps"], "data_fraction": fraction,
            "at_95": curves.threshold_speedup(s, v, 0.95, cfg.smooth_window),
            "at_100": curves.threshold_speedup(s, v, 1.0, cfg.smooth_window)}


def _spread(values: list[float | None]) -> dict:
    """mean, std (sample), min, max of the defined values; ``missing`` counts the undefined ones."""
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0, "missing": len(values)}
    return {"mean": statistics.fmean(present), "std": statistics.stdev(present) if len(present) > 1 else 0.0,
            "min": min(present), "max": max(present), "n": len(present), "missing": len(values) - len(present)}


def summarize(runs: list[dict], cfg: SpeedupConfig) -> dict:
    """Per target: the headline (scratch vs vpgtrans over seeds) and the ablation rows."""
    by_key = {(r["target"], r["arm"], r["seed"]): r for r in runs}
    summary = {}
    for target in cfg.targets:
        rows = []
        for arm in ("vpgtrans", *cfg.ablations):
            seeds = cfg.seeds if arm == "vpgtrans" else [cfg.ablation_seed]
            comparisons = []
            for seed in seeds:
                if (target, arm, seed) in by_key and (target, "scratch", seed) in by_key:
                    comparisons.append({"seed": seed, **compare(by_key[(target, "scratch", seed)],
                                                               by_key[(target, arm, seed)], cfg)})
            if not comparisons:
                continue
            finals = [by_key[(target, arm, c["seed"])]["final"] for c in comparisons]
            rows.append({
                "arm": arm, "seeds": [c["seed"] for c in comparisons], "per_seed": comparisons,
                "speedup": _spread([c["speedup"] for c in comparisons]),
                "speedup_95": _spread([c["at_95"]["speedup"] for c in comparisons]),
                "speedup_100": _spread([c["at_100"]["speedup"] for c in comparisons]),
                "vpgtrans_steps": _spread([c["vpgtrans_steps"] for c in comparisons]),
                "data_fraction": _spread([c["data_fraction"] for c in comparisons]),
                "final_cider": _spread([f["caption"]["cider"] for f in finals]),
                "final_vqa": _spread([f["vqa"]["vqa_accuracy"] for f in finals]),
            })
        scratch = [by_key[(target, "scratch", s)] for s in cfg.seeds if (target, "scratch", s) in by_key]
        summary[target] = {
            "scratch": {"seeds": [r["seed"] for r in scratch],
                        "best_cider": _spread([curves.best(_points(r)) for r in scratch]),
                        "steps_to_best": _spread([curves.steps_to_best(_points(r)) for r in scratch]),
                        "final_cider": _spread([r["final"]["caption"]["cider"] for r in scratch]),
                        "final_vqa": _spread([r["final"]["vqa"]["vqa_accuracy"] for r in scratch])},
            "rows": rows,
        }
    return summary


# ----------------------------------------------------------------------------------------------- output

def _fmt(spread: dict, digits: int = 2, suffix: str = "") -> str:
    if spread["mean"] is None:
        return "never"
    text = f"{spread['mean']:.{digits}f}{suffix}"
    if spread["n"] > 1:
        text += f" ± {spread['std']:.{digits}f} [{spread['min']:.{digits}f}, {spread['max']:.{digits}f}]"
    if spread["missing"]:
        text += f" ({spread['missing']} never)"
    return text


def render(result: dict):
    from rich.console import Group
    from rich.table import Table

    tables = []
    for target, block in result["summary"].items():
        scratch = block["scratch"]
        table = Table(title=f"{result['source']} -> {target}: speed-up over train-from-scratch "
                            f"(caption CIDEr on eval; mean ± std [min, max] over seeds)")
        for column in ("arm", "seeds", "speed-up (best)", "to 95%", "to 100%", "VPGTrans steps", "data fraction",
                       "final CIDEr", "final VQA acc"):
            table.add_column(column, justify="left" if column == "arm" else "right")
        table.add_row("scratch", ",".join(map(str, scratch["seeds"])), "1.00x", "", "",
                      f"best at {_fmt(scratch['steps_to_best'], 0)}", "100%",
                      _fmt(scratch["final_cider"], 3), _fmt(scratch["final_vqa"], 3))
        for row in block["rows"]:
            table.add_row(row["arm"], ",".join(map(str, row["seeds"])), _fmt(row["speedup"], 1, "x"),
                          _fmt(row["speedup_95"], 1, "x"), _fmt(row["speedup_100"], 1, "x"),
                          _fmt(row["vpgtrans_steps"], 0), _fmt(row["data_fraction"], 3),
                          _fmt(row["final_cider"], 3), _fmt(row["final_vqa"], 3))
        tables.append(table)
    return Group(*tables)


def plot(result: dict, path: Path) -> Path:
    plt = require_matplotlib()
    targets = list(result["summary"])
    fig, axes = plt.subplots(1, len(targets), figsize=(6.5 * len(targets), 4.5), squeeze=False)
    colours = {"scratch": "tab:grey", "vpgtrans": "tab:red", "no-converter": "tab:blue", "no-warmup": "tab:green",
               "warmup-1x": "tab:orange"}
    for ax, target in zip(axes[0], targets):
        labelled = set()
        for run in result["runs"]:
            if run["target"] != target:
                continue
            steps, scores = zip(*_points(run))
            headline = run["arm"] in ARMS
            ax.plot(steps, scores, color=colours.get(run["arm"], "black"), alpha=0.85 if headline else 0.7,
                    linestyle="-" if headline else "--", linewidth=1.6 if headline else 1.2,
                    label=None if run["arm"] in labelled else run["arm"])
            labelled.add(run["arm"])
        for block in result["summary"][target]["rows"][:1]:
            best = result["summary"][target]["scratch"]["best_cider"]["mean"]
            if best is not None:
                ax.axhline(best, color="tab:grey", linewidth=0.8, linestyle=":", label="scratch best (mean)")
        ax.set_xscale("symlog", linthresh=100)
        ax.set_xlabel("optimizer steps (VPGTrans: warm-up included; symlog axis)")
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

def run(cfg: SpeedupConfig, zoo: dict, work_dir: Path, log=print) -> dict:
    """Every arm of every target and seed (scratch first), then the summary."""
    import json

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    plan = [(t, "scratch", s) for t in cfg.targets for s in cfg.seeds] + \
           [(t, "vpgtrans", s) for t in cfg.targets for s in cfg.seeds] + \
           [(t, a, cfg.ablation_seed) for t in cfg.targets for a in cfg.ablations]
    runs = []
    try:
        for i, (target, arm, seed) in enumerate(plan, 1):
            run_ = run_arm(cfg, zoo, target, arm, seed, work_dir / f"{target}-{arm}-seed{seed}")
            runs.append(run_)
            log(f"[{i}/{len(plan)}] {target} {arm} seed {seed}: best CIDEr {curves.best(_points(run_)):.3f}, "
                f"final CIDEr {run_['final']['caption']['cider']:.3f}, VQA {run_['final']['vqa']['vqa_accuracy']:.3f} "
                f"({run_['seconds']:.0f}s)")
    finally:
        torch.set_num_threads(threads)
    zoo_record = json.loads((Path(zoo["root"]) / "zoo.json").read_text())
    return {"benchmark": "transfer_speedup", "config": asdict(cfg), "machine": machine_info(),
            "source": "opt-s", "zoo": {"root": str(zoo["root"]), "version": zoo_record["zoo_version"],
                                        "seed": zoo_record["seed"], "trained": zoo_record["trained"],
                                        "metrics": zoo_record["metrics"], "build_seconds": zoo_record.get("build_seconds")},
            "runs": runs, "summary": summarize(runs, cfg), "seconds": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = result_parser("transfer_speedup", __doc__, "random-weight tiny zoo and a few steps (plumbing only)",
                           SpeedupConfig)
    parser.add_argument("--work-dir", type=Path, default=None, help="where the arms' bundles go (default: a temp dir)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="zoo cache (default $VPGTRANS_CACHE or ~/.cache/vpgtrans)")
    args = parser.parse_args(argv)
    cfg = result_config(args, SpeedupConfig, SMOKE)
    unknown = sorted(set(cfg.ablations) - set(ABLATIONS))
    if unknown:
        parser.error(f"unknown ablations {unknown}; known: {list(ABLATIONS)}")
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="vpgtrans-speedup-") as tmp:
        if args.smoke:
            from vpgtrans.demo.zoo2 import build_tiny_zoo_v2

            zoo = build_tiny_zoo_v2(Path(tmp) / "zoo", seed=cfg.zoo_seed)
        else:
            from vpgtrans.demo.zoo2 import build_zoo_v2

            zoo_started = time.perf_counter()
            zoo = build_zoo_v2(args.cache_dir, seed=cfg.zoo_seed, log=print)
            print(f"zoo-v2 ready in {time.perf_counter() - zoo_started:.0f}s: {zoo['root']}")
        result = run(cfg, zoo, args.work_dir or Path(tmp) / "runs")
    out = save_result("transfer_speedup", args, result, plot)
    from rich.console import Console

    Console(width=170).print(render(result))
    print(f"results: {out} ({result['seconds']:.0f}s for the arms)")
    return result


if __name__ == "__main__":
    main()
