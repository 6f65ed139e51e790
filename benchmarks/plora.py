"""plora on a dense and an MoE tiny target: caption score against steps next to a projector-only transfer
(``linear``) and a transfer that also trains LoRA on every token (``lora-all``, peft), and each final LLM's
text perplexity on held-out text next to the untouched LLM's (plora's must be identical).

    python -m benchmarks.plora            # zoo-v2 (built once, cached) + a pre-trained tiny Mixtral, 3 seeds
    python -m benchmarks.plora --smoke    # random-weight tiny zoo and MoE, a few steps: plumbing only

Targets: ``llama-s`` from zoo-v2 and ``moe-s``, a Mixtral of llama-s's width and tokenizer (4 experts, top-2,
per-expert FFN of half llama-s's), pre-trained on the same text as the zoo's LLMs with the same recipe and
cached beside the zoo. Arms, all from the zoo's source BLIP-2 with the shared-token converter:

    linear    projector warm-up -> VPG + projector                      (the vpgtrans recipe)
    plora     projector warm-up -> VPG + projector + visual-token LoRA  (the plora recipe)
    lora-all  projector warm-up -> VPG + projector + LoRA on every token (peft; attention only on MoE
              targets: peft has no layer for fused experts)

Every arm uses the same budgets, lr and batches (the finetune lr is ``lr``, cosine to half, as in
benchmarks/transfer_speedup.py). Text perplexity: the world's held-out LM text (scene attributes, BOS,
caption or question/answer), loss on the text after BOS, the model's text-only path.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks.common import (add_zoo_options, machine_info, plot_curves_by_target, quiet_libraries,
                               result_config, result_parser, save_result, zoo_v2)

METRIC = "cider"
ARMS = ("linear", "plora", "lora-all")


@dataclass
class PloraBenchConfig:
    targets: list[str] = field(default_factory=lambda: ["llama-s", "moe-s"])
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    zoo_seed: int = 0
    batch_size: int = 32
    lr: float = 1e-3
    warmup_lr_multiplier: float = 5.0
    warmup_steps: int = 20
    finetune_steps: int = 180
    eval_every: int = 20
    eval_samples: int = 64
    lora_rank: int = 8
    lora_alpha: float = 16.0
    text_samples: int = 200
    moe_experts: int = 4
    moe_top_k: int = 2
    moe_steps: int = 700  # llama-s's pre-training steps
    max_new_tokens: int = 40
    threads: int = 1


SMOKE = dict(seeds=[0], batch_size=4, warmup_steps=2, finetune_steps=2, eval_every=2, eval_samples=4,
             text_samples=8, moe_steps=0, max_new_tokens=3)


def _register_lora_all() -> None:
    """The ``lora-all`` arm as a connector + recipe of this benchmark only (the registries are plain dicts)."""
    from vpgtrans.model.connectors import CONNECTORS, Connector
    from vpgtrans.recipes import RECIPES, Stage

    RECIPES["bench-lora-all"] = [Stage("warmup", {"trainable": ["connector"], "lr": 5e-4, "min_lr": None}),
                                 Stage("finetune", {"trainable": ["vpg", "connector", "lora"], "lr": 1e-4,
                                                    "min_lr": 5e-5}, data="finetune_data")]
    for targets in (("attention", "mlp"), ("attention",)):
        CONNECTORS[f"bench-lora-all-{'-'.join(targets)}"] = Connector(
            "qformer", ({"type": "lora", "rank": 8, "alpha": 16, "dropout": 0.05, "targets": list(targets)},),
            recipe="bench-lora-all")


def build_moe(zoo: dict, out_dir: Path, cfg: PloraBenchConfig, seed: int) -> tuple[Path, dict]:
    """``moe-s``: a Mixtral with llama-s's width, depth, heads and tokenizer; pre-trained like the zoo's LLMs
    when ``cfg.moe_steps`` > 0 (reused when ``out_dir`` holds one)."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, MixtralConfig

    from vpgtrans.demo import pretrain, world2
    from vpgtrans.demo.zoo2 import LM_PAIRS

    record = out_dir / "moe.json"
    if record.is_file() and json.loads(record.read_text()).get("steps") == cfg.moe_steps:
        return out_dir, json.loads(record.read_text())
    dense = AutoConfig.from_pretrained(zoo["llama-s"])
    tokenizer = AutoTokenizer.from_pretrained(zoo["llama-s"])
    config = MixtralConfig(vocab_size=dense.vocab_size, hidden_size=dense.hidden_size,
                           intermediate_size=dense.intermediate_size // 2, num_hidden_layers=dense.num_hidden_layers,
                           num_attention_heads=dense.num_attention_heads, num_key_value_heads=dense.num_key_value_heads,
                           max_position_embeddings=dense.max_position_embeddings, num_local_experts=cfg.moe_experts,
                           num_experts_per_tok=cfg.moe_top_k, tie_word_embeddings=False,
                           bos_token_id=dense.bos_token_id, eos_token_id=dense.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    metrics = {"steps": cfg.moe_steps, "params": sum(p.numel() for p in model.parameters())}
    if cfg.moe_steps:
        started = time.perf_counter()
        loss = pretrain.pretrain_lm(model, tokenizer, world2.text_pairs(LM_PAIRS, seed), cfg.moe_steps, lr=5e-3,
                                    seed=seed)
        metrics.update(final_loss=round(loss, 4), seconds=round(time.perf_counter() - started, 1),
                       copy_accuracy=round(pretrain.lm_copy_accuracy(model, tokenizer,
                                                                     world2.text_pairs(200, 10_000 + seed)), 4))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    record.write_text(json.dumps(metrics, indent=2) + "\n")
    return out_dir, metrics


def text_perplexity(model, tokenizer, pairs) -> float:
    """exp(mean NLL) over the text tokens of ``pairs`` (text-only calls, one sample at a time)."""
    from vpgtrans.demo.pretrain import lm_examples

    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in lm_examples(tokenizer, pairs):
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            target = torch.tensor(labels[1:])
            keep = target != -100
            total += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            count += int(keep.sum())
    return math.exp(total / count)


def run_arm(cfg: PloraBenchConfig, zoo: dict, target: str, arm: str, seed: int, out_dir: Path, text) -> dict:
    from transformers import AutoModelForCausalLM

    from vpgtrans import load_model
    from vpgtrans.config import InheritConfig
    from vpgtrans.stages.transfer import transfer

    world = Path(zoo["world"])
    common = dict(batch_size=cfg.batch_size, seed=seed, eval_max_samples=cfg.eval_samples,
                  max_new_tokens=cfg.max_new_tokens, eval_every=cfg.eval_every)
    connector = {"linear": "linear", "plora": "plora",
                 "lora-all": "bench-lora-all-attention" if target == "moe-s" else "bench-lora-all-attention-mlp"}[arm]
    adapter = {"plora": {"plora": {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha}},
               "lora-all": {"lora": {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha}}}.get(arm, {})
    recipe = {"linear": "vpgtrans", "plora": "plora", "lora-all": "bench-lora-all"}[arm]
    from vpgtrans.recipes import stage

    warmup = stage(recipe, "warmup").config(lr=cfg.lr * cfg.warmup_lr_multiplier, max_steps=cfg.warmup_steps, **common)
    finetune = stage(recipe, "finetune").config(lr=cfg.lr, min_lr=cfg.lr / 2, max_steps=cfg.finetune_steps, **common)
    started = time.perf_counter()
    summary = transfer(zoo["source"], zoo[target], world / "caption_train", out_dir, warmup_config=warmup,
                       finetune_config=finetune,
                       inherit_config=InheritConfig(connector=connector, adapter_options=adapter),
                       eval_data=world / "caption_eval", force=True)
    seconds = time.perf_counter() - started
    model = load_model(summary["final_bundle"], device="cpu")
    base = AutoModelForCausalLM.from_pretrained(zoo[target]).eval()
    perplexity = {"base": text_perplexity(base, model.tokenizer, text),
                  "final": text_perplexity(model, model.tokenizer, text)}
    curve = [{"step": p["step"], "stage": p["stage"], METRIC: p[METRIC]} for p in summary["curve"]]
    return {"target": target, "arm": arm, "seed": seed, "curve": curve, "final": curve[-1][METRIC],
            "best": max(p[METRIC] for p in curve), "text_perplexity": perplexity,
            "text_unchanged": perplexity["base"] == perplexity["final"],
            "llm_trainable": summary["metrics"]["finetune"]["train"].get("llm_trainable"),
            "train_seconds": round(seconds, 1)}


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for target in dict.fromkeys(r["target"] for r in runs):
        for arm in dict.fromkeys(r["arm"] for r in runs):
            mine = [r for r in runs if r["target"] == target and r["arm"] == arm]
            if mine:
                rows.append({"target": target, "arm": arm, "final": _mean_std([r["final"] for r in mine]),
                             "best": _mean_std([r["best"] for r in mine]),
                             "perplexity_base": mine[0]["text_perplexity"]["base"],
                             "perplexity_final": _mean_std([r["text_perplexity"]["final"] for r in mine]),
                             "text_unchanged": all(r["text_unchanged"] for r in mine),
                             "llm_trainable": mine[0]["llm_trainable"]})
    return rows


def run(cfg: PloraBenchConfig, zoo: dict, moe_dir: Path, work_dir: Path, log=print) -> dict:
    from vpgtrans.demo import world2

    unknown = sorted(set(cfg.arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; known: {list(ARMS)}")
    _register_lora_all()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    try:
        zoo = dict(zoo)
        moe_metrics = None
        if "moe-s" in cfg.targets:
            zoo["moe-s"], moe_metrics = build_moe(zoo, moe_dir, cfg, seed=cfg.zoo_seed * 1000 + 7)
        text = world2.text_pairs(cfg.text_samples, 20_000 + cfg.zoo_seed)
        runs = []
        for target in cfg.targets:
            for arm in cfg.arms:
                for seed in cfg.seeds:
                    log(f"plora bench: {target} {arm} seed {seed}")
                    runs.append(run_arm(cfg, zoo, target, arm, seed, work_dir / f"{target}-{arm}-seed{seed}", text))
    finally:
        torch.set_num_threads(threads)
    return {"benchmark": "plora", "config": asdict(cfg), "machine": {**machine_info(), "torch_threads": cfg.threads},
            "moe": moe_metrics, "runs": runs, "summary": summarize(runs),
            "seconds": round(time.perf_counter() - started, 1)}


def render(result: dict):
    from rich.table import Table

    table = Table(title=f"plora vs linear vs lora-all: {METRIC} (mean ± std over seeds) and text perplexity")
    for column in ("target", "arm", f"final {METRIC}", f"best {METRIC}", "text ppl base", "text ppl final",
                   "text path exact", "LLM params trained"):
        table.add_column(column, justify="left" if column in ("target", "arm") else "right")
    for row in result["summary"]:
        table.add_row(row["target"], row["arm"], f"{row['final']['mean']:.3f} ± {row['final']['std']:.3f}",
                      f"{row['best']['mean']:.3f} ± {row['best']['std']:.3f}", f"{row['perplexity_base']:.3f}",
                      f"{row['perplexity_final']['mean']:.3f}", "yes" if row["text_unchanged"] else "no",
                      f"{row['llm_trainable'] or 0:,}")
    return table


def plot(result: dict, path: Path) -> Path:
    return plot_curves_by_target(result, path, METRIC, colors={"linear": "C0", "plora": "C1", "lora-all": "C2"})


def main(argv: list[str] | None = None) -> dict:
    parser = result_parser("plora", __doc__, "random-weight tiny zoo and MoE, a few steps (plumbing only)",
                           PloraBenchConfig)
    add_zoo_options(parser)
    args = parser.parse_args(argv)
    cfg = result_config(args, PloraBenchConfig, SMOKE)
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="vpgtrans-plora-") as tmp:
        zoo = zoo_v2(args, cfg.zoo_seed, Path(tmp))
        if args.smoke:
            moe_dir = Path(tmp) / "moe-s"
        else:
            from vpgtrans.demo.zoo import default_cache_dir
            from vpgtrans.demo.zoo2 import ZOO_VERSION

            moe_dir = Path(args.cache_dir or default_cache_dir()) / ZOO_VERSION / f"seed{cfg.zoo_seed}-moe-s"
        moe_dir.mkdir(parents=True, exist_ok=True)
        result = run(cfg, zoo, moe_dir, args.work_dir or Path(tmp) / "runs")
    out = save_result("plora", args, result, plot)
    from rich.console import Console

    Console(width=170).print(render(result))
    print(f"results: {out} ({result['seconds']:.0f}s)")
    return result


if __name__ == "__main__":
    main()
