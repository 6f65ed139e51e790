"""The benchmark zoo (``zoo-v2``): world v2 (2-3 objects, 48-pixel images), a ViT pre-trained as a masked
patch autoencoder, OPT-style "S" and "L" LLMs sharing a tokenizer, a LLaMA-style LLM with another
tokenizer, and a source BLIP-2 on opt-s **trained to convergence** — the expensive asset a transfer
reuses (DESIGN §5). ``zoo-v1`` (``vpgtrans.demo.zoo``) stays as it is for ``vpgtrans demo``.

``build_zoo_v2()`` builds it deterministically from a seed and caches it under
``$VPGTRANS_CACHE/zoo-v2/seed{seed}`` (``python -m benchmarks.build_zoo``); ``build_tiny_zoo_v2()``
writes the same layout with random weights and a tiny world in seconds, for smoke tests. Layout::

    zoo.json                 seed, sizes, metrics (LM copy accuracy, ViT reconstruction, source scores), times
    world/                   world2.make_world(): caption_train, caption_eval, vqa_train, vqa_eval
    vision/                  Blip2VisionModel (+ image processor), masked-patch-autoencoder pre-training
    opt-s/, opt-l/, llama-s/ causal LMs + tokenizers, pre-trained on scene-then-text sequences
    source-blip2-opt-s/      Blip2ForConditionalGeneration (vision + VPG + opt-s) + Blip2Processor
    qformer-stage1/          the same layout, its VPG from BLIP-2 first-stage pre-training (no LLM; fresh
                             projector): the paper's train-from-scratch start. Built on first use by
                             ``stage1_qformer()`` (a cached zoo without it stays valid), stage1.json beside it
    source-blip2-opt-s-long/ the source's recipe trained longer (``long_source()``, ``--source-steps`` of
                             transfer_speedup), built on first use, build.json beside it
    llama-s-chars/           llama-s with a character-level tokenizer (few tokens shared with the source's),
                             built on first use by ``char_llm()``, build.json beside it
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

from vpgtrans.demo import world, world2, zoo_parts
from vpgtrans.demo.zoo import SOURCE_NAME, default_cache_dir, evaluate_blip2
from vpgtrans.demo.zoo_parts import LLMSpec
from vpgtrans.errors import VpgtransError

logger = logging.getLogger(__name__)
ZOO_VERSION = "zoo-v2"
NUM_QUERY_TOKENS = 12
MAX_POSITIONS = 128  # K soft prompts + BOS + a three-object caption fit with room to spare
WORLD_SIZES = {"full": (6000, 200), "tiny": (16, 8)}  # (n_train, n_eval) per task
LLMS = {
    "opt-s": LLMSpec("opt", 64, 2, 256, 4, steps=1000, lr=5e-3),
    "opt-l": LLMSpec("opt", 128, 4, 512, 4, steps=700, lr=3e-3),
    "llama-s": LLMSpec("llama", 96, 2, 384, 4, steps=700, lr=5e-3),
}
LM_PAIRS = 30000
TOKENIZER_LINES = 5000  # world text the tokenizers are trained on
VISION = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4,
          "image_size": world2.IMAGE_SIZE, "patch_size": 8, "initializer_range": 0.02}  # HF's default is 1e-10
QFORMER = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
           "cross_attention_frequency": 1, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
VISION_IMAGES, VISION_STEPS = 6000, 800
SOURCE_IMAGES, SOURCE_STEPS, SOURCE_LR = 16000, 8000, 2e-3
STAGE1 = {"full": dict(steps=3000, batch_size=64, lr=2e-3, eval_count=200, eval_every=250),
          "tiny": dict(steps=2, batch_size=4, lr=2e-3, eval_count=4, eval_every=0)}
STAGE1_DIR = "qformer-stage1"
CHAR_LLM_DIR = "llama-s-chars"
LONG_SOURCE_DIR = "source-blip2-opt-s-long"
CHAR_MAX_POSITIONS = 384  # in characters: the longest pre-training sequence is ~330, a caption ~150
MIN_SOURCE_ACCURACY = 0.5  # caption attribute accuracy below which a build is not cached
PARTS = ("vision", "source", *LLMS)
SPLITS = ("caption_train", "caption_eval", "vqa_train", "vqa_eval")


def zoo_paths(root: Path) -> dict[str, Path]:
    root = Path(root)
    return {"root": root, "vision": root / "vision", "source": root / SOURCE_NAME,
            **{name: root / name for name in LLMS}, "world": root / "world"}


def _is_complete(root: Path) -> bool:
    paths = zoo_paths(root)
    return (root / "zoo.json").is_file() and all((paths[k] / "config.json").is_file() for k in PARTS) \
        and all((paths["world"] / split / "data.jsonl").is_file() for split in SPLITS)


def _source_examples(tokenizer, image_token_id: int, captions: list[str]) -> list[tuple[int, list[int], list[int]]]:
    """(feature row, input_ids with <image> x K, labels) in BLIP-2 OPT's caption format."""
    return [(i, *zoo_parts.source_example(tokenizer, "caption", caption, None, NUM_QUERY_TOKENS, image_token_id))
            for i, caption in enumerate(captions)]


