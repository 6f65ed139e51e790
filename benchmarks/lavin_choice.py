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

Each arm gets its own learning-rate search: every lr of its grid (``lavin_lrs`` for lavin and
text-only, ``blip2_lrs`` for blip2: five lrs a factor ~3 apart, one decade more than the first run's
three-lr grids, whose picks all sat at the lower edge) trains with seed ``seeds[0]`` and is scored on a
**dev** split (its own seed, disjoint from train and eval) at the end of training only (no eval curve, no
generation: what the pick needs); the best dev accuracy (``accuracy``, the summed-likelihood pick; its
length-normalised ``accuracy_norm`` is recorded beside it) picks the lr, then every seed trains at that lr
and is scored on the eval split. Nothing is tuned on the eval split. A pick at either end of its grid
extends the grid one step of its end ratio, up to ``lr_grid_extend`` times (the same rule for every arm,
``benchmarks.common.search_lr_grid``); ``lr_search.<arm>.chosen_at_edge`` says whether the final pick still
sits at an end. Cost: 24 trainings (15 search trials, 9 runs) and up to 3 extension trials, the trials
without eval curve and generation; measured 2,329 s at 1200 steps on one thread beside other jobs.

**Answer format** (``choice_answer``, default ``text``): the models are trained to answer, and scored
on, ``The answer is <the option's words>`` (``--choice-answer text``), not LaVIN's ``The answer is <letter>``.
The zoo's tiny LLMs were pre-trained on the demo world's lower-case text, so capital letters are
SentencePiece byte-fallback tokens whose embedding and LM-head rows never trained; the first full run, in
the letter format, had every arm answer one constant letter (accuracy = that letter's share of the eval
split): a frozen LLM with a few thousand adapter parameters could not map image content to an untrained
token. The option words (``red``, ``circle``, ``top-left``) are the words the LLMs were pre-trained on. The
prompt still lists lettered options (``Options: (A) red (B) blue``). ``--choice-answer letter`` runs the
first run's protocol.

Answers are read by **likelihood** (``eval --choice-scoring likelihood``), two picks from one forward pass:
``accuracy`` (lm-evaluation-harness's ``acc``) is the option whose ``The answer is ...`` has the highest
summed log-probability (the shared ``The answer is`` counts the same for every option; with ``text``, an
option of fewer tokens is favoured: ``top`` over ``top-left``); ``accuracy_norm`` (the harness's ``acc_norm``)
is the option with the highest log-probability of its own tokens (after ``The answer is``) per UTF-8 byte of
its text, which removes that bias. Generation accuracy and the unparseable count are reported beside them.

Reported per arm (mean, min, max over seeds): final accuracy on image questions, on text-only questions
and overall, summed and length-normalised (``accuracy_norm``, ``accuracy_norm_image``,
``accuracy_norm_text``), the same by generation with its unparseable answers, trainable parameters, wall
seconds, and the optimizer steps to reach ``target_accuracy`` overall (``accuracy``) on the eval curve (None
when never reached; the curve has ``accuracy_norm`` too). Per run, ``predicted_options``: how often each
option was answered on the eval split, by position (``A``, ``B``, ..., ``unparseable``) and by option text,
for likelihood (``likelihood``, ``likelihood_norm``) and for generation; the summary's
``top_position_share`` (``top_position_share_norm``, ``generated_top_position_share``) is the share of
answers on the most answered position (1.0: one constant answer;
unparseable answers count in the total, never as a position), to be read beside the eval split's own
answer distribution (``eval_answers``).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.common import (docs_preamble, fmt_spread, machine_info, result_config, result_parser, save_result,
                               search_lr_grid, spread, write_docs_section)

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
    steps: int = 1200  # optimizer steps of every arm (blip2: warm-up included); at 300 LaVIN was 0.07 above guessing
    warmup_steps: int = 120  # blip2's projector warm-up (at 5x its lr, as the vpgtrans recipe)
    # lavin and text-only; the lavin recipe's own lr at batch 16 is 9e-3 x 16/256 = 5.6e-4
    lavin_lrs: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3, 1e-2, 3e-2])
    blip2_lrs: list[float] = field(default_factory=lambda: [3e-5, 1e-4, 3e-4, 1e-3, 3e-3])  # vpgtrans recipe: 1e-4
    n_dev: int = 120  # the lr search's split
    lr_grid_extend: int = 1  # lrs added beyond an edge pick, each one step of the grid's end ratio further
    eval_every: int = 200
    target_accuracy: float = 0.6
    max_new_tokens: int = 24
    choice_answer: str = "text"  # the answer format trained and scored: "text" or "letter" (see the docstring)


SMOKE = {"seeds": [0], "n_train": 12, "n_eval": 6, "n_dev": 6, "batch_size": 4, "steps": 2, "warmup_steps": 1,
         "eval_every": 1, "max_new_tokens": 4, "lavin_lrs": [1e-2], "blip2_lrs": [1e-3], "lr_grid_extend": 0}


