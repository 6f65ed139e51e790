"""The word converter as the projector's initialisation when the tokenizers share few tokens: GW vs a
shared-token fit on few pairs vs no converter (and the shared-token fit on every pair, for reference).

    python -m benchmarks.converter_init            # zoo-v2 (built once, cached), 3 seeds
    python -m benchmarks.converter_init --smoke    # random-weight tiny zoo, a few steps: plumbing only

zoo-v2's source (OPT tokenizer) and its targets (opt-l: the same tokenizer; llama-s: a SentencePiece-style
one) share most tokens, so "few shared tokens" is simulated: the ``shared-few`` arm keeps ``few_pairs``
random pairs of the shared-token pairing (``vpgtrans.converter.pair_tokens``, subsampled in this process
only). Arms, all with the vpgtrans recipe (projector warm-up -> VPG + projector) and the same budgets:

    shared-all   --converter shared-tokens (every shared token)
    shared-few   --converter shared-tokens on ``few_pairs`` pairs
    gw           --converter gw (no pair used; ``gw_anchors`` anchors, the first ids: no corpus)
    none         --converter none (the projector starts fresh)

Reported: every arm's converter scored the same way, on all the true shared-token pairs (mean cosine of
converted vs true target embeddings, and retrieval accuracy among those pairs; in-sample for the shared
arms, which fitted on some of them), the CIDEr of the merged projector before training (step 0), CIDEr
against steps and the final CIDEr, over seeds.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks.common import (add_zoo_options, machine_info, plot_curves_by_target, quiet_libraries,
                               result_config, result_parser, save_result, zoo_v2)

METRIC = "cider"
ARMS = ("shared-all", "shared-few", "gw", "none")


@dataclass
class InitBenchConfig:
    targets: list[str] = field(default_factory=lambda: ["llama-s"])
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    zoo_seed: int = 0
    few_pairs: int = 30
    gw_anchors: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_lr_multiplier: float = 5.0
    warmup_steps: int = 20
    finetune_steps: int = 180
    eval_every: int = 20
    eval_samples: int = 64
    max_new_tokens: int = 40
    threads: int = 1


SMOKE = dict(seeds=[0], few_pairs=10, gw_anchors=48, batch_size=4, warmup_steps=2, finetune_steps=2, eval_every=2,
             eval_samples=4, max_new_tokens=3)


def _few_pairs(k: int, seed: int):
    """A ``pair_tokens`` that keeps ``k`` random pairs of the real pairing."""
    from vpgtrans import converter

    real = converter.pair_tokens

    def pair_tokens(*args, **kwargs):
        pairs = real(*args, **kwargs)
        keep = torch.randperm(len(pairs.target_ids), generator=torch.Generator().manual_seed(seed))[:k].sort().values
        return converter.TokenPairs(pairs.source_ids[keep], pairs.target_ids[keep], pairs.weights[keep],
                                    min(pairs.exact, k), 0, 0)

    return pair_tokens


def converter_scores(zoo: dict, target: str, bundle: Path) -> dict | None:
    """The bundle's converter on every true shared-token pair of the source LLM and ``target`` (None: no
    converter): what ``vpgtrans inherit`` reads, scored with ``vpgtrans.converter_gw.measure``."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    from vpgtrans.converter import pair_tokens
    from vpgtrans.converter_gw import measure
    from vpgtrans.formats.hf import read_input_embeddings
    from vpgtrans.sources import read_source

    if not (bundle / "converter.safetensors").is_file():
        return None
    source = read_source(Path(zoo["source"]), None, None)
    source_llm = Path(source.source_llm["path"])
    source_embeddings = read_input_embeddings(source_llm, AutoConfig.for_model(**source.source_llm["text_config"]),
                                              source.source_llm["prefix"])
    target_embeddings = read_input_embeddings(Path(zoo[target]), AutoConfig.from_pretrained(zoo[target]))
    pairs = pair_tokens(AutoTokenizer.from_pretrained(source_llm), AutoTokenizer.from_pretrained(zoo[target]))
    converter = load_file(str(bundle / "converter.safetensors"))
    return measure(converter["weight"], converter["bias"], source_embeddings, target_embeddings, pairs,
                   max_pairs=len(pairs.target_ids))


