"""InfMLLM's claim at small scale: a pool-adapter, which keeps the ViT's patches in their spatial order,
grounds referring expressions better than BLIP-2's Q-Former + projector, which reads the patches through
K learned queries. On the synthetic grounding split (``vpgtrans.demo.grounding_world``: 2-3 objects per
image, the expression names one by attributes only, the answer is its box).

    python -m benchmarks.grounding_pool            # builds/reuses zoo-v2, then 2 arms x 3 seeds
    python -m benchmarks.grounding_pool --smoke    # random-weight tiny zoo, a few steps: plumbing only

Both arms start from the zoo's source BLIP-2 (``source-blip2-opt-s``) and go to the same target
(``llama-s``), through the library (``vpgtrans.stages.inherit`` and ``run_stage``), on the same rows in the
same order per seed, evaluated every ``eval_every`` steps on the same eval rows (accuracy at IoU >= 0.5):

Each arm trains its visual side with the LLM frozen, then the LLM through peft's LoRA (rank ``lora_rank``, alpha 2x
that, no dropout, attention + MLP) together with the connector's last part for ``lora_steps`` (cosine from the
arm's searched lr to a tenth of it), on ``n_train`` scenes:

- **pool**: ``--connector infmllm --pool-size pool_size``, InfMLLM's three stages: ``align`` (pool-adapter) for
  ``warmup_steps``, ``multitask`` (pool-adapter + ln_vision, cosine to half) to ``steps``, both at
  ``pool_visual_lr``; then ``instruct`` (LoRA + pool-adapter).
- **qformer**: BLIP-2's Q-Former + projector with the same LoRA (the benchmark-only connector
  ``benchmarks.common.register_lora_all``): projector warm-up for ``warmup_steps`` at 5x ``qformer_visual_lr``,
  VPG + projector at ``qformer_visual_lr`` cosine to half (the vpgtrans recipe's shape), then ``instruct``
  (LoRA + projector).

With the LLM frozen neither arm got near the baselines (first run, 600 steps on 3000 scenes: pool 0.136, Q-Former
0.147 at IoU >= 0.5): the tiny LLM never learnt to resolve a reference in a written scene (below), so the LLM
stage is where grounding is learnt. The visual-side lrs come from that run's 600-step search (Q-Former: its pick,
3e-4; pool: 3e-3 and 1e-2 tied on dev accuracy, 3e-3 taken); the LLM stage's lr is searched per arm (below).

**The target LLM** (``target_llm``, default ``llama-s-boxes``): zoo-v2's llama-s cannot write a box — it
was pre-trained on the world's lower-case words only, so every digit is a byte-fallback token whose rows
never trained, and in the first run every answer of every arm was unparseable. A real LLM has read numbers.
So the target is a llama-s built with the zoo's own recipe (same tokenizer, size, steps, lr, seed) on the
zoo's text pairs with ``box_fraction`` of them replaced by grounding text about a scene, for
``box_llm_steps`` steps (3x llama-s's: at 700 steps and 30% box text, given the scene written out in words
it found the box at IoU >= 0.5 for only 19% of held-out scenes, a ceiling no connector can pass):
``[scene as an attribute list][BOS]Where is the small red square ? Box: 0.105,0.213,0.398,0.502`` (``GROUNDING_PROMPT``,
the bundles' grounding template too) — the zoo's
design, in which the LM learns to read a scene written in front of its BOS and the VPG's soft prompts later
take the place of those words. The scene list names each object's cell and size, not its box, so the LLM
learns box text and an approximate cell-to-box map, never the image; both arms get the same LLM. Its
record (``box_llm.json`` beside the zoo, and in the result) has that ceiling: ``text_acc_iou50`` /
``text_mean_iou``, the LLM's boxes generated from 200 held-out scenes written out as the attribute list —
what perfect soft prompts could give with the LLM frozen. ``box_llm_hidden`` / ``box_llm_layers`` size it otherwise (FFN 4x the
width; recorded in its record when not llama-s's). It is cached beside the zoo (``llama-s-boxes/``);
``--target-llm llama-s`` runs on the zoo's own llama-s.

**Learning rates**: each arm gets its own LLM-stage lr, from its grid (``pool_lrs``, ``qformer_lrs``), by the final
acc_iou50 on a **dev** split (``n_dev`` scenes of their own seed, never the eval split; ties: the smaller
lr, then mean IoU) of one run with seed ``search_seed`` (not a measured seed) and the arm's full budget;
where the pick is an end of the grid the grid is extended one step of its end ratio, up to
``lr_grid_extend`` times (``benchmarks.common.search_lr_grid``). The search is in the JSON.

Reported per arm (mean, std, min, max over seeds): final acc_iou50, mean IoU, unparseable answers, trainable
parameters, seconds, steps to reach ``target_accuracy``; and the centre-box and largest-object baselines
of the eval rows. With ``--work-dir``, every finished run and search trial is recorded there and read back
by a later call with the same protocol (``benchmarks.common.RunRecords``): a killed run resumes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.common import (RunRecords, docs_preamble, fmt_spread, machine_info, register_lora_all, result_config,
                               result_parser, save_result, search_lr_grid, spread, without_times, write_docs_section)
from benchmarks.grounding_llm import GROUNDING_PROMPT, box_llm

ARMS = ("pool", "qformer")
@dataclass
class GroundingConfig:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    zoo_seed: int = 0
    target_llm: str = "llama-s-boxes"  # or "llama-s": the zoo's, which never learned digits (see the docstring)
    box_fraction: float = 0.5  # of the box LLM's pre-training pairs: grounding text instead of captions / VQA
    box_llm_steps: int = 2100  # its pre-training steps (llama-s's 700 left it at 0.19 acc@0.5 from written scenes)
    box_llm_hidden: int = 96  # its width (FFN 4x) and depth: llama-s's by default
    box_llm_layers: int = 2
    n_train: int = 20000
    n_eval: int = 150
    n_dev: int = 150  # the lr search's split
    pool_size: int = 3  # zoo-v2's ViT: 48 px / patch 8 = a 6x6 grid -> 3x3 = 9 tokens (the Q-Former has 12)
    batch_size: int = 16
    steps: int = 600  # optimizer steps of the visual-side stages, warm-up included
    warmup_steps: int = 60
    pool_visual_lr: float = 3e-3  # the visual-side stages' lrs (see the docstring)
    qformer_visual_lr: float = 3e-4
    lora_steps: int = 8400  # the LLM stage (LoRA + the connector's trainable part)
    lora_rank: int = 16  # alpha 2 x rank, no dropout; attention + MLP
    pool_lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 6e-3])  # the LLM stage's lr grid
    qformer_lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 6e-3])
    lr_grid_extend: int = 1
    search_seed: int = 100
    eval_every: int = 500
    target_accuracy: float = 0.5
    max_new_tokens: int = 24


SMOKE = {"seeds": [0], "n_train": 12, "n_eval": 6, "n_dev": 6, "batch_size": 4, "steps": 2, "warmup_steps": 1,
         "lora_steps": 1, "lora_rank": 2, "eval_every": 1, "max_new_tokens": 4, "pool_lrs": [1e-3, 3e-3],
         "qformer_lrs": [1e-3], "lr_grid_extend": 0}


def _stage_config(trainable: list[str], lr: float, min_lr: float | None, steps: int, seed: int, cfg: GroundingConfig,
                  eval_every: int):
    from vpgtrans.config import TrainConfig

    return TrainConfig(trainable=trainable, lr=lr, min_lr=min_lr, max_steps=steps, batch_size=cfg.batch_size, seed=seed,
                       eval_every=eval_every, eval_max_samples=max(cfg.n_eval, cfg.n_dev),
                       max_new_tokens=cfg.max_new_tokens)


def run_arm(arm: str, seed: int, lr: float, zoo: dict, splits: dict, work: Path, cfg: GroundingConfig,
            scored_on: str = "grounding_eval", search: bool = False) -> dict:
    """One arm, one seed, one lr: inherit, two stages, the combined curve on ``scored_on`` and the final
    scores there. ``search``: an lr-search trial, scored at the end only."""
    from vpgtrans.config import InheritConfig, PromptTemplate
    from vpgtrans.stages.inherit import inherit
    from vpgtrans.stages.train import run_stage

    out = work / f"{arm}-seed{seed}-lr{lr:g}.{os.getpid()}"  # this process's: never a killed run's leftovers
    shutil.rmtree(out, ignore_errors=True)
    every = cfg.steps + cfg.lora_steps if search else cfg.eval_every
    lora = {"lora": {"rank": cfg.lora_rank, "alpha": 2 * cfg.lora_rank, "dropout": 0.0}}
    if arm == "pool":
        inherit_config = InheritConfig(connector="infmllm", seed=seed, visual_options={"pool_size": cfg.pool_size},
                                       adapter_options=lora)
        visual_lr, part = cfg.pool_visual_lr, "pool_adapter"
        stages = [("align", _stage_config([part], visual_lr, None, cfg.warmup_steps, seed, cfg, every)),
                  ("multitask", _stage_config(["ln_vision", part], visual_lr, visual_lr / 2,
                                              cfg.steps - cfg.warmup_steps, seed, cfg, every))]
    else:
        inherit_config = InheritConfig(connector=register_lora_all(("attention", "mlp")), seed=seed,
                                       adapter_options=lora)
        visual_lr, part = cfg.qformer_visual_lr, "connector"
        stages = [("warmup", _stage_config([part], 5 * visual_lr, None, cfg.warmup_steps, seed, cfg, every)),
                  ("finetune", _stage_config(["vpg", part], visual_lr, visual_lr / 2, cfg.steps - cfg.warmup_steps,
                                             seed, cfg, every))]
    stages.append(("instruct", _stage_config(["lora", part], lr, lr / 10, cfg.lora_steps, seed, cfg, every)))
    started = time.perf_counter()
    template = PromptTemplate(grounding="{image}{bos}" + GROUNDING_PROMPT)
    bundle = inherit(zoo["source"], zoo[cfg.target_llm], out / "inherit", inherit_config, template=template, force=True)
    curve, offset = [], 0
    for name, config in stages:
        bundle = run_stage(bundle, splits["grounding_train"], out / name, config, name,
                           eval_data=splits[scored_on], force=True)
        manifest = json.loads((bundle / "manifest.json").read_text())
        curve += [{"step": p["step"] + offset, "acc_iou50": p["acc_iou50"], "mean_iou": p["mean_iou"]}
                  for p in manifest["curve"] if not (curve and p["step"] == 0)]
        offset += manifest["metrics"]["train"]["steps"]
    final = manifest["metrics"]["eval"]
    reached = next((p["step"] for p in curve if p["acc_iou50"] >= cfg.target_accuracy), None)
    shutil.rmtree(out)  # the record is the run
    return {"arm": arm, "seed": seed, "lr": lr, "scored_on": scored_on, "curve": curve,
            "final": {k: final[k] for k in ("acc_iou50", "mean_iou", "parsed", "unparseable")},
            "trainable_params": manifest["metrics"]["train"]["trainable"], "steps": offset,
            "seconds": round(time.perf_counter() - started, 1), "steps_to_target": reached}


def search_lr(arm: str, zoo: dict, splits: dict, work: Path, cfg: GroundingConfig, records: RunRecords) -> dict:
    """The arm's lr: the best final dev acc_iou50 (then mean IoU; ties: the smaller lr) over its grid."""
    def trial(lr: float) -> dict:
        return records.get(f"search-{arm}-{lr:g}", lambda: run_arm(arm, cfg.search_seed, lr, zoo, splits,
                                                                   work / "search", cfg, "grounding_dev", True))

    grid = cfg.pool_lrs if arm == "pool" else cfg.qformer_lrs
    found = search_lr_grid(grid, trial, lambda t: (t["final"]["acc_iou50"], t["final"]["mean_iou"]), cfg.lr_grid_extend)
    found["trials"] = [{"lr": t["lr"], **t["final"], "seconds": t["seconds"]} for t in found["trials"]]
    return {"arm": arm, "split": "grounding_dev", "seed": cfg.search_seed,
            "criterion": "final dev acc_iou50, then mean IoU", **found}


