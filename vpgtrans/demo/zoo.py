"""The tiny model zoo: two tokenizers, three LLMs, a ViT and a source BLIP-2, built offline from a seed.

``build_zoo()`` trains everything (about a minute and a half on 2 CPU cores) once and caches it under
``$VPGTRANS_CACHE`` (default ``~/.cache/vpgtrans``) ``/zoo-v1/seed{seed}``; ``build_tiny_models()``
writes the same directories with random weights in a few seconds, for tests that need formats, not
quality. Layout (every model directory loads with ``transformers`` alone)::

    zoo.json                 what was built: seed, sizes, metrics, build time, library versions
    world/                   make_world(): caption_train, caption_eval, vqa_train, vqa_eval
    vision/                  Blip2VisionModel (+ its image processor), pre-trained on world images
    opt-s/, opt-l/           OPTForCausalLM + the OPT-style tokenizer
    llama-s/                 LlamaForCausalLM + the LLaMA-style tokenizer
    source-blip2-opt-s/      Blip2ForConditionalGeneration (vision + VPG + opt-s) + Blip2Processor

OPT vocabularies are padded to a multiple of 64, as OPT pads 50265 tokens to 50272 rows; the source
BLIP-2's ``<image>`` token takes a spare row, so its LLM is opt-s weight for weight.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from vpgtrans.demo import world, zoo_parts
from vpgtrans.demo.zoo_parts import LLMSpec
from vpgtrans.errors import VpgtransError

logger = logging.getLogger(__name__)
ZOO_VERSION = "zoo-v1"
IMAGE_SIZE = 32
NUM_QUERY_TOKENS = 8
SOURCE_NAME = "source-blip2-opt-s"
WORLD_SIZES = {"full": (2000, 200), "tiny": (16, 8)}  # (n_train, n_eval) per task
MIN_SOURCE_ACCURACY = 0.8  # a trained zoo whose source captions worse than this is not cached
LLMS = {
    "opt-s": LLMSpec("opt", 64, 2, 256, 4, steps=600, lr=5e-3),
    "opt-l": LLMSpec("opt", 128, 3, 512, 4, steps=250, lr=3e-3),
    "llama-s": LLMSpec("llama", 96, 2, 256, 4, steps=250, lr=5e-3),
}
VISION = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
          "image_size": IMAGE_SIZE, "patch_size": 8, "initializer_range": 0.02}  # HF's default init is 1e-10
QFORMER = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
           "cross_attention_frequency": 1, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
VISION_STEPS, SOURCE_STEPS = 600, 600


def default_cache_dir() -> Path:
    return Path(os.environ.get("VPGTRANS_CACHE") or Path.home() / ".cache" / "vpgtrans")


def zoo_paths(root: Path) -> dict[str, Path]:
    root = Path(root)
    return {"root": root, "vision": root / "vision", "source": root / SOURCE_NAME,
            **{name: root / name for name in LLMS}, "world": root / "world"}


def _is_complete(root: Path) -> bool:
    paths = zoo_paths(root)
    models = [paths[k] for k in ("vision", "source", *LLMS)]
    return (root / "zoo.json").is_file() and all((p / "config.json").is_file() for p in models) \
        and all((paths["world"] / split / "data.jsonl").is_file() for split in
                ("caption_train", "caption_eval", "vqa_train", "vqa_eval"))


# ---------------------------------------------------------------------------------------------- build

def _build(root: Path, seed: int, trained: bool, log) -> dict:
    """Write every zoo directory under ``root``; returns the zoo.json record (without paths)."""
    from vpgtrans.images import build_image_processor
    from vpgtrans.demo import pretrain

    paths = zoo_paths(root)
    record: dict = {"zoo_version": ZOO_VERSION, "seed": seed, "trained": trained, "params": {}, "metrics": {},
                    "seconds": {}}
    lap = zoo_parts.stopwatch(record["seconds"], log, "zoo")

    n_train, n_eval = WORLD_SIZES["full" if trained else "tiny"]
    splits = world.make_world(paths["world"], n_train=n_train, n_eval=n_eval, seed=seed, image_size=IMAGE_SIZE)
    tokenizers = zoo_parts.train_tokenizers(world.world_text_corpus(5000, seed))
    image_processor = build_image_processor(IMAGE_SIZE)
    lap("world+tokenizers")

    pairs = world.world_text_pairs(20000, seed) if trained else None
    eval_pairs = world.world_text_pairs(200, 10_000 + seed) if trained else None
    llms = {}
    for i, (name, spec) in enumerate(LLMS.items()):
        llms[name], metrics = zoo_parts.build_llm(paths[name], spec, tokenizers[spec.family], seed * 1000 + i,
                                                  pairs=pairs, eval_pairs=eval_pairs)
        record["metrics"].update({f"{name}/{k}": v for k, v in metrics.items()})
        record["params"][name] = zoo_parts.count_params(llms[name])
        lap(name)

    vision = zoo_parts.new_vision(VISION, seed * 1000 + 10)
    if trained:
        pixel_values, labels = pretrain.vision_dataset(6200, seed, IMAGE_SIZE, image_processor)
        accuracy = pretrain.pretrain_vision(vision, pixel_values, labels, VISION_STEPS, seed=seed)
        record["metrics"].update({f"vision/{a}_accuracy": round(v, 4) for a, v in accuracy.items()})
    zoo_parts.save_vision(paths["vision"], vision, image_processor)
    record["params"]["vision"] = zoo_parts.count_params(vision)
    lap("vision")

    tokenizer = zoo_parts.source_tokenizer(tokenizers["opt"])
    source = zoo_parts.new_source(vision, llms["opt-s"], tokenizer, seed * 1000 + 20, NUM_QUERY_TOKENS, QFORMER)
    trainable, frozen = pretrain.set_vpg_trainable(source)
    log(f"zoo: source BLIP-2 trains {trainable:,} parameters (VPG + projector); {frozen:,} frozen (ViT, LLM)")
    record["params"]["source_vpg"] = trainable
    if trained:
        features, examples = _source_data(source, tokenizer, image_processor, splits)
        loss = pretrain.train_source(source, features, examples, tokenizer.pad_token_id, SOURCE_STEPS, seed=seed)
        record["metrics"]["source/final_loss"] = round(loss, 4)
    zoo_parts.save_source(paths["source"], source, image_processor, tokenizer)
    record["params"]["source"] = zoo_parts.count_params(source)
    lap("source")

    if trained:
        for task in ("caption", "vqa"):
            scores = evaluate_blip2(paths["source"], splits[f"{task}_eval"])
            record["metrics"].update({f"source/{task}_eval/{k}": v for k, v in scores.items() if k != "examples"})
        lap("evaluation")
    return record


def _source_data(source, tokenizer, image_processor, splits: dict[str, Path]):
    """Frozen-ViT features of the caption and VQA training images, and the token examples that point
    at them: (feature row, input_ids with <image> x K, labels), in BLIP-2 OPT's text format."""
    from PIL import Image

    from vpgtrans.collate import most_common_answer
    from vpgtrans.demo import pretrain

    image_id = source.config.image_token_id
    images, examples = [], []
    for task in ("caption", "vqa"):
        split_dir = splits[f"{task}_train"]
        for row in _read_rows(split_dir):
            with Image.open(split_dir / row["image"]) as image:
                images.append(image.convert("RGB"))
            target = row["caption"] if task == "caption" else most_common_answer(row["answers"])
            ids, labels = zoo_parts.source_example(tokenizer, task, target, row.get("question"), NUM_QUERY_TOKENS,
                                                   image_id)
            examples.append((len(images) - 1, ids, labels))
    pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
    return pretrain.vision_features(source.vision_model, pixel_values), examples