def run_arm(cfg: InitBenchConfig, zoo: dict, target: str, arm: str, seed: int, out_dir: Path) -> dict:
    from vpgtrans.config import InheritConfig
    from vpgtrans.recipes import stage
    from vpgtrans.stages import inherit as inherit_module
    from vpgtrans.stages.transfer import transfer

    world = Path(zoo["world"])
    common = dict(batch_size=cfg.batch_size, seed=seed, eval_max_samples=cfg.eval_samples,
                  max_new_tokens=cfg.max_new_tokens, eval_every=cfg.eval_every)
    warmup = stage("vpgtrans", "warmup").config(lr=cfg.lr * cfg.warmup_lr_multiplier, max_steps=cfg.warmup_steps,
                                                **common)
    finetune = stage("vpgtrans", "finetune").config(lr=cfg.lr, min_lr=cfg.lr / 2, max_steps=cfg.finetune_steps,
                                                    **common)
    converter = {"shared-all": "shared-tokens", "shared-few": "shared-tokens", "gw": "gw", "none": "none"}[arm]
    real = inherit_module.pair_tokens
    if arm == "shared-few":
        inherit_module.pair_tokens = _few_pairs(cfg.few_pairs, seed)
    started = time.perf_counter()
    try:
        summary = transfer(zoo["source"], zoo[target], world / "caption_train", out_dir, warmup_config=warmup,
                           finetune_config=finetune,
                           inherit_config=InheritConfig(converter=converter, gw_anchors=cfg.gw_anchors),
                           eval_data=world / "caption_eval", force=True)
    finally:
        inherit_module.pair_tokens = real
    stats = summary["metrics"]["inherit"].get("converter", {})
    scores = converter_scores(zoo, target, Path(summary["stages"]["inherit"])) or {}
    curve = [{"step": p["step"], "stage": p["stage"], METRIC: p[METRIC]} for p in summary["curve"]]
    return {"target": target, "arm": arm, "seed": seed, "curve": curve, "start": curve[0][METRIC],
            "final": curve[-1][METRIC], "best": max(p[METRIC] for p in curve),
            "converter": {"method": stats.get("method"), "pairs": stats.get("pairs"), "seconds": stats.get("seconds"),
                          "cosine": scores.get("heldout_cosine"),
                          "retrieval_accuracy": scores.get("retrieval_accuracy"),
                          "scored_pairs": scores.get("heldout_pairs")},
            "train_seconds": round(time.perf_counter() - started, 1)}


def _mean_std(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for target in dict.fromkeys(r["target"] for r in runs):
        for arm in dict.fromkeys(r["arm"] for r in runs):
            mine = [r for r in runs if r["target"] == target and r["arm"] == arm]
            if mine:
                rows.append({"target": target, "arm": arm, **{key: _mean_std([r[key] for r in mine])
                                                             for key in ("start", "final", "best")},
                             "cosine": _mean_std([r["converter"]["cosine"] for r in mine]),
                             "retrieval_accuracy": _mean_std([r["converter"]["retrieval_accuracy"] for r in mine])})
    return rows


def run(cfg: InitBenchConfig, zoo: dict, work_dir: Path, log=print) -> dict:
    unknown = sorted(set(cfg.arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; known: {list(ARMS)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    try:
        runs = []
        for target in cfg.targets:
            for arm in cfg.arms:
                for seed in cfg.seeds:
                    log(f"converter init bench: {target} {arm} seed {seed}")
                    runs.append(run_arm(cfg, zoo, target, arm, seed, work_dir / f"{target}-{arm}-seed{seed}"))
    finally:
        torch.set_num_threads(threads)
    return {"benchmark": "converter_init", "config": asdict(cfg),
            "machine": {**machine_info(), "torch_threads": cfg.threads}, "runs": runs, "summary": summarize(runs),
            "seconds": round(time.perf_counter() - started, 1)}


def _fmt(value: dict | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"


def render(result: dict):
    from rich.table import Table

    table = Table(title=f"projector init through the word converter: {METRIC} (mean ± std over seeds)")
    for column in ("target", "arm", "converter cosine", "converter retrieval", f"{METRIC} at step 0",
                   f"final {METRIC}", f"best {METRIC}"):
        table.add_column(column, justify="left" if column in ("target", "arm") else "right")
    for row in result["summary"]:
        table.add_row(row["target"], row["arm"], _fmt(row["cosine"]), _fmt(row["retrieval_accuracy"]),
                      _fmt(row["start"]), _fmt(row["final"]), _fmt(row["best"]))
    return table


def plot(result: dict, path: Path) -> Path:
    return plot_curves_by_target(result, path, METRIC)


def main(argv: list[str] | None = None) -> dict:
    parser = result_parser("converter_init", __doc__, "random-weight tiny zoo, a few steps (plumbing only)",
                           InitBenchConfig)
    add_zoo_options(parser)
    args = parser.parse_args(argv)
    cfg = result_config(args, InitBenchConfig, SMOKE)
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="vpgtrans-converter-init-") as tmp:
        zoo = zoo_v2(args, cfg.zoo_seed, Path(tmp))
        result = run(cfg, zoo, args.work_dir or Path(tmp) / "runs")
    out = save_result("converter_init", args, result, plot)
    from rich.console import Console

    Console(width=170).print(render(result))
    print(f"results: {out} ({result['seconds']:.0f}s)")
    return result


if __name__ == "__main__":
    main()