def make_splits(root: Path, cfg: ChoiceConfig) -> dict[str, Path]:
    from vpgtrans.demo.choices import make_choice_split, strip_images

    splits = {name: make_choice_split(root / name, n, 3 * cfg.zoo_seed + offset, text_fraction=cfg.text_fraction)
              for offset, (name, n) in enumerate((("train", cfg.n_train), ("eval", cfg.n_eval), ("dev", cfg.n_dev)))}
    for name in ("train", "eval", "dev"):
        splits[f"{name}-text"] = strip_images(splits[name], root / f"{name}-text")
    return splits


def run_arm(arm: str, seed: int, lr: float, zoo: dict, splits: dict, work: Path, cfg: ChoiceConfig,
            scored_on: str = "eval", search: bool = False) -> dict:
    """One arm, one seed, one lr: train (eval curve on ``scored_on``), then score the final bundle there
    by question kind. ``search``: an lr-search trial, scored by likelihood at the end only (no curve, no
    generation)."""
    from vpgtrans.config import InheritConfig
    from vpgtrans.recipes import stage
    from vpgtrans.stages.transfer import transfer

    text = arm == "text-only"
    suffix = "-text" if text else ""
    train, evaluation = splits["train" + suffix], splits[scored_on + suffix]
    common = {"batch_size": cfg.batch_size, "seed": seed, "eval_every": cfg.eval_every, "eval_max_samples": cfg.n_eval,
              "max_new_tokens": cfg.max_new_tokens, "choice_scoring": "likelihood", "choice_answer": cfg.choice_answer}
    if arm == "blip2":
        configs = {"warmup_config": stage("vpgtrans", "warmup").config(lr=5 * lr, max_steps=cfg.warmup_steps, **common),
                   "finetune_config": stage("vpgtrans", "finetune").config(
                       lr=lr, min_lr=lr / 2, max_steps=cfg.steps - cfg.warmup_steps, **common)}
        inherit_config = InheritConfig(connector="linear")
    else:
        configs = {"finetune_config": stage("lavin", "finetune").config(lr=lr, max_steps=cfg.steps, **common)}
        inherit_config = InheritConfig(connector="lavin", seed=seed)
    out = work / f"{arm}-seed{seed}-lr{lr:g}"
    shutil.rmtree(out, ignore_errors=True)  # a killed earlier run's leftovers would stop transfer
    started = time.perf_counter()
    summary = transfer(zoo["source"], zoo[cfg.target], train, out, eval_data=None if search else evaluation,
                       inherit_config=inherit_config, force=True, **configs)
    seconds = time.perf_counter() - started
    final = Path(summary["final_bundle"])
    manifest = json.loads((final / "manifest.json").read_text())
    curve = [{"step": p["step"], "accuracy": p["accuracy"], "accuracy_image": p.get("accuracy_image"),
              "accuracy_norm": p.get("accuracy_norm")} for p in summary["curve"]]
    reached = next((p["step"] for p in curve if p["accuracy"] >= cfg.target_accuracy), None)
    steps = sum(metrics["train"]["steps"] for name, metrics in summary["metrics"].items() if name != "inherit")
    scores, predicted = final_scores(final, splits, scored_on, text, cfg, generate=not search)
    return {"arm": arm, "seed": seed, "lr": lr, "scored_on": scored_on, "curve": curve, "final": scores,
            "predicted_options": predicted, "trainable_params": manifest["metrics"]["train"]["trainable"],
            "steps": steps, "seconds": round(seconds, 1), "steps_to_target": reached}


def final_scores(bundle: Path, splits: dict, split: str, text: bool, cfg: ChoiceConfig,
                 generate: bool = True) -> tuple[dict, dict]:
    """Scores on ``split``'s questions, split by whether the question came with an image (the text-only
    arm sees none, but its image questions are still the image questions): by likelihood (summed, and
    length-normalised as ``accuracy_norm*``), and by generation (``generated_*``, with the unparseable
    answers; unless not ``generate``); and, for each pick, the histogram of the options answered
    (``vpgtrans.multiple_choice.option_histogram``; ``likelihood``, ``likelihood_norm``, ``generate``)."""
    from vpgtrans import load_model
    from vpgtrans.data import load_rows
    from vpgtrans.evaluate import evaluate_model
    from vpgtrans.multiple_choice import multiple_choice_scores, option_histogram

    rows = list(load_rows(splits[split + ("-text" if text else "")])[0])
    had_image = [r["image"] is not None for r in load_rows(splits[split])[0]]
    model = load_model(bundle, device="cpu")
    scores, predicted = {}, {}
    for how, prefix in (("likelihood", ""), ("generate", "generated_"))[:2 if generate else 1]:
        result = evaluate_model(model, rows, "multiple-choice", batch_size=32, max_new_tokens=cfg.max_new_tokens,
                                choice_scoring=how, choice_answer=cfg.choice_answer)
        references = [{**ref, "image": image} for ref, image in zip(result["references"], had_image)]
        norm = result.get("predictions_norm")  # (likelihood only)
        scores.update({prefix + k: v for k, v in
                       multiple_choice_scores(result["predictions"], references, cfg.choice_answer, norm).items()})
        predicted[how] = option_histogram(result["predictions"], references, cfg.choice_answer)
        if norm is not None:
            predicted[how + "_norm"] = option_histogram(norm, references, cfg.choice_answer)
    return scores, predicted