def _build(root: Path, seed: int, trained: bool, log) -> dict:
    """Write every zoo directory under ``root``; returns the zoo.json record (without paths)."""
    from vpgtrans.images import build_image_processor
    from vpgtrans.demo import pretrain

    paths = zoo_paths(root)
    record: dict = {"zoo_version": ZOO_VERSION, "seed": seed, "trained": trained, "params": {}, "metrics": {},
                    "seconds": {}}
    lap = zoo_parts.stopwatch(record["seconds"], log, "zoo-v2")

    n_train, n_eval = WORLD_SIZES["full" if trained else "tiny"]
    splits = world2.make_world(paths["world"], n_train=n_train, n_eval=n_eval, seed=seed)
    tokenizers = zoo_parts.train_tokenizers(world2.text_corpus(TOKENIZER_LINES, seed))
    image_processor = build_image_processor(world2.IMAGE_SIZE)
    lap("world+tokenizers")

    pairs = world2.text_pairs(LM_PAIRS, seed) if trained else None
    eval_pairs = world2.text_pairs(200, 10_000 + seed) if trained else None
    llms = {}
    for i, (name, spec) in enumerate(LLMS.items()):
        llms[name], metrics = zoo_parts.build_llm(paths[name], spec, tokenizers[spec.family], seed * 1000 + i,
                                                  MAX_POSITIONS, pairs=pairs, eval_pairs=eval_pairs)
        record["metrics"].update({f"{name}/{k}": v for k, v in metrics.items()})
        record["params"][name] = zoo_parts.count_params(llms[name])
        lap(name)

    vision = zoo_parts.new_vision(VISION, seed * 1000 + 10)
    if trained:
        pixel_values = pretrain.generic_vision_dataset(VISION_IMAGES, seed, world2.IMAGE_SIZE, image_processor)
        scores = pretrain.pretrain_vision_generic(vision, pixel_values, VISION_STEPS, seed=seed)
        record["metrics"].update({f"vision/{k}": round(v, 4) for k, v in scores.items()})
    zoo_parts.save_vision(paths["vision"], vision, image_processor)
    record["params"]["vision"] = zoo_parts.count_params(vision)
    lap("vision")

    tokenizer = zoo_parts.source_tokenizer(tokenizers["opt"])
    source, trainable, frozen, loss = _train_source(vision, llms["opt-s"], tokenizer, image_processor, seed,
                                                    SOURCE_STEPS if trained else 0)
    log(f"zoo-v2: source BLIP-2 trains {trainable:,} parameters (VPG + projector); {frozen:,} frozen (ViT, LLM)")
    record["params"]["source_vpg"] = trainable
    if trained:
        record["metrics"]["source/final_loss"] = round(loss, 4)
        record["metrics"]["source/steps"] = SOURCE_STEPS
        record["metrics"]["source/samples"] = SOURCE_STEPS * 64
    zoo_parts.save_source(paths["source"], source, image_processor, tokenizer)
    record["params"]["source"] = zoo_parts.count_params(source)
    lap("source")

    if trained:
        record["metrics"].update({f"source/{k}": v for k, v in _source_scores(paths["source"], splits).items()})
        lap("evaluation")
    return record


