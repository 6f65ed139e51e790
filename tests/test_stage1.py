"""BLIP-2 first-stage pre-training of the demo Q-Former (vpgtrans.demo.stage1): it learns, its retrieval score
is what transformers' own Blip2ForImageTextRetrieval forward gives, and its VPG lands in a source model."""

from __future__ import annotations

import random

import pytest
import torch

from vpgtrans.demo import stage1, world, world2, zoo_parts
from vpgtrans.images import build_image_processor

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
              patch_size=8, initializer_range=0.02)
# initializer_range 0.1, not BERT's 0.02: at width 32 a 0.02 init leaves the text's first-token output almost
# independent of the text (ITC stuck at ln(batch)), and whether 200 steps break out of that depended on the
# float summation order (stuck on an Intel Xeon with 1 thread, learning with 2 or on an AMD EPYC).
QFORMER = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               cross_attention_frequency=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
               initializer_range=0.1)
HELD = 50


@pytest.fixture(scope="module")
def pairs():
    tokenizer = zoo_parts.train_tokenizers(world2.text_corpus(300, 0))["opt"]
    rng = random.Random(0)
    scenes = [world.sample_scene(rng, max_objects=1) for _ in range(650)]
    pixel_values = build_image_processor(32)(images=[world.render_scene(s, 32) for s in scenes],
                                             return_tensors="pt")["pixel_values"]
    return tokenizer, pixel_values, [world2.caption_for(s) for s in scenes]


def _hf_top1(model, tokenizer, pixel_values, captions) -> float:
    """Image -> text top-1 through transformers' own ITC forward (ViT run on pixels, its own pooling)."""
    input_ids, mask = stage1.tokenize(tokenizer, captions)
    with torch.no_grad():
        logits = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=mask).logits_per_image  # (N, N)
    picked = logits.argmax(1).tolist()
    return sum(captions[j] == captions[i] for i, j in enumerate(picked)) / len(captions)


def test_stage1_learns_retrieval_above_chance(pairs):
    tokenizer, pixel_values, captions = pairs
    torch.manual_seed(0)
    with zoo_parts.quiet(threads=1):
        model = stage1.stage1_model(zoo_parts.new_vision(VISION, 10), tokenizer, QFORMER, 4, seed=0)
        before = _hf_top1(model, tokenizer, pixel_values[-HELD:], captions[-HELD:])
        frozen_vit = {k: v.clone() for k, v in model.vision_model.encoder.state_dict().items()}
        scores = stage1.pretrain_stage1(model, tokenizer, pixel_values, captions, steps=200, batch_size=32, lr=5e-3,
                                        eval_count=HELD)
        after = _hf_top1(model, tokenizer, pixel_values[-HELD:], captions[-HELD:])
    assert scores["chance"] == 1 / HELD and scores["samples"] == 200 * 32
    assert scores["retrieval_top1"] == pytest.approx(after)  # our ITC path == transformers' forward
    assert after >= 5 / HELD > before + 1 / HELD  # chance is 1/50: five times it, from about chance
    assert all(torch.equal(v, model.vision_model.encoder.state_dict()[k]) for k, v in frozen_vit.items())


def test_stage1_vpg_goes_into_a_source_model_with_the_text_ffn_left_out(pairs):
    from transformers import AutoModelForCausalLM

    from vpgtrans.demo.zoo_parts import LLMSpec, llm_config, source_tokenizer

    tokenizer, _, _ = pairs
    model = stage1.stage1_model(zoo_parts.new_vision(VISION, 10), tokenizer, QFORMER, 4, seed=0)
    llm = AutoModelForCausalLM.from_config(llm_config(LLMSpec("opt", 16, 1, 32, 2, 1, 1e-3), tokenizer))
    source = stage1.to_source(model, llm, source_tokenizer(tokenizer), seed=1, num_query_tokens=4, qformer=QFORMER)
    assert torch.equal(source.query_tokens, model.query_tokens)
    assert torch.equal(source.vision_model.post_layernorm.weight, model.vision_model.post_layernorm.weight)
    mine, theirs = source.qformer.state_dict(), model.qformer.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in mine.items())
    left_out = sorted(set(theirs) - set(mine))
    assert left_out and all(".intermediate." in k or (".output." in k and "attention" not in k) for k in left_out)


