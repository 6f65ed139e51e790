"""The word converter as the projector's initialisation on a target whose tokenizer shares few tokens with the
source's: the shared-token fit vs GW vs ``--converter auto`` vs no converter (issue 12).

    python -m benchmarks.converter_init            # zoo-v2 + llama-s-chars (each built once, cached), 3 seeds
    python -m benchmarks.converter_init --smoke    # random-weight tiny zoo, untrained llama-s-chars: plumbing only
    python -m benchmarks.converter_init --docs-from benchmarks/results/converter_init.json   # the docs table only

**The target**, ``llama-s-chars`` (``vpgtrans.demo.zoo2.char_llm``, cached beside the zoo): zoo-v2's llama-s
(width, depth, heads, FFN; its pre-training text, lr, batch and ``target_steps`` steps, llama-s's 700 by
default) with a character-level tokenizer trained on the same world text as the source's OPT-style one. On
zoo seed 0 the two share 36 tokens — 33 single characters and 3 special tokens paired by role — of 401 source
and 36 target tokens: none is a word (the source holds every word of the world whole, ``Ġsquare``), and the
shared tokens are 9% of the source's tokens over the world text, so the source rows a shared-token fit reads
barely trained. The result records this overlap (``vocab.vocabulary_overlap``) for every target. Fewer shared
tokens than 2 x the source width, so ``--converter auto`` picks GW (``inherit.AUTO_PAIRS_PER_DIM``).

Earlier versions only simulated few shared tokens, by subsampling the pairing of llama-s, whose tokenizer
shares most tokens with the source's; that ``shared-few`` arm is gone, the real target replaces it.
``--targets llama-s-chars llama-s`` adds zoo-v2's llama-s (375 shared pairs) as the many-shared reference
with the same arms; it is not in the default run, which it would double.

Arms, all through ``vpgtrans.stages.transfer.transfer`` with the vpgtrans recipe (projector warm-up at
``warmup_lr_multiplier`` x lr, then VPG + projector at lr cosine to lr/2), the same budgets and the same rows in
the same order per seed; every converter is fitted with ``--corpus`` = the training captions (frequency
weights for the shared-token fit, the most frequent tokens as GW's anchors):

    shared-tokens  --converter shared-tokens   every truly shared pair
    gw             --converter gw              no pair used (``gw_anchors`` anchors per side at most)
    auto           --converter auto            what it picked and why are read from the inherit manifest
    none           --converter none            the projector starts fresh

**Learning rates**: each arm's own, from ``lr_grid`` by the final CIDEr on a **dev** split (``dev_rows`` fresh
scenes of their own seed, never the eval split; ties: the smaller lr) of one run with seed ``search_seed`` (not a
measured seed) and the arm's full schedule; where the pick is an end of the grid the grid is extended one step of
its end ratio, up to ``lr_grid_extend`` times (``benchmarks.common.search_lr_grid``). Then ``seeds`` at that lr.

**Text budgets**, per target: the longest caption of the train, eval and dev rows in the target's tokens is
both the training target length and the generation budget (``max_new_tokens`` overrides the latter): about 150
for characters, about 35 for llama-s.

Reported per target and arm, over seeds: the converter's method (auto's pick and reason), its held-out cosine on
true pairs (the shared-token fit: on its own held-out tenth; GW: on every true pair, none of which it used) and
the retrieval accuracy among every true pair (in-sample for the shared-token fit), the CIDEr at step 0 (the merged
projector before training), the final and the best CIDEr, the chosen lr; the curves in the plot. With
``--work-dir DIR`` every finished run and search trial is recorded there and read back by a later call with the
same protocol (``benchmarks.common.RunRecords``); ``--write-docs`` / ``--docs-from`` write the section of
docs/benchmarks.md between ``DOCS_BEGIN`` and ``DOCS_END`` from the result JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks.common import (RunRecords, docs_preamble, fmt_spread, machine_info, plot_curves_by_target,
                               quiet_libraries, result_config, result_parser, save_result, search_lr_grid, spread,
                               without_times, write_docs_section, zoo_v2)

METRIC = "cider"
ARMS = ("shared-tokens", "gw", "auto", "none")
CHAR_TARGET = "llama-s-chars"
DOCS_BEGIN, DOCS_END = "<!-- converter_init:begin -->", "<!-- converter_init:end -->"


@dataclass
class InitBenchConfig:
    targets: list[str] = field(default_factory=lambda: [CHAR_TARGET])
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    zoo_seed: int = 0
    target_steps: int = 700  # llama-s-chars's pre-training steps (llama-s's); 0: an untrained target
    gw_anchors: int = 1000
    lr_grid: list[float] = field(default_factory=lambda: [1e-3, 2e-3, 4e-3, 8e-3])
    lr_grid_extend: int = 2  # at most this many lrs added beyond an edge pick, each the grid's end ratio further
    search_seed: int = 100  # the lr-search runs' seed; not one of the measured seeds
    dev_rows: int = 200
    batch_size: int = 32
    warmup_lr_multiplier: float = 5.0
    warmup_steps: int = 20
    finetune_steps: int = 180
    eval_every: int = 20
    eval_samples: int = 64
    max_new_tokens: int = 0  # 0: the target's longest caption (see the docstring)
    threads: int = 1


SMOKE = dict(seeds=[0], target_steps=0, gw_anchors=48, lr_grid=[1e-3, 2e-3], lr_grid_extend=0, dev_rows=4,
             batch_size=4, warmup_steps=2, finetune_steps=2, eval_every=2, eval_samples=4, max_new_tokens=3)


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


def text_budget(target_llm: Path, splits: list[Path]) -> int:
    """The longest caption (with its "\\n") of ``splits`` in ``target_llm``'s tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target_llm)
    captions = [json.loads(line)["caption"] for split in splits for line in (split / "data.jsonl").open()]
    return max(len(tokenizer(c + "\n", add_special_tokens=False)["input_ids"]) for c in captions)