def attribute_ceiling(cfg: dict) -> dict:
    """The attribute oracle's scores on the eval split of ``cfg`` (``vpgtrans.demo.grounding_world.
    attribute_oracle``): the right object's cell and size, mapped to the training targets' mean box — what
    a model that reads the scene's attributes perfectly, and the pixels not at all, would score."""
    from vpgtrans.demo.grounding_world import attribute_oracle
    from vpgtrans.grounding import grounding_accuracy

    guesses, truths = attribute_oracle(cfg["n_train"], cfg["n_eval"], cfg["zoo_seed"])
    scores = grounding_accuracy(guesses, truths)
    return {"acc_iou50": scores["acc_iou50"], "mean_iou": scores["mean_iou"], "n": scores["n"]}


def summarize(runs: list[dict]) -> dict:
    by_arm: dict[str, list[dict]] = {}
    for run in runs:
        by_arm.setdefault(run["arm"], []).append(run)
    return {arm: {"seeds": [r["seed"] for r in rs],
                  **{key: spread([r["final"][key] for r in rs]) for key in ("acc_iou50", "mean_iou", "unparseable")},
                  "lr": rs[0]["lr"], "trainable_params": rs[0]["trainable_params"],
                  "seconds": spread([r["seconds"] for r in rs]),
                  "steps_to_target": spread([r["steps_to_target"] for r in rs])}
            for arm, rs in by_arm.items()}