def _train_source(vision, llm, tokenizer, image_processor, seed: int, steps: int, images: int = SOURCE_IMAGES):
    """The source BLIP-2 (zoo-v2's init for ``seed``) with its VPG + projector trained ``steps`` steps of 64 on the
    source's own pre-training scenes (``images`` fresh ones, not the benchmark's train split; none when ``steps``
    is 0). Returns (model, trainable, frozen, mean loss of the last 20 steps or None)."""
    from vpgtrans.demo import pretrain

    source = zoo_parts.new_source(vision, llm, tokenizer, seed * 1000 + 20, NUM_QUERY_TOKENS, QFORMER)
    trainable, frozen = pretrain.set_vpg_trainable(source)
    if not steps:
        return source, trainable, frozen, None
    scenes = _source_scenes(seed, images)
    pixel_values = image_processor(images=[world.render_scene(s, world2.IMAGE_SIZE) for s in scenes],
                                   return_tensors="pt")["pixel_values"]
    features = pretrain.vision_features(source.vision_model, pixel_values)
    examples = _source_examples(tokenizer, source.config.image_token_id, [world2.caption_for(s) for s in scenes])
    loss = pretrain.train_source(source, features, examples, tokenizer.pad_token_id, steps, lr=SOURCE_LR, seed=seed)
    return source, trainable, frozen, loss


def _source_scores(source_dir: Path, splits: dict) -> dict:
    """The source's caption and VQA scores on the world's eval splits (``caption_eval/...``, ``vqa_eval/...``)."""
    scores = {}
    for task in ("caption", "vqa"):
        found = evaluate_blip2(source_dir, splits[f"{task}_eval"], max_new_tokens=40,
                               caption_scorer=world2.caption_accuracy)
        scores.update({f"{task}_eval/{k}": v for k, v in found.items() if k != "examples"})
    return scores


def _source_scenes(seed: int, n: int) -> list[dict]:
    """The source's own pre-training scenes (fresh, not the benchmark's train split)."""
    rng = random.Random(f"vpgtrans-source2:{seed}")
    return [world2.sample_scene(rng) for _ in range(n)]