def _read_rows(split_dir: Path) -> list[dict]:
    with open(Path(split_dir) / "data.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def evaluate_blip2(model_dir: str | Path, split_dir: str | Path, batch_size: int = 100,
                   max_new_tokens: int = 24, caption_scorer=None) -> dict:
    """Score an HF BLIP-2 directory on a world split through the plain ``transformers`` path
    (``Blip2Processor`` + ``generate``). Captions: ``caption_scorer`` (default ``world.caption_accuracy``);
    VQA: ``vqa_accuracy``
    (min(#annotators agreeing / 3, 1)) and ``exact`` (= the most common answer)."""
    import torch
    from PIL import Image
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from vpgtrans.collate import most_common_answer

    processor = Blip2Processor.from_pretrained(model_dir)
    model = Blip2ForConditionalGeneration.from_pretrained(model_dir).eval()
    rows = _read_rows(Path(split_dir))
    task = "vqa" if "question" in rows[0] else "caption"
    predictions = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        images = []
        for row in batch:
            with Image.open(Path(split_dir) / row["image"]) as image:
                images.append(image.convert("RGB"))
        text = [f"Question: {row['question']} Answer:" for row in batch] if task == "vqa" else None
        inputs = processor(images=images, text=text, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        if "input_ids" in inputs and out.shape[1] >= inputs["input_ids"].shape[1] \
                and torch.equal(out[:, :inputs["input_ids"].shape[1]], inputs["input_ids"]):
            out = out[:, inputs["input_ids"].shape[1]:]  # generate echoed the prompt
        predictions += [t.strip() for t in processor.batch_decode(out, skip_special_tokens=True)]
    if task == "caption":
        scores = (caption_scorer or world.caption_accuracy)(predictions, rows)
    else:
        vqa = [min(row["answers"].count(p) / 3, 1.0) for p, row in zip(predictions, rows)]
        exact = [p == most_common_answer(row["answers"]) for p, row in zip(predictions, rows)]
        scores = {"vqa_accuracy": sum(vqa) / len(rows), "exact": sum(exact) / len(rows), "n": len(rows)}
        for kind in sorted({row["answer_type"] for row in rows}):
            picked = [e for e, row in zip(exact, rows) if row["answer_type"] == kind]
            scores[f"exact_{kind}"] = sum(picked) / len(picked)
    scores = {k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()}
    scores["examples"] = predictions[:5]
    return scores


# ------------------------------------------------------------------------------------------ public API

def _quiet_build(root: Path, seed: int, trained: bool, log) -> dict:
    """``_build`` on 2 threads, with transformers' per-model warnings silenced, settings restored."""
    with zoo_parts.quiet(threads=2):
        return _build(root, seed, trained, log)


def build_tiny_models(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """The zoo's directories with random (untrained) weights and a 16/8-row world, in a few seconds:
    for tests of formats and plumbing, not quality. Same keys as ``build_zoo``."""
    started = time.perf_counter()
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    record = _quiet_build(root, seed, trained=False, log=lambda message: None)
    zoo_parts.write_record(root, record, started, zoo_paths(root))
    return zoo_paths(root)


def build_zoo(cache_dir: Path | None = None, seed: int = 0, force: bool = False, log=None) -> dict[str, Path]:
    """The trained zoo for ``seed``, built once (about 100 s on 2 CPU cores) and cached under
    ``cache_dir/zoo-v1/seed{seed}``; a complete cached zoo is returned at once unless ``force``.

    Built in a temporary directory beside the cache entry and renamed into place, so a reader never
    sees a half-built zoo and two concurrent builds both end with a complete one.
    """
    root = Path(cache_dir or default_cache_dir()) / ZOO_VERSION / f"seed{seed}"
    if not force and _is_complete(root):
        return zoo_paths(root)
    log = log or logger.info  # progress lines: one per part built
    started = time.perf_counter()
    with zoo_parts.staging_dir(root) as tmp:
        record = _quiet_build(tmp, seed, trained=True, log=log)
        accuracy = record["metrics"]["source/caption_eval/attribute_accuracy"]
        if accuracy < MIN_SOURCE_ACCURACY:
            raise VpgtransError(f"zoo build (seed {seed}): the source BLIP-2 reaches only {accuracy:.2f} caption "
                                f"attribute accuracy (< {MIN_SOURCE_ACCURACY}); not caching it — try another seed")
        zoo_parts.write_record(tmp, record, started, zoo_paths(tmp))
        zoo_parts.install(tmp, root, replace=force, is_complete=_is_complete)
    log(f"zoo: built {root} in {time.perf_counter() - started:.1f}s")
    return zoo_paths(root)