def answer_histogram(split: Path, cfg: ChoiceConfig) -> dict:
    """The split's right answers counted as ``predicted_options`` counts predictions (by position, by option
    text): the accuracy of always answering one position or one word."""
    from vpgtrans.data import load_rows
    from vpgtrans.multiple_choice import option_histogram, target_text

    rows = list(load_rows(split)[0])
    return option_histogram([target_text(r["answer"], r["choices"], cfg.choice_answer) for r in rows],
                            [{"num_choices": len(r["choices"]), "choices": r["choices"]} for r in rows],
                            cfg.choice_answer)


def chance_levels(split: Path) -> dict:
    """What the image questions and the text-only questions of ``split`` give without reading anything:
    ``guessing`` (the mean of 1 / number of options) and ``best_constant`` (always answering the position
    that is right most often), each with the question count."""
    from vpgtrans.data import load_rows

    rows = list(load_rows(split)[0])
    levels = {}
    for kind, picked in (("image", [r for r in rows if r.get("image") is not None]),
                         ("text", [r for r in rows if r.get("image") is None])):
        if picked:
            counts = [sum(r["answer"] == i for r in picked) for i in range(max(len(r["choices"]) for r in picked))]
            levels[kind] = {"n": len(picked), "guessing": sum(1 / len(r["choices"]) for r in picked) / len(picked),
                            "best_constant": max(counts) / len(picked)}
    return levels


def top_share(histogram: dict) -> float | None:
    """The share of all answers that went to the most answered position (1.0: every answer the same
    position); None when no answer named an option."""
    counts = histogram["by_position"]
    named = [count for key, count in counts.items() if key != "unparseable"]
    return max(named) / sum(counts.values()) if named else None


def search_lr(arm: str, zoo: dict, splits: dict, work: Path, cfg: ChoiceConfig) -> dict:
    """The arm's lr: the best final dev accuracy over its grid, extended beyond an edge pick up to
    ``lr_grid_extend`` times, seed ``seeds[0]`` (ties: the smaller lr). The summed-likelihood ``accuracy``
    decides, as before ``accuracy_norm`` was recorded beside it."""
    grid = cfg.blip2_lrs if arm == "blip2" else cfg.lavin_lrs
    return search_lr_grid(sorted(grid), lambda lr: run_arm(arm, cfg.seeds[0], lr, zoo, splits, work / "search", cfg,
                                                           scored_on="dev", search=True),
                          lambda t: t["final"]["accuracy"], cfg.lr_grid_extend)


def summarize(runs: list[dict]) -> dict:
    by_arm: dict[str, list[dict]] = {}
    for run in runs:
        by_arm.setdefault(run["arm"], []).append(run)
    return {arm: {"seeds": [r["seed"] for r in rs],
                  "lr": rs[0]["lr"],
                  **{key: spread([r["final"][key] for r in rs]) for key in
                     ("accuracy", "accuracy_image", "accuracy_text", "accuracy_norm", "accuracy_norm_image",
                      "accuracy_norm_text", "generated_accuracy", "generated_unparseable")},
                  "top_position_share": spread([top_share(r["predicted_options"]["likelihood"]) for r in rs]),
                  "top_position_share_norm": spread([top_share(r["predicted_options"]["likelihood_norm"])
                                                      for r in rs]),
                  "generated_top_position_share": spread([top_share(r["predicted_options"]["generate"]) for r in rs]),
                  "trainable_params": rs[0]["trainable_params"],
                  "seconds": spread([r["seconds"] for r in rs]),
                  "steps_to_target": spread([r["steps_to_target"] for r in rs])}
            for arm, rs in by_arm.items()}


DOCS_BEGIN, DOCS_END = "<!-- lavin_choice:begin -->", "<!-- lavin_choice:end -->"