def test_the_zoo_stage1_part_is_what_the_scratch_arm_inherits(tmp_path):
    """zoo2.stage1_qformer's directory, inherited with no converter: the bundle's VPG is the stage-1 Q-Former's
    (queries and Q-Former weights), its projector fresh and of the target's width; the part is cached."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from vpgtrans.bundle import CONNECTOR_FILE, VPG_FILE, load_tensors
    from vpgtrans.config import InheritConfig
    from vpgtrans.demo.zoo2 import build_tiny_zoo_v2, stage1_qformer
    from vpgtrans.stages.inherit import inherit

    zoo = build_tiny_zoo_v2(tmp_path / "zoo")
    stage1_dir, record = stage1_qformer(zoo, seed=0, log=lambda message: None)
    assert record["metrics"]["steps"] == 2 and record["losses"] == ["itc", "itm"]
    assert stage1_qformer(zoo, seed=0, log=lambda m: pytest.fail(f"rebuilt: {m}"))[0] == stage1_dir  # cached
    bundle = inherit(stage1_dir, zoo["llama-s"], tmp_path / "inherit", InheritConfig(converter="none"))
    source = load_file(str(stage1_dir / "model.safetensors"))
    vpg = load_tensors(bundle, VPG_FILE)
    queries = [v for k, v in vpg.items() if "query_tokens" in k]
    assert len(queries) == 1 and torch.equal(queries[0], source["query_tokens"])
    qformer = {k: v for k, v in source.items() if k.startswith("qformer.")}
    assert qformer and all(any(torch.equal(w, v) for v in vpg.values()) for w in qformer.values())
    # a fresh projector of the target's width (the stage-1 source's is opt-s's)
    proj = load_tensors(bundle, CONNECTOR_FILE)["proj.weight"]
    assert proj.shape[0] == AutoConfig.from_pretrained(zoo["llama-s"]).hidden_size
    assert source["language_projection.weight"].shape[0] == AutoConfig.from_pretrained(zoo["opt-s"]).hidden_size


def test_the_zoo_long_source_is_its_source_recipe_trained_longer(tmp_path):
    """zoo2.long_source (transfer_speedup --source-steps): at 0 steps it is the zoo's source to the bit (same
    init, ViT and LLM); trained, only the VPG and projector move; its record has the steps and is cached."""
    from safetensors.torch import load_file

    from vpgtrans.demo.zoo2 import LONG_SOURCE_DIR, build_tiny_zoo_v2, long_source

    zoo = build_tiny_zoo_v2(tmp_path / "zoo")
    built = load_file(str(zoo["source"] / "model.safetensors"))
    out, record = long_source(zoo, steps=0, log=lambda message: None)
    untrained = load_file(str(out / "model.safetensors"))
    assert out.name == LONG_SOURCE_DIR and record["metrics"]["samples"] == 0
    assert built.keys() == untrained.keys() and all(torch.equal(built[k], untrained[k]) for k in built)
    out, record = long_source(zoo, steps=3, log=lambda message: None)
    trained = load_file(str(out / "model.safetensors"))
    moved = {k for k in built if not torch.equal(built[k], trained[k])}
    vpg = ("vision_model.post_layernorm.", "query_tokens", "qformer.", "language_projection.")
    assert moved and all(k.startswith(vpg) for k in moved)
    assert "language_projection.weight" in moved and any(k.startswith("qformer.") for k in moved)
    assert record["settings"]["steps"] == 3 and record["metrics"]["samples"] == 3 * 64
    assert long_source(zoo, steps=3, log=lambda m: pytest.fail(f"rebuilt: {m}"))[0] == out  # cached
