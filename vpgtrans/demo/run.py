"""``vpgtrans demo``: a complete transfer on tiny models and a synthetic world this package makes
itself (no network): the tiny zoo's BLIP-2 (OPT-style LLM) VPG moves to a LLaMA-style LLM with a
different tokenizer, and a VPG is trained from scratch on the same LLM for the same few steps. Evaluated
on held-out captions.

It is a smoke run of the whole pipeline, not a speed-up measure: the scratch arm is a short, untuned
baseline (see ``comparable`` in the summary); ``benchmarks/transfer_speedup.py`` is the fair comparison."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from vpgtrans.config import TrainConfig

DEMO_TARGET = "llama-s"
DEMO_STEPS = {"warmup": 40, "finetune": 80}
DEMO_BATCH = 16
DEMO_EVAL_SAMPLES = 64
FAIR_COMPARISON = "python -m benchmarks.transfer_speedup (docs/benchmarks.md)"


def run_demo(out_dir: Path | None = None, force: bool = False, progress=None, log=print,
             steps: dict[str, int] | None = None, cache_dir: Path | None = None, zoo: dict | None = None) -> dict:
    """Build (or reuse) the tiny zoo, run VPGTrans and the scratch baseline, return a summary. ``zoo``: the
    paths of a zoo to use instead (``build_zoo``'s keys; tests pass ``build_tiny_models``')."""
    from vpgtrans.demo.zoo import build_zoo
    from vpgtrans.stages.transfer import transfer

    steps = {**DEMO_STEPS, **(steps or {})}
    started = time.time()
    if zoo is None:
        log("building the tiny model zoo (cached after the first run)...")
        zoo = build_zoo(cache_dir)
    world = Path(zoo["world"])
    out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="vpgtrans-demo-")) / "run"
    common = dict(eval_data=world / "caption_eval", force=force, progress=progress)
    # Every arm is evaluated at its step 0 (the untrained start) and then every eval_every steps.
    eval_kwargs = {"eval_every": max(1, steps["finetune"] // 4), "eval_max_samples": DEMO_EVAL_SAMPLES}
    warmup = TrainConfig.warmup(max_steps=steps["warmup"], batch_size=DEMO_BATCH, **eval_kwargs)
    finetune = TrainConfig.finetune(max_steps=steps["finetune"], batch_size=DEMO_BATCH, **eval_kwargs)
    scratch = TrainConfig.finetune(max_steps=steps["warmup"] + steps["finetune"], batch_size=DEMO_BATCH, **eval_kwargs)

    log(f"VPGTrans: {zoo['source'].name} -> {DEMO_TARGET} (inherit, warm-up {steps['warmup']} steps, "
        f"fine-tune {steps['finetune']} steps)...")
    vpgtrans_run = transfer(zoo["source"], zoo[DEMO_TARGET], world / "caption_train", out_dir / "vpgtrans",
                            warmup_config=warmup, finetune_config=finetune, **common)
    log(f"short baseline: a random VPG trained on {DEMO_TARGET} for the same {steps['warmup'] + steps['finetune']} "
        f"steps (not a speed-up measure)...")
    scratch_run = transfer(zoo["source"], zoo[DEMO_TARGET], world / "caption_train", out_dir / "scratch",
                           finetune_config=scratch, from_scratch=True, **common)
    return summarize(zoo, out_dir, steps, vpgtrans_run, scratch_run, scratch, round(time.time() - started, 1))


def _scores(point: dict) -> dict:
    return {key: value for key, value in point.items() if key not in ("step", "samples", "stage")}


def summarize(zoo: dict, out_dir: Path, steps: dict[str, int], vpgtrans_run: dict, scratch_run: dict,
              scratch: TrainConfig, seconds: float) -> dict:
    """The demo's summary: one row per arm and point, each with a ``note`` on what it may be compared with,
    and ``comparable``: what the table shows and what it does not (in the words the table prints)."""
    total = steps["warmup"] + steps["finetune"]
    # Both step-0 points come from the same evaluation inside training: the untrained starts, side by side.
    inherited, random_start = vpgtrans_run["curve"][0], scratch_run["curve"][0]
    warmup_schedule = "no lr warm-up" if not (scratch.warmup_steps or scratch.warmup_fraction) else "an lr warm-up"
    scratch_note = (f"NOT a fair baseline: {total} steps at lr {scratch.lr:g} (not tuned), random Q-Former, "
                    f"{warmup_schedule}")
    comparable = {
        "speedup_measure": False,
        "shows": (f"the pipeline runs end to end (inherit -> warm-up -> fine-tune -> eval); with no training, "
                  f"the inherited VPG scores CIDEr {inherited['cider']:.3f} against {random_start['cider']:.3f} "
                  "for a random one, on the same eval"),
        "not_comparable": (f"the scratch row with the VPGTrans rows. The scratch arm is a short-budget baseline "
                           f"({total} steps at the fine-tune recipe's lr {scratch.lr:g}, not tuned for it; a random "
                           f"Q-Former; {warmup_schedule}), not the paper's train-from-scratch (TFS), whose Q-Former "
                           "had BLIP-2's first-stage pre-training; the frozen vision encoder was pre-trained on "
                           "the caption attributes themselves; one seed. No speed-up can be read from this "
                           "table"),
        "fair_comparison": FAIR_COMPARISON,
    }
    return {
        "zoo": str(zoo["root"]),
        "out_dir": str(out_dir),
        "target": DEMO_TARGET,
        "converter": vpgtrans_run["metrics"]["inherit"].get("converter", {}),
        "rows": [
            {"arm": "random VPG + projector (no training)", "steps": 0, **_scores(random_start),
             "note": "the scratch arm's start"},
            {"arm": "inherited VPG + converter init (no training)", "steps": 0, **_scores(inherited),
             "note": "VPGTrans's start; compare with the row above"},
            {"arm": "VPGTrans: after warm-up", "steps": steps["warmup"],
             **vpgtrans_run["metrics"]["warmup"]["eval"], "note": ""},
            {"arm": "VPGTrans: after fine-tune", "steps": total,
             **vpgtrans_run["metrics"]["finetune"]["eval"], "note": ""},
            {"arm": "train from scratch, short (same steps)", "steps": total,
             **scratch_run["metrics"]["scratch"]["eval"], "note": scratch_note},
        ],
        "comparable": comparable,
        "curves": {"vpgtrans": vpgtrans_run["curve"], "scratch": scratch_run["curve"]},
        "final_bundle": vpgtrans_run["final_bundle"],
        "seconds": seconds,
    }


def render_summary(summary: dict):
    """A rich table of the demo's scores, with what may and may not be compared."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"vpgtrans demo — caption eval on held-out synthetic images (target: {summary['target']})")
    for column in ("arm", "steps", "CIDEr", "BLEU-4", "comparable?"):
        table.add_column(column, justify="right" if column in ("steps", "CIDEr", "BLEU-4") else "left")
    for row in summary["rows"]:
        table.add_row(row["arm"], str(row["steps"]), f"{row['cider']:.3f}", f"{row['bleu4']:.3f}", row["note"])
    converter, comparable = summary["converter"], summary["comparable"]
    notes = Text(
        f"Shows: {comparable['shows']}.\n"
        f"Not comparable: {comparable['not_comparable']}.\n"
        f"The fair VPGTrans vs train-from-scratch comparison: {comparable['fair_comparison']}.\n"
        f"converter: {converter.get('pairs', 0)} shared-token pairs, held-out cosine "
        f"{converter.get('heldout_cosine', float('nan')):.3f}\n"
        f"final bundle: {summary['final_bundle']}\n"
        f"export it: vpgtrans export {summary['final_bundle']} --format hf --out <dir>\n"
        f"took {summary['seconds']} s")
    return Group(table, notes)
