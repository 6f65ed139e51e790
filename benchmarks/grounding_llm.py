"""The grounding benchmark's target LLM, ``llama-s-boxes`` (``benchmarks.grounding_pool``'s docstring says why and
how): its pre-training text about scenes and boxes, its build beside the zoo, and its own grounding from a scene
written out in words (the ceiling of a connector with the LLM frozen).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

# The benchmark's grounding prompt (after the soft prompts and BOS), the box LLM's pre-training text and its
# bundles' template alike. zoo-v2's tokenizer learnt "square?", "circle?", ... as tokens of their own (its corpus
# ends every question that way), so the toolkit's default "Where is the red square? Box:" would hand the LLM a
# shape token that never occurs in a scene; the space keeps the shape word the scene's token.
GROUNDING_PROMPT = "Where is {question} ? Box:"


def box_text_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (context, text) LM pre-training pairs: a world-v2 scene as the zoo's attribute list, then
    ``GROUNDING_PROMPT`` + box for one object named as the grounding split names it."""
    from vpgtrans.demo import world, world2
    from vpgtrans.demo.grounding_world import expression_for
    from vpgtrans.grounding import format_box

    rng = random.Random(f"vpgtrans-grounding-lm:{seed}")
    pairs = []
    while len(pairs) < n:
        objects = world2.sample_scene(rng)["objects"]
        named = [(obj, expression_for(obj, objects[:i] + objects[i + 1:])) for i, obj in enumerate(objects)]
        named = [(obj, text) for obj, text in named if text is not None]
        if named:
            obj, text = rng.choice(named)
            pairs.append((world._context({"objects": objects}, rng),
                          f"{GROUNDING_PROMPT.format(question=text)} {format_box(obj['box'])}"))
    return pairs


def text_grounding(model, tokenizer, pairs: list[tuple[str, str]], max_new_tokens: int = 28) -> dict:
    """The LLM's own grounding from scenes written out in words (``box_text_pairs``): greedy box after
    ``[scene][BOS]Where is ...? Box:``, scored at IoU >= 0.5 and mean IoU (unparseable: IoU 0)."""
    import torch

    from vpgtrans.grounding import grounding_accuracy, parse_box

    predictions, truths = [], []
    model.eval()
    for context, text in pairs:
        question, truth = text.split(" Box: ")
        ids = (tokenizer(context, add_special_tokens=False)["input_ids"] + [tokenizer.bos_token_id]
               + tokenizer(f"{question} Box:", add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
        predictions.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).split("\n")[0])
        truths.append(parse_box(truth))
    scores = grounding_accuracy(predictions, truths)
    return {"text_acc_iou50": scores["acc_iou50"], "text_mean_iou": scores["mean_iou"],
            "text_unparseable": scores["unparseable"], "text_n": scores["n"]}


def box_llm(zoo: dict, seed: int, trained: bool, cfg, log=print) -> tuple[Path, dict]:
    """``llama-s-boxes`` beside the zoo, sized and trained as ``cfg`` (a ``GroundingConfig``) says, built once and
    reused while its record matches; a tiny (untrained) zoo gets an untrained one."""
    from dataclasses import replace

    from transformers import AutoTokenizer

    from vpgtrans.demo import world2, zoo2, zoo_parts

    out = Path(zoo["root"]) / "llama-s-boxes"
    spec = replace(zoo2.LLMS["llama-s"], steps=cfg.box_llm_steps, hidden_size=cfg.box_llm_hidden,
                   num_layers=cfg.box_llm_layers, ffn_dim=4 * cfg.box_llm_hidden)
    fraction = cfg.box_fraction
    want = {"trained": trained, "seed": seed, "box_fraction": fraction, "pairs": zoo2.LM_PAIRS, "steps": spec.steps,
            "lr": spec.lr, "base": "zoo-v2 llama-s recipe", "prompt": GROUNDING_PROMPT}
    if (spec.hidden_size, spec.num_layers) != (zoo2.LLMS["llama-s"].hidden_size, zoo2.LLMS["llama-s"].num_layers):
        want.update(hidden_size=spec.hidden_size, num_layers=spec.num_layers)  # (llama-s's size: records as before)
    record_path = Path(zoo["root"]) / "box_llm.json"
    if record_path.is_file() and (out / "config.json").is_file():
        record = json.loads(record_path.read_text())
        if {k: record.get(k) for k in want} == want:
            return out, record
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(zoo["llama-s"])
    pairs = eval_pairs = None
    if trained:
        boxes = round(zoo2.LM_PAIRS * fraction)
        pairs = world2.text_pairs(zoo2.LM_PAIRS - boxes, seed) + box_text_pairs(boxes, seed)
        random.Random(f"vpgtrans-box-llm:{seed}").shuffle(pairs)
        eval_pairs = box_text_pairs(200, 10_000 + seed)
    staging = out.with_name(f".{out.name}.{os.getpid()}")
    model, metrics = zoo_parts.build_llm(staging, spec, tokenizer, seed * 1000 + 2, zoo2.MAX_POSITIONS, pairs=pairs,
                                         eval_pairs=eval_pairs)
    if trained:
        metrics.update(text_grounding(model, tokenizer, eval_pairs))
    shutil.rmtree(out, ignore_errors=True)
    os.rename(staging, out)
    record = {**want, "metrics": metrics, "seconds": round(time.perf_counter() - started, 1)}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    log(f"grounding_pool: llama-s-boxes built in {record['seconds']:.0f}s: {metrics}")
    return out, record
