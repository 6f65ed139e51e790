"""plora on a dense and an MoE tiny target: caption score against steps next to a projector-only transfer
(``linear``) and a transfer that also trains LoRA on every token (``lora-all``, peft), and each final LLM's
text perplexity on held-out text next to the untouched LLM's (plora's and linear's must be identical).

    python -m benchmarks.plora --write-docs   # zoo-v2 (built once, cached) + a pre-trained tiny Mixtral
    python -m benchmarks.plora --smoke        # random-weight tiny zoo and MoE, a few steps: plumbing only
    python -m benchmarks.plora --docs-from benchmarks/results/plora.json   # the docs section only

Targets: ``llama-s`` from zoo-v2 and ``moe-s``, a Mixtral of llama-s's width and tokenizer (4 experts, top-2,
per-expert FFN of half llama-s's), pre-trained on the same text as the zoo's LLMs with the same recipe and
cached beside the zoo. Arms, all from the zoo's source BLIP-2 with the shared-token converter:

    linear    projector warm-up -> VPG + projector                      (the vpgtrans recipe)
    plora     projector warm-up -> VPG + projector + visual-token LoRA  (the plora recipe)
    lora-all  projector warm-up -> VPG + projector + LoRA on every token (peft; attention only on MoE
              targets: peft has no layer for fused experts)

Every arm has the same budgets, batches, eval grid (CIDEr on ``eval_samples`` eval captions every
``eval_every`` steps) and schedule shape: ``warmup_steps`` at ``warmup_lr_multiplier`` x its lr, constant,
then ``finetune_steps`` at its lr, cosine to half (as benchmarks/transfer_speedup.py).

**Learning rates**: each arm on each target gets its own, from ``lr_grid`` (x2 apart around the first run's
1e-3), by the final CIDEr (then the best; ties: the smaller lr) on a **dev** split of ``dev_rows`` fresh world
captions (seed 10,000 + ``zoo_seed``, as transfer_speedup's; never the eval split) of one run per lr with seed
``search_seed`` (not a measured seed) and the arm's full budget and eval grid; where the pick is an end of
the grid, the grid is extended one step of its end ratio, up to ``lr_grid_extend`` times
(``benchmarks.common.search_lr_grid``). Then every seed trains at the chosen lr. The search is in the JSON.

Text perplexity: the world's held-out LM text (scene attributes, BOS, caption or question/answer), loss on the
text after BOS, the model's text-only path; ``text_unchanged``: the final model's equals the base LLM's
exactly. With ``--work-dir``, every finished run and search trial is recorded there (one record each; its
training directory deleted once scored) and read back by a later call with the same protocol
(``benchmarks.common.RunRecords``): a killed run resumes. ``--write-docs`` / ``--docs-from`` write the
marked section of docs/benchmarks.md from the result JSON.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks.common import (RunRecords, add_zoo_options, docs_preamble, fmt_spread, machine_info,
                               plot_curves_by_target, quiet_libraries, register_lora_all, result_config, result_parser,
                               save_result, search_lr_grid, spread, without_times, write_docs_section, zoo_v2)

METRIC = "cider"
ARMS = ("linear", "plora", "lora-all")
DOCS_BEGIN, DOCS_END = "<!-- plora:begin -->", "<!-- plora:end -->"


@dataclass
class PloraBenchConfig:
    targets: list[str] = field(default_factory=lambda: ["llama-s", "moe-s"])
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    zoo_seed: int = 0
    batch_size: int = 32
    lr_grid: list[float] = field(default_factory=lambda: [5e-4, 1e-3, 2e-3])  # every arm and target searches it
    lr_grid_extend: int = 1  # lrs added beyond an edge pick, each one step of the grid's end ratio further
    search_seed: int = 100
    dev_rows: int = 64  # the lr search's caption split
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
             text_samples=8, moe_steps=0, max_new_tokens=3, lr_grid=[1e-3, 2e-3], lr_grid_extend=0, dev_rows=4)


def build_moe(zoo: dict, out_dir: Path, cfg: PloraBenchConfig, seed: int) -> tuple[Path, dict]:
    """``moe-s``: a Mixtral with llama-s's width, depth, heads and tokenizer; pre-trained like the zoo's LLMs
    when ``cfg.moe_steps`` > 0. Cached in ``out_dir`` and rebuilt when its settings change
    (``zoo_parts.cached_part``); the record is ``out_dir/moe.json``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, MixtralConfig

    from vpgtrans.demo import pretrain, world2, zoo_parts
    from vpgtrans.demo.zoo2 import LM_PAIRS

    settings = {"base": "zoo-v2 llama-s", "steps": cfg.moe_steps, "experts": cfg.moe_experts, "top_k": cfg.moe_top_k,
                "lr": 5e-3, "pairs": LM_PAIRS, "seed": seed}

    def build(out: Path) -> dict:
        dense = AutoConfig.from_pretrained(zoo["llama-s"])
        tokenizer = AutoTokenizer.from_pretrained(zoo["llama-s"])
        config = MixtralConfig(vocab_size=dense.vocab_size, hidden_size=dense.hidden_size,
                               intermediate_size=dense.intermediate_size // 2, num_hidden_layers=dense.num_hidden_layers,
                               num_attention_heads=dense.num_attention_heads,
                               num_key_value_heads=dense.num_key_value_heads,
                               max_position_embeddings=dense.max_position_embeddings, num_local_experts=cfg.moe_experts,
                               num_experts_per_tok=cfg.moe_top_k, tie_word_embeddings=False,
                               bos_token_id=dense.bos_token_id, eos_token_id=dense.eos_token_id)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        metrics = {"steps": cfg.moe_steps, "params": sum(p.numel() for p in model.parameters())}
        if cfg.moe_steps:
            loss = pretrain.pretrain_lm(model, tokenizer, world2.text_pairs(LM_PAIRS, seed), cfg.moe_steps,
                                        lr=settings["lr"], seed=seed)
            metrics.update(final_loss=round(loss, 4), copy_accuracy=round(
                pretrain.lm_copy_accuracy(model, tokenizer, world2.text_pairs(200, 10_000 + seed)), 4))
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        return metrics

    return zoo_parts.cached_part(out_dir, "moe.json", settings, build)


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