def markdown(result: dict) -> str:
    """The ``docs/benchmarks.md`` table of a result JSON: every arm over seeds, with its lr search."""
    cfg = result["config"]
    lines = docs_preamble("lavin_choice", DOCS_BEGIN, result,
                          f"answers `{cfg['choice_answer']}`, read by likelihood; target `{cfg['target']}`, "
                          f"{cfg['steps']} steps of batch {cfg['batch_size']}; eval {cfg['n_eval']} questions; seeds "
                          f"{cfg['seeds']}. Means over seeds (min–max); *norm* = the length-normalised pick.")
    lines += ["| arm | trainable parameters | lr (dev accuracy per lr) | accuracy, image questions | "
              "image, norm | accuracy, text-only questions | accuracy, all | all, norm | generated: unparseable "
              "| most answered position's share | seconds |", "|" + "---|" * 11]
    for arm, block in result["summary"].items():
        search = result["lr_search"][arm]
        trials = ", ".join(f"{t['lr']:g}: {t['accuracy']:.3f}" for t in search["trials"])
        edge = ", grid edge" if search.get("chosen_at_edge") else ""
        lines.append(f"| {arm} | {block['trainable_params']:,} | {search['chosen']:g}{edge} ({trials}) | "
                     f"{fmt_spread(block['accuracy_image'])} | {fmt_spread(block['accuracy_norm_image'])} | "
                     f"{fmt_spread(block['accuracy_text'])} | {fmt_spread(block['accuracy'])} | "
                     f"{fmt_spread(block['accuracy_norm'])} | {fmt_spread(block['generated_unparseable'], 1)} | "
                     f"{fmt_spread(block['top_position_share'], 2)} | {fmt_spread(block['seconds'], 0)} |")
    answers = result["eval_answers"]["by_position"]
    lines += ["", "The eval split's right answers by position: " + ", ".join(
        f"{k} {v}" for k, v in sorted(answers.items())) + f" (always answering the commonest position scores "
        f"{max(answers.values()) / sum(answers.values()):.3f})." + "".join(
        f" {kind.capitalize()} questions ({level['n']}): guessing scores {level['guessing']:.3f}, always answering the "
        f"commonest right position {level['best_constant']:.3f}." for kind, level in result.get("eval_chance", {}).items()),
        "", DOCS_END]
    return "\n".join(lines)


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
    parser.add_argument("--write-docs", action="store_true",
                        help="after a full run, regenerate the table in docs/benchmarks.md from its JSON")
    parser.add_argument("--docs-from", type=Path, default=None,
                        help="only regenerate the docs table from this result JSON (no run)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="zoo cache (default $VPGTRANS_CACHE or ~/.cache/vpgtrans)")
    args = parser.parse_args(argv)
    if args.docs_from is not None:
        result = json.loads(args.docs_from.read_text())
        print(f"wrote {write_docs_section(markdown(result), DOCS_BEGIN, DOCS_END)}")
        return result
    cfg = result_config(args, ChoiceConfig, SMOKE)
    unknown = sorted(set(cfg.arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
    from vpgtrans.config import CHOICE_ANSWERS

    if cfg.choice_answer not in CHOICE_ANSWERS:
        parser.error(f"--choice-answer must be one of {', '.join(CHOICE_ANSWERS)} (got {cfg.choice_answer!r})")
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
        search = {arm: search_lr(arm, zoo, splits, work, cfg) for arm in cfg.arms}
        runs = [run_arm(arm, seed, search[arm]["chosen_lr"], zoo, splits, work / "runs", cfg)
                for seed in cfg.seeds for arm in cfg.arms]
        eval_answers = answer_histogram(splits["eval"], cfg)
        chance = chance_levels(splits["eval"])
    lr_search = {arm: {"chosen": found["chosen_lr"], "grid": found["grid"], "extended": found["extended"],
                       "chosen_at_edge": found["at_grid_edge"] if len(found["grid"]) > 1 else None,
                       "trials": [{"lr": t["lr"],
                                   **{k: t["final"][k] for k in ("accuracy", "accuracy_image", "accuracy_text",
                                                                 "accuracy_norm", "accuracy_norm_image",
                                                                 "accuracy_norm_text")},
                                   "predicted_options": t["predicted_options"]["likelihood"],
                                   "predicted_options_norm": t["predicted_options"]["likelihood_norm"]}
                                  for t in found["trials"]]}
                 for arm, found in search.items()}
    result = {"benchmark": "lavin_choice", "smoke": args.smoke, "config": asdict(cfg), "machine": machine_info(),
              "lr_search": lr_search, "eval_answers": eval_answers, "eval_chance": chance, "runs": runs, "summary": summarize(runs),
              "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "seconds": round(time.perf_counter() - started, 1)}
    path = save_result("lavin_choice", args, result, plot)
    if args.write_docs and not args.smoke:
        print(f"wrote {write_docs_section(markdown(result), DOCS_BEGIN, DOCS_END)}")
    print(json.dumps(result["summary"], indent=2))
    print(f"written to {path}")
    return result


if __name__ == "__main__":
    main()