def stage1_qformer(paths: dict[str, Path], seed: int = 0, log=None) -> tuple[Path, dict]:
    """``paths["root"]/qformer-stage1``: a Q-Former given BLIP-2's first-stage pre-training (ITC + ITM,
    ``vpgtrans.demo.stage1``) on the source's own pre-training images and captions, without any LLM, saved in
    the source's layout with a fresh projector; built once and cached beside the zoo's other parts.
    A tiny zoo (``zoo.json`` ``trained`` false) gets a 2-step run on a few scenes. Returns (directory, record)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Blip2VisionModel

    from vpgtrans.demo import stage1
    from vpgtrans.images import build_image_processor

    root = Path(paths["root"])
    trained = json.loads((root / "zoo.json").read_text())["trained"]
    settings = STAGE1["full" if trained else "tiny"]
    log = log or logger.info

    def build(out: Path) -> dict:
        with zoo_parts.quiet(threads=1):
            vision = Blip2VisionModel.from_pretrained(paths["vision"])
            opt_tokenizer = AutoTokenizer.from_pretrained(paths["opt-s"])
            scenes = _source_scenes(seed, SOURCE_IMAGES if trained else 16)
            image_processor = build_image_processor(world2.IMAGE_SIZE)
            pixel_values = image_processor(images=[world.render_scene(s, world2.IMAGE_SIZE) for s in scenes],
                                           return_tensors="pt")["pixel_values"]
            model = stage1.stage1_model(vision, opt_tokenizer, QFORMER, NUM_QUERY_TOKENS, seed * 1000 + 30)
            scores = stage1.pretrain_stage1(model, opt_tokenizer, pixel_values, [world2.caption_for(s) for s in scenes],
                                            seed=seed, log=log, **settings)
            llm = AutoModelForCausalLM.from_pretrained(paths["opt-s"])
            source_tokenizer = zoo_parts.source_tokenizer(opt_tokenizer)
            source = stage1.to_source(model, llm, source_tokenizer, seed * 1000 + 31, NUM_QUERY_TOKENS, QFORMER)
            zoo_parts.save_source(out, source, image_processor, source_tokenizer)
        log(f"zoo-v2: stage-1 Q-Former held-out retrieval top-1 {scores['retrieval_top1']:.3f} "
            f"(chance {scores['chance']:.3f})")
        return {"seed": seed, "data": f"the source's {len(scenes)} pre-training scenes", "losses": ["itc", "itm"],
                "metrics": scores, "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}

    return zoo_parts.cached_part(root / STAGE1_DIR, "stage1.json", settings, build, log)


def long_source(paths: dict[str, Path], steps: int, seed: int = 0, log=None) -> tuple[Path, dict]:
    """``paths["root"]/source-blip2-opt-s-long``: the zoo's source recipe (same init, ViT, opt-s, pre-training
    scenes, lr, cosine to 0) trained ``steps`` steps of 64 instead of ``SOURCE_STEPS``: a stronger source for
    ``transfer_speedup --source-steps`` (issue 13: how much of the speed-up is the source's quality?). Its
    record (``build.json``) has the source's caption and VQA scores on the world's eval splits and its final
    loss. Built on first use, cached beside the zoo's parts, rebuilt when ``steps`` changes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Blip2VisionModel

    from vpgtrans.images import build_image_processor

    trained = json.loads((Path(paths["root"]) / "zoo.json").read_text())["trained"]
    settings = {"recipe": "zoo-v2 source", "steps": steps, "batch_size": 64, "lr": SOURCE_LR,
                "images": SOURCE_IMAGES if trained else 16, "seed": seed}  # a tiny zoo: a few scenes

    def build(out: Path) -> dict:
        with zoo_parts.quiet(threads=1):
            vision = Blip2VisionModel.from_pretrained(paths["vision"])
            llm = AutoModelForCausalLM.from_pretrained(paths["opt-s"])
            tokenizer = zoo_parts.source_tokenizer(AutoTokenizer.from_pretrained(paths["opt-s"]))
            image_processor = build_image_processor(world2.IMAGE_SIZE)
            source, trainable, _, loss = _train_source(vision, llm, tokenizer, image_processor, seed, steps,
                                                       settings["images"])
            zoo_parts.save_source(out, source, image_processor, tokenizer)
            scores = _source_scores(out, {split: Path(paths["world"]) / split for split in SPLITS}) if trained else {}
        return {"metrics": {"final_loss": loss, "samples": steps * 64, **scores}, "trainable_params": trainable}

    return zoo_parts.cached_part(Path(paths["root"]) / LONG_SOURCE_DIR, "build.json", settings, build,
                                 log or logger.info)


def char_llm(paths: dict[str, Path], seed: int = 0, steps: int | None = None, log=None) -> tuple[Path, dict]:
    """``paths["root"]/llama-s-chars``: llama-s's shape (width, depth, heads, FFN) and pre-training recipe (its
    text pairs, lr, batch, steps unless ``steps`` says otherwise; 0: untrained, for smoke runs) with a
    character-level tokenizer (``vocab.train_char_tokenizer`` on the zoo's tokenizer text): a target whose
    vocabulary shares few tokens with the source's — single characters only, every word spelt out (issue 12).
    Its record (``build.json``) has the overlap (``vocab.vocabulary_overlap`` on that text), the pre-training
    loss and the copy accuracy of attribute words (``pretrain.lm_word_copy_accuracy``). Built on first use,
    cached beside the zoo's parts, rebuilt when its settings change. Returns (directory, record)."""
    from dataclasses import asdict, replace

    from transformers import AutoTokenizer

    from vpgtrans.demo import pretrain, vocab

    spec = replace(LLMS["llama-s"], steps=LLMS["llama-s"].steps if steps is None else steps)
    settings = {"recipe": "zoo-v2 llama-s", "tokenizer": "characters", "spec": asdict(spec), "seed": seed,
                "tokenizer_lines": TOKENIZER_LINES, "pairs": LM_PAIRS if spec.steps else 0,
                "max_positions": CHAR_MAX_POSITIONS}

    def build(out: Path) -> dict:
        corpus = world2.text_corpus(TOKENIZER_LINES, seed)
        tokenizer = vocab.train_char_tokenizer(corpus)
        overlap = vocab.vocabulary_overlap(AutoTokenizer.from_pretrained(paths["source"]), tokenizer, corpus)
        with zoo_parts.quiet(threads=1):
            model, metrics = zoo_parts.build_llm(
                out, spec, tokenizer, seed * 1000 + 40, CHAR_MAX_POSITIONS,
                pairs=world2.text_pairs(LM_PAIRS, seed) if spec.steps else None,
                eval_pairs=world2.text_pairs(200, 10_000 + seed), copy_accuracy=pretrain.lm_word_copy_accuracy)
        return {"overlap": overlap, "metrics": metrics, "params": zoo_parts.count_params(model)}

    return zoo_parts.cached_part(Path(paths["root"]) / CHAR_LLM_DIR, "build.json", settings, build,
                                 log or logger.info)


def _quiet_build(root: Path, seed: int, trained: bool, log) -> dict:
    """``_build`` on one thread (on a shared 2-core machine, two threads make these small matmuls several
    times slower), with transformers' per-model warnings silenced, settings restored."""
    with zoo_parts.quiet(threads=1):
        return _build(root, seed, trained, log)


def build_tiny_zoo_v2(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """zoo-v2's layout with random weights and an 16/8-row world, in a few seconds (smoke tests)."""
    started = time.perf_counter()
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    record = _quiet_build(root, seed, trained=False, log=lambda message: None)
    zoo_parts.write_record(root, record, started, zoo_paths(root))
    return zoo_paths(root)


def build_zoo_v2(cache_dir: Path | None = None, seed: int = 0, force: bool = False, log=None) -> dict[str, Path]:
    """The trained benchmark zoo for ``seed``, built once (several minutes on 2 CPU cores) and cached
    under ``cache_dir/zoo-v2/seed{seed}``; a complete cached zoo is returned at once unless ``force``.
    Built in a temporary directory and renamed into place, like ``zoo.build_zoo``."""
    root = Path(cache_dir or default_cache_dir()) / ZOO_VERSION / f"seed{seed}"
    if not force and _is_complete(root):
        return zoo_paths(root)
    log = log or logger.info
    started = time.perf_counter()
    with zoo_parts.staging_dir(root) as tmp:
        record = _quiet_build(tmp, seed, trained=True, log=log)
        accuracy = record["metrics"]["source/caption_eval/attribute_accuracy"]
        if accuracy < MIN_SOURCE_ACCURACY:
            raise VpgtransError(f"zoo-v2 build (seed {seed}): the source BLIP-2 reaches only {accuracy:.2f} caption "
                                f"attribute accuracy (< {MIN_SOURCE_ACCURACY}); not caching it")
        zoo_parts.write_record(tmp, record, started, zoo_paths(tmp))
        zoo_parts.install(tmp, root, replace=force, is_complete=_is_complete)
    log(f"zoo-v2: built {root} in {time.perf_counter() - started:.1f}s")
    return zoo_paths(root)