def run_arm(cfg: PloraBenchConfig, zoo: dict, target: str, arm: str, seed: int, lr: float, out_dir: Path,
            eval_data: Path, text=None) -> dict:
    """One arm, one seed, one lr through ``vpgtrans.stages.transfer``: its CIDEr curve on ``eval_data``; with
    ``text``, the final LLM's text perplexity next to the base LLM's. Trains in ``out_dir.PID`` (this
    process's: never a killed run's leftovers), deleted once scored: the returned record is the run."""
    from transformers import AutoModelForCausalLM

    from vpgtrans import load_model
    from vpgtrans.config import InheritConfig
    from vpgtrans.recipes import stage
    from vpgtrans.stages.transfer import transfer

    common = dict(batch_size=cfg.batch_size, seed=seed, eval_max_samples=cfg.eval_samples,
                  max_new_tokens=cfg.max_new_tokens, eval_every=cfg.eval_every)
    connector = {"linear": "linear", "plora": "plora",
                 "lora-all": "bench-lora-all-attention" if target == "moe-s" else "bench-lora-all-attention-mlp"}[arm]
    adapter = {"plora": {"plora": {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha}},
               "lora-all": {"lora": {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha}}}.get(arm, {})
    recipe = {"linear": "vpgtrans", "plora": "plora", "lora-all": "bench-lora-all"}[arm]
    warmup = stage(recipe, "warmup").config(lr=lr * cfg.warmup_lr_multiplier, max_steps=cfg.warmup_steps, **common)
    finetune = stage(recipe, "finetune").config(lr=lr, min_lr=lr / 2, max_steps=cfg.finetune_steps, **common)
    out_dir = out_dir.with_name(f"{out_dir.name}.{os.getpid()}")
    shutil.rmtree(out_dir, ignore_errors=True)
    load = os.getloadavg()
    started = time.perf_counter()
    summary = transfer(zoo["source"], zoo[target], Path(zoo["world"]) / "caption_train", out_dir,
                       warmup_config=warmup, finetune_config=finetune,
                       inherit_config=InheritConfig(connector=connector, adapter_options=adapter),
                       eval_data=eval_data, force=True)
    seconds = time.perf_counter() - started
    curve = [{"step": p["step"], "stage": p["stage"], METRIC: p[METRIC]} for p in summary["curve"]]
    run = {"target": target, "arm": arm, "seed": seed, "lr": lr, "scored_on": Path(eval_data).name, "curve": curve,
           "final": curve[-1][METRIC], "best": max(p[METRIC] for p in curve),
           "llm_trainable": summary["metrics"]["finetune"]["train"].get("llm_trainable"),
           "train_seconds": round(seconds, 1), "loadavg_before": [round(x, 2) for x in load],
           "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    if text is not None:
        model = load_model(summary["final_bundle"], device="cpu")
        base = AutoModelForCausalLM.from_pretrained(zoo[target]).eval()
        perplexity = {"base": text_perplexity(base, model.tokenizer, text),
                      "final": text_perplexity(model, model.tokenizer, text)}
        run.update(text_perplexity=perplexity, text_unchanged=perplexity["base"] == perplexity["final"])
    shutil.rmtree(out_dir)
    return run


def search_lr(cfg: PloraBenchConfig, zoo: dict, target: str, arm: str, dev: Path, work_dir: Path,
              records: RunRecords) -> dict:
    """The arm's lr on ``target``: the best final dev CIDEr (then best dev CIDEr; ties: the smaller lr)."""
    def trial(lr: float) -> dict:
        name = f"search-{target}-{arm}-lr{lr:g}"
        return records.get(name, lambda: run_arm(cfg, zoo, target, arm, cfg.search_seed, lr, work_dir / "search" / name,
                                                 dev))

    found = search_lr_grid(cfg.lr_grid, trial, lambda t: (t["final"], t["best"]), cfg.lr_grid_extend)
    keys = ("lr", "scored_on", "final", "best", "curve", "train_seconds", "loadavg_before")
    found["trials"] = [{k: t[k] for k in keys} for t in found["trials"]]
    return {"target": target, "arm": arm, "split": "caption_dev", "dev_rows": cfg.dev_rows, "seed": cfg.search_seed,
            "criterion": f"final dev {METRIC}, then best dev {METRIC}", **found}


def summarize(runs: list[dict], searches: list[dict]) -> list[dict]:
    rows = []
    for search in searches:
        mine = [r for r in runs if (r["target"], r["arm"]) == (search["target"], search["arm"])]
        rows.append({"target": search["target"], "arm": search["arm"], "seeds": [r["seed"] for r in mine],
                     "lr": search["chosen_lr"], "at_grid_edge": search["at_grid_edge"],
                     "final": spread([r["final"] for r in mine]), "best": spread([r["best"] for r in mine]),
                     "perplexity_base": mine[0]["text_perplexity"]["base"],
                     "perplexity_final": spread([r["text_perplexity"]["final"] for r in mine]),
                     "text_unchanged": all(r["text_unchanged"] for r in mine),
                     "llm_trainable": mine[0]["llm_trainable"],
                     "load": spread([r["loadavg_before"][0] for r in mine]),
                     "train_seconds": spread([r["train_seconds"] for r in mine])})
    return rows


def deviations(cfg: PloraBenchConfig, summary: list[dict], smoke: bool) -> list[str]:
    """Where this run departs from the reference protocol (DESIGN §4, Dutt et al. 2025), for the docs."""
    found = ["tiny synthetic world and models (zoo-v2's llama-s; moe-s, a Mixtral of its width with "
             f"{cfg.moe_experts} experts, top-{cfg.moe_top_k}), not the paper's LLMs and data",
             "the new modality's parameters (the projector) start from the shared-token converter, not from the "
             "paper's Gromov-Wasserstein initialisation",
             "lora-all on moe-s puts LoRA on attention only (peft has no layer for fused experts): it trains fewer "
             "LLM parameters there than on llama-s",
             f"each arm's lr from one run per lr (seed {cfg.search_seed}) on a {cfg.dev_rows}-caption dev split: "
             "a single-seed pick"]
    edge = [f"{row['target']} {row['arm']}" for row in summary if row["at_grid_edge"]]
    if edge:
        found.append(f"lr picked at the searched grid's edge after {cfg.lr_grid_extend} extension(s): "
                     f"{', '.join(edge)} (the best lr may lie beyond it)")
    inexact = [f"{row['target']} {row['arm']}" for row in summary
               if row["arm"] in ("linear", "plora") and not row["text_unchanged"]]
    if inexact:
        found.append(f"text path NOT exact (text perplexity changed): {', '.join(inexact)}")
    if smoke:
        found.insert(0, "smoke run: random weights and a few steps; the numbers are plumbing checks only")
    return found


def run_identity(cfg: PloraBenchConfig, zoo: dict, target_record: dict | None) -> dict:
    """What determines one target's records: the protocol (the config but which targets, arms, seeds and lrs
    are run: a run's lr is in its record's name), the zoo and, for moe-s, its build record."""
    protocol = {k: v for k, v in asdict(cfg).items()
                if k not in ("targets", "arms", "seeds", "lr_grid", "lr_grid_extend")}
    zoo_record = json.loads((Path(zoo["root"]) / "zoo.json").read_text())
    return {"protocol": protocol, "zoo": without_times(zoo_record), "target": without_times(target_record)}


def run(cfg: PloraBenchConfig, zoo: dict, moe_dir: Path, work_dir: Path, keep_records: bool = False,
        log=print) -> dict:
    """Every target's lr searches (dev split), then every arm and seed at its lr, then the summary."""
    from vpgtrans.demo import world2

    unknown = sorted(set(cfg.arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; known: {list(ARMS)}")
    for targets in (("attention", "mlp"), ("attention",)):
        register_lora_all(targets)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    dev_root = work_dir / f"dev.{os.getpid()}"  # this process's (the records, not the split, are kept)
    dev = world2.make_split(dev_root / "caption_dev", "caption", cfg.dev_rows, seed=10_000 + cfg.zoo_seed)
    try:
        zoo = dict(zoo)
        moe_metrics = None
        if "moe-s" in cfg.targets:
            zoo["moe-s"], moe_metrics = build_moe(zoo, moe_dir, cfg, seed=cfg.zoo_seed * 1000 + 7)
        text = world2.text_pairs(cfg.text_samples, 20_000 + cfg.zoo_seed)
        records = {target: RunRecords(work_dir / "records" if keep_records else None,
                                      run_identity(cfg, zoo, moe_metrics if target == "moe-s" else None))
                   for target in cfg.targets}
        searches, runs = [], []
        for target in cfg.targets:
            for arm in cfg.arms:
                searches.append(search_lr(cfg, zoo, target, arm, dev, work_dir, records[target]))
                log(f"plora bench: {target} {arm} lr {searches[-1]['chosen_lr']:g} (dev "
                    + ", ".join(f"{t['lr']:g}: {t['final']:.3f}" for t in searches[-1]["trials"]) + ")")
        for search in searches:
            target, arm, lr = search["target"], search["arm"], search["chosen_lr"]
            for seed in cfg.seeds:
                name = f"{target}-{arm}-seed{seed}-lr{lr:g}"
                runs.append(records[target].get(name, lambda: run_arm(
                    cfg, zoo, target, arm, seed, lr, work_dir / "runs" / name, Path(zoo["world"]) / "caption_eval",
                    text)))
                log(f"plora bench: {target} {arm} seed {seed}: final {METRIC} {runs[-1]['final']:.3f}")
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(dev_root, ignore_errors=True)
    summary = summarize(runs, searches)
    return {"benchmark": "plora", "config": asdict(cfg), "machine": {**machine_info(), "torch_threads": cfg.threads},
            "moe": moe_metrics, "lr_search": searches, "runs": runs, "summary": summary,
            "records": {"kept": keep_records, "reused": sum(r.reused for r in records.values()),
                        "identity": {target: r.digest for target, r in records.items()}},
            "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "seconds": round(time.perf_counter() - started, 1)}


def markdown(result: dict) -> str:
    """The ``docs/benchmarks.md`` section, from a result JSON: a table per target, its lr search, the deviations."""
    cfg = result["config"]
    lines = docs_preamble("plora", DOCS_BEGIN, result,
                          f"{result['machine']['cores']} cores, {result['machine']['torch_threads']} torch thread(s) "
                          f"per process; every arm {cfg['warmup_steps']} "
                          f"warm-up steps at {cfg['warmup_lr_multiplier']:g}× its lr, then {cfg['finetune_steps']} at "
                          f"its lr cosine to half, batch {cfg['batch_size']}; CIDEr on {cfg['eval_samples']} eval "
                          f"captions every {cfg['eval_every']} steps; lr per arm and target from {cfg['lr_grid']} by "
                          f"final dev CIDEr (then best) on {cfg['dev_rows']} dev captions, search seed "
                          f"{cfg['search_seed']}, extended beyond an edge pick up to {cfg['lr_grid_extend']} time(s); "
                          f"seeds {cfg['seeds']}. Means over seeds (min–max); load: the 1-minute load average at the "
                          "start of each run.")
    if result.get("smoke"):
        lines += ["**Smoke run** (random weights, a few steps): plumbing only, not a measurement.", ""]
    for target in dict.fromkeys(row["target"] for row in result["summary"]):
        lines += [f"**{target}**", "", "| arm | lr (dev search) | final CIDEr | best CIDEr | text perplexity base "
                  "| text perplexity final | text path exact | LLM params trained | load |", "|" + "---|" * 9]
        for row in (r for r in result["summary"] if r["target"] == target):
            lines.append(f"| {row['arm']} | {row['lr']:g}{' (grid edge)' if row['at_grid_edge'] else ''} | "
                         f"{fmt_spread(row['final'])} | {fmt_spread(row['best'])} | {row['perplexity_base']:.3f} | "
                         f"{fmt_spread(row['perplexity_final'])} | {'yes' if row['text_unchanged'] else 'no'} | "
                         f"{row['llm_trainable'] or 0:,} | {fmt_spread(row['load'], 2)} |")
        lines += ["", "lr search (final dev CIDEr per lr): " + "; ".join(
            f"{s['arm']} " + ", ".join(f"{t['lr']:g}: {t['final']:.3f}" for t in s["trials"])
            for s in result["lr_search"] if s["target"] == target) + ".", ""]
    lines += ["Deviations from the reference protocol (DESIGN §4, Dutt et al. 2025):", ""]
    lines += [f"- {d}" for d in result["deviations"]]
    return "\n".join(lines + ["", DOCS_END])


def render(result: dict):
    from rich.table import Table

    table = Table(title=f"plora vs linear vs lora-all: {METRIC} (mean (min–max) over seeds) and text perplexity")
    for column in ("target", "arm", "lr", f"final {METRIC}", f"best {METRIC}", "text ppl base", "text ppl final",
                   "text path exact", "LLM params trained"):
        table.add_column(column, justify="left" if column in ("target", "arm") else "right")
    for row in result["summary"]:
        table.add_row(row["target"], row["arm"], f"{row['lr']:g}" + (" (edge)" if row["at_grid_edge"] else ""),
                      fmt_spread(row["final"]), fmt_spread(row["best"]), f"{row['perplexity_base']:.3f}",
                      fmt_spread(row["perplexity_final"]), "yes" if row["text_unchanged"] else "no",
                      f"{row['llm_trainable'] or 0:,}")
    return table


def plot(result: dict, path: Path) -> Path:
    return plot_curves_by_target(result, path, METRIC, colors={"linear": "C0", "plora": "C1", "lora-all": "C2"})


def main(argv: list[str] | None = None) -> dict:
    parser = result_parser("plora", __doc__, "random-weight tiny zoo and MoE, a few steps (plumbing only)",
                           PloraBenchConfig)
    add_zoo_options(parser)
    parser.add_argument("--write-docs", action="store_true",
                        help="after a full run, regenerate the plora section of docs/benchmarks.md from its JSON")
    parser.add_argument("--docs-from", type=Path, default=None,
                        help="only regenerate the docs section from this result JSON (no run)")
    args = parser.parse_args(argv)
    if args.docs_from is not None:
        result = json.loads(args.docs_from.read_text())
        print(f"wrote {write_docs_section(markdown(result), DOCS_BEGIN, DOCS_END)}")
        return result
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
        result = run(cfg, zoo, moe_dir, args.work_dir or Path(tmp) / "runs", keep_records=args.work_dir is not None)
    result["smoke"] = bool(args.smoke)
    result["deviations"] = deviations(cfg, result["summary"], args.smoke)
    out = save_result("plora", args, result, plot)
    if args.write_docs and not args.smoke:
        print(f"wrote {write_docs_section(markdown(result), DOCS_BEGIN, DOCS_END)}")
    from rich.console import Console

    Console(width=170).print(render(result))
    print(f"results: {out} ({result['seconds']:.0f}s)")
    return result


if __name__ == "__main__":
    main()