DOCS_BEGIN, DOCS_END = "<!-- grounding_pool:begin -->", "<!-- grounding_pool:end -->"


def markdown(result: dict) -> str:
    """The ``docs/benchmarks.md`` section, from a result JSON: the arms over seeds beside the baselines."""
    cfg = result["config"]
    lines = docs_preamble("grounding_pool", DOCS_BEGIN, result,
                          f"target `{cfg.get('target_llm', cfg.get('target'))}`, {cfg['steps']} visual-side steps"
                          + (f" + {cfg['lora_steps']} LLM-stage steps (LoRA rank {cfg['lora_rank']} + the connector's "
                             "last part)" if cfg.get("lora_steps") else "")
                          + f" of batch {cfg['batch_size']} on {cfg['n_train']} training scenes, scored on "
                          f"{cfg['n_eval']} eval scenes; seeds {cfg['seeds']}. Means over seeds (min–max)"
                          + ("; lr: the LLM stage's." if cfg.get("lora_steps") else "."))
    lines += ["| arm | lr (dev search) | accuracy at IoU ≥ 0.5 | mean IoU | unparseable | steps to "
              f"{cfg['target_accuracy']:g} | trainable parameters | seconds |", "|---|---|---|---|---|---|---|---|"]
    for arm, block in result["summary"].items():
        search = result["lr_search"][arm]
        lr = f"{block['lr']:g}" + (" (grid edge)" if search["at_grid_edge"] else "")
        lines.append(f"| {arm} | {lr} | {fmt_spread(block['acc_iou50'])} | {fmt_spread(block['mean_iou'])} | "
                     f"{fmt_spread(block['unparseable'], 1)} | {fmt_spread(block['steps_to_target'], 0)} | "
                     f"{block['trainable_params']:,} | {fmt_spread(block['seconds'], 0)} |")
    for name, base in result["baselines"].items():
        value = {k: "n/a" if base[k] is None else f"{base[k]:.3f}" for k in ("acc_iou50", "mean_iou")}
        lines.append(f"| baseline: {name.replace('_', ' ')} | — | {value['acc_iou50']} | {value['mean_iou']} | — | — "
                     "| 0 | — |")
    oracle = result.get("attribute_oracle")
    if oracle:
        lines.append(f"| reference: attribute oracle | — | {oracle['acc_iou50']:.3f} | {oracle['mean_iou']:.3f} "
                     "| — | — | 0 | — |")
    if result.get("box_llm", {}).get("metrics"):
        size = (f", {result['box_llm']['hidden_size']} wide, {result['box_llm']['num_layers']} layers"
                if "hidden_size" in result["box_llm"] else "")
        lines += ["", f"The target LLM `llama-s-boxes` (box fraction {result['box_llm']['box_fraction']:g}{size}): final "
                      f"pre-training loss {result['box_llm']['metrics']['final_loss']}, {result['box_llm']['steps']} steps; from "
                      f"200 held-out scenes written out in words it finds the box at IoU ≥ 0.5 for "
                      f"{result['box_llm']['metrics']['text_acc_iou50']:.3f} of them (mean IoU "
                      f"{result['box_llm']['metrics']['text_mean_iou']:.3f}): the ceiling of a connector "
                      + ("with the LLM frozen; the LLM stage can pass it." if cfg.get("lora_steps")
                         else "(the LLM frozen).")]
    if oracle:
        lines += ["", "The attribute oracle (`vpgtrans.demo.grounding_world.attribute_oracle`) knows which object the "
                      "expression names and that object's cell and size, and answers the mean box of the training "
                      "split's targets with that cell and size: what perfect reading of the scene's attributes, and "
                      "nothing of the pixels, scores on these eval rows — the world's own ceiling for an LLM that "
                      "reads a written scene."]
    lines += ["", "lr search (final dev accuracy at IoU ≥ 0.5 per lr): " + "; ".join(
        f"{arm} " + ", ".join(f"{t['lr']:g}: {t['acc_iou50']:.3f}" for t in found["trials"])
        for arm, found in result["lr_search"].items()) + ".", "", DOCS_END]
    return "\n".join(lines)


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
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="record every finished run and lr-search trial here and reuse them (resume); "
                             "default: a temp dir, nothing kept")
    parser.add_argument("--write-docs", action="store_true",
                        help="after a full run, regenerate the grounding section of docs/benchmarks.md from its JSON")
    parser.add_argument("--docs-from", type=Path, default=None,
                        help="only regenerate the docs section from this result JSON (no run)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="zoo cache (default $VPGTRANS_CACHE or ~/.cache/vpgtrans)")
    args = parser.parse_args(argv)
    if args.docs_from is not None:
        result = json.loads(args.docs_from.read_text())
        print(f"wrote {write_docs_section(markdown(result), DOCS_BEGIN, DOCS_END)}")
        return result
    cfg = result_config(args, GroundingConfig, SMOKE)
    unknown = sorted(set(cfg.arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
    logging.getLogger("vpgtrans").setLevel(logging.WARNING)
    from vpgtrans.data import load_rows
    from vpgtrans.demo.grounding_world import make_grounding_world, make_split
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
        zoo = dict(zoo)
        zoo["llama-s-boxes"], box_record = box_llm(zoo, cfg.zoo_seed, not args.smoke, cfg)
        split_root = work / f"splits.{os.getpid()}"  # this process's (the records, not the splits, are kept)
        try:
            splits = make_grounding_world(split_root, cfg.n_train, cfg.n_eval, seed=cfg.zoo_seed)
            splits["grounding_dev"] = make_split(split_root / "grounding_dev", cfg.n_dev, cfg.zoo_seed + 20_000)
            baselines = grounding_baselines(list(load_rows(splits["grounding_eval"])[0]))
            protocol = {k: v for k, v in asdict(cfg).items()
                        if k not in ("seeds", "arms", "lr_grid_extend", "pool_lrs", "qformer_lrs")}
            records = RunRecords(work / "records" if args.work_dir else None,
                                 {"protocol": protocol,
                                  "zoo": without_times(json.loads((Path(zoo["root"]) / "zoo.json").read_text())),
                                  "box_llm": without_times(box_record)})
            search = {arm: search_lr(arm, zoo, splits, work, cfg, records) for arm in cfg.arms}
            runs = [records.get(f"{arm}-seed{seed}-lr{search[arm]['chosen_lr']:g}",
                                lambda: run_arm(arm, seed, search[arm]["chosen_lr"], zoo, splits, work / "runs", cfg))
                    for seed in cfg.seeds for arm in cfg.arms]
        finally:
            shutil.rmtree(split_root, ignore_errors=True)
    result = {"benchmark": "grounding_pool", "smoke": args.smoke, "config": asdict(cfg), "machine": machine_info(),
              "baselines": baselines, "attribute_oracle": attribute_ceiling(asdict(cfg)), "box_llm": box_record,
              "lr_search": search, "runs": runs, "summary": summarize(runs),
              "records": {"kept": records.root is not None, "reused": records.reused, "identity": records.digest},
              "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "seconds": round(time.perf_counter() - started, 1)}
    path = save_result("grounding_pool", args, result, plot)
    if args.write_docs and not args.smoke:
        print(f"wrote {write_docs_section(markdown(result), DOCS_BEGIN, DOCS_END)}")
    print(json.dumps({"baselines": baselines, "summary": result["summary"]}, indent=2))
    print(f"written to {path}")
    return result


if __name__ == "__main__":
    main()