def run_arm(cfg: InitBenchConfig, zoo: dict, target: str, arm: str, seed: int, lr: float, out_dir: Path,
            data: dict, search: bool = False) -> dict:
    """One transfer through the library; its curve on ``data["eval"]`` (a search run: only the final CIDEr on
    ``data["dev"]``, all its rows) and its converter as the inherit manifest and ``converter_scores`` see it.
    The bundles go to ``out_dir.PID`` and are deleted once read: the returned record is the run."""
    from vpgtrans.config import InheritConfig
    from vpgtrans.recipes import stage
    from vpgtrans.stages.transfer import transfer

    budget = data["budgets"][target]
    common = dict(batch_size=cfg.batch_size, seed=seed, eval_every=None if search else cfg.eval_every,
                  eval_max_samples=cfg.dev_rows if search else cfg.eval_samples, max_text_len=budget,
                  max_new_tokens=cfg.max_new_tokens or budget)
    warmup = stage("vpgtrans", "warmup").config(lr=lr * cfg.warmup_lr_multiplier, max_steps=cfg.warmup_steps,
                                                **common)
    finetune = stage("vpgtrans", "finetune").config(lr=lr, min_lr=lr / 2, max_steps=cfg.finetune_steps, **common)
    out_dir = out_dir.with_name(f"{out_dir.name}.{os.getpid()}")
    shutil.rmtree(out_dir, ignore_errors=True)
    load = os.getloadavg()
    started = time.perf_counter()
    summary = transfer(zoo["source"], zoo[target], Path(zoo["world"]) / "caption_train", out_dir,
                       warmup_config=warmup, finetune_config=finetune,
                       inherit_config=InheritConfig(converter=arm, gw_anchors=cfg.gw_anchors, seed=seed),
                       eval_data=data["dev" if search else "eval"], corpus=data["corpus"], force=True)
    seconds = time.perf_counter() - started
    stats = summary["metrics"]["inherit"].get("converter", {})
    scores = converter_scores(zoo, target, Path(summary["stages"]["inherit"])) or {}
    shutil.rmtree(out_dir)
    run = {"target": target, "arm": arm, "seed": seed, "lr": lr,
           "converter": {"method": stats.get("method"), "reason": stats.get("reason"), "pairs": stats.get("pairs"),
                         "heldout_cosine": stats.get("heldout_cosine"), "heldout_pairs": stats.get("heldout_pairs"),
                         "cosine_all": scores.get("heldout_cosine"),
                         "retrieval_accuracy": scores.get("retrieval_accuracy"),
                         "scored_pairs": scores.get("heldout_pairs")},
           "seconds": round(seconds, 1), "loadavg_before": [round(x, 2) for x in load],
           "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    if search:
        return {**run, "dev_final": summary["metrics"]["finetune"]["eval"][METRIC]}
    curve = [{"step": p["step"], "stage": p["stage"], METRIC: p[METRIC]} for p in summary["curve"]]
    return {**run, "curve": curve, "start": curve[0][METRIC], "final": curve[-1][METRIC],
            "best": max(p[METRIC] for p in curve)}


def search_lr(cfg: InitBenchConfig, zoo: dict, target: str, arm: str, work: Path, data: dict,
              records: RunRecords, log) -> dict:
    """The arm's lr on ``target``: the best final dev CIDEr (ties: the smaller lr) over its grid."""
    def trial(lr: float) -> dict:
        found = records.get(f"search-{target}-{arm}-lr{lr:g}", lambda: run_arm(
            cfg, zoo, target, arm, cfg.search_seed, lr, work / f"search-{target}-{arm}-lr{lr:g}", data, search=True))
        log(f"  lr search {target} {arm} lr {lr:g}: final dev {METRIC} {found['dev_final']:.3f}")
        return found

    found = search_lr_grid(cfg.lr_grid, trial, lambda t: t["dev_final"], cfg.lr_grid_extend)
    found["trials"] = [{"lr": t["lr"], "dev_final": t["dev_final"], "seconds": t["seconds"]} for t in found["trials"]]
    return {"target": target, "arm": arm, "split": "dev", "dev_rows": cfg.dev_rows, "seed": cfg.search_seed,
            "criterion": f"final dev {METRIC}", **found}


def summarize(runs: list[dict], searches: list[dict]) -> list[dict]:
    rows = []
    for target in dict.fromkeys(r["target"] for r in runs):
        for arm in dict.fromkeys(r["arm"] for r in runs):
            mine = [r for r in runs if r["target"] == target and r["arm"] == arm]
            if not mine:
                continue
            search = next(s for s in searches if s["target"] == target and s["arm"] == arm)
            converters = [r["converter"] for r in mine]
            rows.append({"target": target, "arm": arm, "seeds": [r["seed"] for r in mine], "lr": search["chosen_lr"],
                         "at_grid_edge": search["at_grid_edge"],
                         "method": sorted({str(c["method"]) for c in converters}),
                         "reason": converters[0]["reason"], "pairs": converters[0]["pairs"],
                         "heldout_pairs": converters[0]["heldout_pairs"], "scored_pairs": converters[0]["scored_pairs"],
                         **{key: spread([c[key] for c in converters])
                            for key in ("heldout_cosine", "cosine_all", "retrieval_accuracy")},
                         **{key: spread([r[key] for r in mine]) for key in ("start", "final", "best", "seconds")}})
    return rows


def run(cfg: InitBenchConfig, zoo: dict, tmp: Path, work_dir: Path | None, log=print) -> dict:
    """Build the targets that are parts beside the zoo, the dev split and the corpus; search every arm's lr on
    every target, then run every seed; return the result."""
    from transformers import AutoTokenizer

    from vpgtrans.demo import vocab, world2
    from vpgtrans.demo.zoo2 import LLMS, TOKENIZER_LINES, char_llm

    unknown = sorted((set(cfg.targets) - {*LLMS, CHAR_TARGET}) | (set(cfg.arms) - set(ARMS)))
    if unknown:
        raise SystemExit(f"unknown targets or arms {unknown}; targets: {[*LLMS, CHAR_TARGET]}, arms: {list(ARMS)}")
    started = time.perf_counter()
    zoo = dict(zoo)
    built = {}
    if CHAR_TARGET in cfg.targets:
        zoo[CHAR_TARGET], built[CHAR_TARGET] = char_llm(zoo, cfg.zoo_seed, cfg.target_steps, log)
    world = Path(zoo["world"])
    data = {"eval": world / "caption_eval", "corpus": tmp / "captions.txt",
            "dev": world2.make_split(tmp / "caption_dev", "caption", cfg.dev_rows, seed=20_000 + cfg.zoo_seed)}
    data["corpus"].write_text("".join(json.loads(line)["caption"] + "\n"
                                      for line in (world / "caption_train" / "data.jsonl").open()))
    data["budgets"] = {t: text_budget(zoo[t], [world / "caption_train", data["eval"], data["dev"]])
                       for t in cfg.targets}
    source_tokenizer = AutoTokenizer.from_pretrained(zoo["source"])
    corpus = world2.text_corpus(TOKENIZER_LINES, cfg.zoo_seed)
    overlap = {t: vocab.vocabulary_overlap(source_tokenizer, AutoTokenizer.from_pretrained(zoo[t]), corpus)
               for t in cfg.targets}
    protocol = {k: v for k, v in asdict(cfg).items()
                if k not in ("targets", "arms", "seeds", "lr_grid", "lr_grid_extend")}
    records = RunRecords(None if work_dir is None else work_dir / "records",
                         {"protocol": protocol,
                          "zoo": without_times(json.loads((Path(zoo["root"]) / "zoo.json").read_text())),
                          "built": without_times(built)})
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        searches = [search_lr(cfg, zoo, target, arm, tmp / "runs", data, records, log)
                    for target in cfg.targets for arm in cfg.arms]
        runs = []
        for search in searches:
            for seed in cfg.seeds:
                target, arm, lr = search["target"], search["arm"], search["chosen_lr"]
                log(f"converter init bench: {target} {arm} seed {seed} lr {lr:g}")
                runs.append(records.get(f"{target}-{arm}-seed{seed}-lr{lr:g}", lambda: run_arm(
                    cfg, zoo, target, arm, seed, lr, tmp / "runs" / f"{target}-{arm}-seed{seed}", data)))
    finally:
        torch.set_num_threads(threads)
    return {"benchmark": "converter_init", "config": asdict(cfg),
            "machine": {**machine_info(), "torch_threads": cfg.threads}, "targets_built": built, "overlap": overlap,
            "text_budgets": data["budgets"], "lr_search": searches, "runs": runs, "summary": summarize(runs, searches),
            "records": {"kept": records.root is not None, "reused": records.reused, "identity": records.digest},
            "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "seconds": round(time.perf_counter() - started, 1)}


def _converter(row: dict) -> str:
    method = "/".join(row["method"])
    return "none" if method == "None" else f"{method} ({row['pairs']} pairs)"


def markdown(result: dict) -> str:
    """The ``docs/benchmarks.md`` section, from a result JSON."""
    cfg = result["config"]
    loads = [x for r in result["runs"] for x in (r["loadavg_before"][0], r["loadavg_after"][0])]
    lines = docs_preamble(
        "converter_init", DOCS_BEGIN, result,
        f"{cfg['warmup_steps']} warm-up + {cfg['finetune_steps']} fine-tune steps of batch {cfg['batch_size']}, "
        f"CIDEr on {cfg['eval_samples']} eval captions every {cfg['eval_every']} steps; seeds {cfg['seeds']}, "
        f"{cfg['threads']} torch thread(s), 1-minute load average {min(loads):.2f}–{max(loads):.2f} at the runs' "
        "starts and ends. Means over seeds (min–max).")
    for target, overlap in result["overlap"].items():
        lines.append(f"- `{target}`: {overlap['target_vocab']} tokens against the source's {overlap['source_vocab']}; "
                     f"{overlap['shared']} shared ({overlap['exact'] + overlap['lowercase']} by text, "
                     f"{overlap['byte']} by bytes, {overlap['special']} special by role; "
                     f"{overlap['shared_multi_character']} of two characters or more), making "
                     f"{overlap['source_occurrence_share']:.1%} of the source's and "
                     f"{overlap['target_occurrence_share']:.1%} of the target's tokens over the world text; captions up to {result['text_budgets'][target]} "
                     "tokens." + _built(result["targets_built"].get(target)))
    lines += ["", "| target | arm | converter (pairs fitted on) | held-out cosine | retrieval among the true pairs | "
                  "CIDEr at step 0 | final CIDEr | best CIDEr | lr (dev search) |", "|---|---|---|---|---|---|---|---|---|"]
    for row in result["summary"]:
        retrieval = "—" if row["scored_pairs"] is None else \
            f"{fmt_spread(row['retrieval_accuracy'])} of {row['scored_pairs']}" + \
            (" (in-sample)" if row["method"] == ["shared-tokens"] else "")
        cosine = "—" if row["heldout_cosine"]["mean"] is None else \
            f"{fmt_spread(row['heldout_cosine'])} on {row['heldout_pairs']}"
        lr = f"{row['lr']:g}" + (" (grid edge)" if row["at_grid_edge"] else "")
        lines.append(f"| {row['target']} | {row['arm']} | {_converter(row)} | {cosine} | {retrieval} | "
                     f"{fmt_spread(row['start'])} | {fmt_spread(row['final'])} | {fmt_spread(row['best'])} | {lr} |")
    for row in result["summary"]:
        if row["arm"] == "auto":
            lines += ["", f"`auto` on {row['target']} picked {'/'.join(row['method'])}: {row['reason']}."]
    lines += ["", "lr search (final dev CIDEr per lr): " + "; ".join(
        f"{s['target']} {s['arm']} " + ", ".join(f"{t['lr']:g}: {t['dev_final']:.3f}" for t in s["trials"])
        for s in result["lr_search"]) + ".", "", DOCS_END]
    return "\n".join(lines)


def _built(record: dict | None) -> str:
    if not record:
        return ""
    metrics = record.get("metrics") or {}
    if not metrics:
        return " Not pre-trained (0 steps)."
    return (f" Pre-trained {record['settings']['spec']['steps']} steps: final loss {metrics['final_loss']}, "
            f"attribute words copied {metrics['copy_accuracy']:.3f} (teacher-forced, every character right).")


def render(result: dict):
    from rich.table import Table

    table = Table(title=f"projector init through the word converter: {METRIC} (mean over seeds)")
    for column in ("target", "arm", "converter", "held-out cosine", "retrieval", f"{METRIC} at step 0",
                   f"final {METRIC}", f"best {METRIC}", "lr"):
        table.add_column(column, justify="left" if column in ("target", "arm", "converter") else "right")
    for row in result["summary"]:
        table.add_row(row["target"], row["arm"], _converter(row), fmt_spread(row["heldout_cosine"]),
                      fmt_spread(row["retrieval_accuracy"]), fmt_spread(row["start"]), fmt_spread(row["final"]),
                      fmt_spread(row["best"]), f"{row['lr']:g}")
    return table


def plot(result: dict, path: Path) -> Path:
    return plot_curves_by_target(result, path, METRIC)


def main(argv: list[str] | None = None) -> dict:
    parser = result_parser("converter_init", __doc__, "random-weight tiny zoo, a few steps (plumbing only)",
                           InitBenchConfig)
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="record every finished run and lr-search trial here and reuse them (resume); "
                             "default: nothing kept")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="zoo cache (default $VPGTRANS_CACHE or ~/.cache/vpgtrans)")
    parser.add_argument("--write-docs", action="store_true",
                        help="after a full run, regenerate this benchmark's section of docs/benchmarks.md")
    parser.add_argument("--docs-from", type=Path, default=None,
                        help="only regenerate the docs section from this result JSON (no run)")
    args = parser.parse_args(argv)
    if args.docs_from is not None:
        result = json.loads(args.docs_from.read_text())
        print(f"wrote {write_docs_section(markdown(result), DOCS_BEGIN, DOCS_END)}")
        return result
    cfg = result_config(args, InitBenchConfig, SMOKE)
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="vpgtrans-converter-init-") as tmp:
        zoo = zoo_v2(args, cfg.zoo_seed, Path(tmp))
        result = {"smoke": args.smoke, **run(cfg, zoo, Path(tmp), args.work_dir)}
    out = save_result("converter_init", args, result, plot)
    if args.write_docs and not args.smoke:
        print(f"wrote {write_docs_section(markdown(result), DOCS_BEGIN, DOCS_END)}")
    from rich.console import Console

    Console(width=170).print(render(result))
    print(f"results: {out} ({result['seconds']:.0f}s)")
    return result


if __name__ == "__main__":
    main()
