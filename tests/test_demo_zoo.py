"""The synthetic world and the tiny model zoo: files, formats, determinism, offline loading."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from vpgtrans.demo import world
from vpgtrans.errors import VpgtransError


def _rows(split_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (split_dir / "data.jsonl").read_text().splitlines()]


def _check_box(box) -> None:
    assert len(box) == 4 and all(0.0 <= v <= 1.0 for v in box)
    assert box[0] < box[2] and box[1] < box[3]


# ----------------------------------------------------------------------------------------------- world

def test_caption_split_rows_are_well_formed(tmp_path):
    from PIL import Image

    out = world.make_split(tmp_path / "cap", "caption", n=12, seed=3)
    rows = _rows(out)
    assert len(rows) == 12
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(1, 13)]
    assert rows[0]["image"] == "images/000001.png"
    for row in rows:
        with Image.open(out / row["image"]) as image:
            assert image.size == (32, 32) and image.mode == "RGB"
        assert len(row["objects"]) == 1
        obj = row["objects"][0]
        assert obj["color"] in world.COLORS and obj["shape"] in world.SHAPES
        assert obj["size"] in world.SIZES and obj["position"] in world.POSITIONS
        _check_box(row["box"])
        assert row["box"] == obj["box"]
        assert world.parse_caption(row["caption"]) == [{a: obj[a] for a in world.ATTRIBUTES}]
    assert len({row["caption"].split(" a ")[0] for row in rows}) > 1, "captions should vary in form"
    assert json.loads((out / "world.json").read_text())["seed"] == 3


def test_vqa_split_rows_are_well_formed(tmp_path):
    from vpgtrans.collate import most_common_answer

    rows = _rows(world.make_split(tmp_path / "vqa", "vqa", n=40, seed=1))
    values = {"color": set(world.COLORS), "shape": set(world.SHAPES), "size": set(world.SIZES),
              "position": set(world.POSITIONS), "yesno": {"yes", "no"}}
    for row in rows:
        assert row["question"].endswith("?")
        assert len(row["answers"]) == 10 and all(" " not in a for a in row["answers"])
        answer = most_common_answer(row["answers"])
        assert Counter(row["answers"])[answer] >= 7
        assert answer in values[row["answer_type"]]
        if row["answer_type"] in world.ATTRIBUTES:
            assert answer == row["objects"][0][row["answer_type"]]
        _check_box(row["box"])
    assert {row["answer_type"] for row in rows} == set(values)


def test_splits_are_deterministic_per_seed(tmp_path):
    a = world.make_split(tmp_path / "a", "vqa", n=5, seed=7)
    b = world.make_split(tmp_path / "b", "vqa", n=5, seed=7)
    c = world.make_split(tmp_path / "c", "vqa", n=5, seed=8)
    assert (a / "data.jsonl").read_bytes() == (b / "data.jsonl").read_bytes()
    assert all((a / "images" / p.name).read_bytes() == p.read_bytes() for p in (b / "images").iterdir())
    assert (a / "data.jsonl").read_bytes() != (c / "data.jsonl").read_bytes()


def test_make_world_uses_disjoint_seeds_and_loads_with_load_rows(tmp_path):
    from vpgtrans.data import load_rows

    splits = world.make_world(tmp_path, n_train=4, n_eval=3, seed=0)
    assert set(splits) == {"caption_train", "caption_eval", "vqa_train", "vqa_eval"}
    seeds = {name: json.loads((path / "world.json").read_text())["seed"] for name, path in splits.items()}
    assert seeds["caption_train"] != seeds["caption_eval"] and seeds["vqa_train"] != seeds["vqa_eval"]
    assert _rows(splits["caption_train"])[0] != _rows(splits["caption_eval"])[0]
    dataset, task, stats = load_rows(splits["vqa_eval"])
    assert task == "vqa" and len(dataset) == 3 and stats.skipped_missing_image == 0
    assert load_rows(splits["caption_train"])[1] == "caption"


def test_several_objects(tmp_path):
    rows = _rows(world.make_split(tmp_path / "multi", "caption", n=30, seed=2, max_objects=3))
    counts = {len(row["objects"]) for row in rows}
    assert counts == {1, 2, 3}
    for row in rows:
        positions = [o["position"] for o in row["objects"]]
        assert len(set(positions)) == len(positions)
        assert positions == sorted(positions, key=world.POSITIONS.index)  # reading order
        parsed = world.parse_caption(row["caption"])
        assert parsed == [{a: o[a] for a in world.ATTRIBUTES} for o in row["objects"]]
    vqa = _rows(world.make_split(tmp_path / "multi-vqa", "vqa", n=60, seed=2, max_objects=3))
    assert "count" in {row["answer_type"] for row in vqa}


def test_bad_split_arguments_are_reported_together(tmp_path):
    with pytest.raises(VpgtransError, match="task must be.*max_objects"):
        world.make_split(tmp_path, "detect", n=3, seed=0, max_objects=0)


def test_caption_accuracy():
    rows = [{"objects": [{"color": "red", "shape": "circle", "size": "small", "position": "left"}]}] * 2
    scores = world.caption_accuracy(["a small red circle on the left", "a large red square on the left"], rows)
    assert scores["exact"] == 0.5 and scores["color"] == 1.0 and scores["shape"] == 0.5
    assert scores["attribute_accuracy"] == pytest.approx(6 / 8)


def test_text_corpus_puts_the_scene_before_the_text():
    lines = world.world_text_corpus(50, seed=0)
    assert lines == world.world_text_corpus(50, seed=0) and lines != world.world_text_corpus(50, seed=1)
    questions = 0
    for line in lines:
        context, text = line.split(" . ", 1)
        if text.startswith("Question: "):
            questions += 1
            assert " Answer: " in text
            continue
        for obj in world.parse_caption(text):
            assert all(obj[a] in context.split() for a in world.ATTRIBUTES)
    assert 0 < questions < len(lines)


# ------------------------------------------------------------------------------------------ tokenizers

@pytest.fixture(scope="module")
def tokenizers():
    from vpgtrans.demo import vocab

    corpus = world.world_text_corpus(2000, seed=0)
    return {"opt": vocab.train_opt_tokenizer(corpus), "llama": vocab.train_llama_tokenizer(corpus)}


TEXTS = ["a small red circle on the left\n", "Question: what color is the cross? Answer: blue\n",
         "there is a large white triangle at the top-right", "unseen words: zebra 42 é!"]


def test_tokenizers_round_trip_and_newline_is_one_token(tokenizers):
    for name, tok in tokenizers.items():
        for text in TEXTS:
            ids = tok(text)["input_ids"]
            assert ids[0] == tok.bos_token_id, name  # BOS added, as OPT and LLaMA do
            assert tok.decode(ids, skip_special_tokens=True) == text, name
        newline = tok("\n", add_special_tokens=False)["input_ids"]
        assert len(newline) == 1, name
        assert tok("red\n", add_special_tokens=False)["input_ids"][-1] == newline[0], name


def test_tokenizers_differ(tokenizers):
    opt, llama = tokenizers["opt"], tokenizers["llama"]
    assert len(opt) != len(llama)
    assert opt.convert_ids_to_tokens(opt(" small", add_special_tokens=False)["input_ids"]) == ["Ġsmall"]
    assert llama.convert_ids_to_tokens(llama("small", add_special_tokens=False)["input_ids"]) == ["▁small"]
    assert (opt.bos_token, opt.eos_token, opt.pad_token) == ("</s>", "</s>", "<pad>")
    assert (llama.bos_token, llama.eos_token, llama.unk_token, llama.pad_token) == ("<s>", "</s>", "<unk>", None)
    assert llama.convert_ids_to_tokens(llama("\n", add_special_tokens=False)["input_ids"]) == ["<0x0A>"]
    assert opt("a small red circle")["input_ids"] != llama("a small red circle")["input_ids"]


# ---------------------------------------------------------------------------------------- tiny models

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from vpgtrans.demo.zoo import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny-zoo"), seed=0)


def test_tiny_models_write_the_expected_files(tiny):
    assert set(tiny) == {"root", "vision", "source", "opt-s", "opt-l", "llama-s", "world"}
    llm_files = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json"}
    for name in ("opt-s", "opt-l", "llama-s"):
        assert {p.name for p in tiny[name].iterdir()} == llm_files
    assert {p.name for p in tiny["vision"].iterdir()} == {"config.json", "model.safetensors",
                                                          "preprocessor_config.json"}
    assert {p.name for p in tiny["source"].iterdir()} == llm_files | {"processor_config.json"}
    record = json.loads((tiny["root"] / "zoo.json").read_text())
    assert record["trained"] is False and record["paths"]["source"] == "source-blip2-opt-s"
    assert {p.name for p in tiny["world"].iterdir()} == {"caption_train", "caption_eval", "vqa_train", "vqa_eval"}


def test_tiny_models_are_detected_by_format(tiny):
    from vpgtrans.formats.detect import detect_format

    assert detect_format(tiny["vision"]) == "hf-vision"
    assert detect_format(tiny["source"]) == "hf-blip2"
    assert {detect_format(tiny[n]) for n in ("opt-s", "opt-l", "llama-s")} == {"hf-llm"}


def test_tiny_llms_load_offline(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    families = {}
    for name in ("opt-s", "opt-l", "llama-s"):
        tok = AutoTokenizer.from_pretrained(tiny[name], local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(tiny[name], local_files_only=True)
        assert model.config.vocab_size >= len(tok) and model.config.max_position_embeddings >= 64
        ids = tok("a small red circle\n", return_tensors="pt")["input_ids"]
        assert ids[0, 0].item() == tok.bos_token_id
        assert model(input_ids=ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)
        families[name] = (model.config.model_type, len(tok))
    assert families["opt-s"] == families["opt-l"] and families["opt-s"][0] == "opt"
    assert families["llama-s"][0] == "llama" and families["llama-s"][1] != families["opt-s"][1]


def test_tiny_source_blip2_loads_and_generates_offline(tiny):
    import torch
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import Blip2ForConditionalGeneration, Blip2Processor, Blip2VisionModel

    processor = Blip2Processor.from_pretrained(tiny["source"], local_files_only=True)
    model = Blip2ForConditionalGeneration.from_pretrained(tiny["source"], local_files_only=True).eval()
    config = model.config
    assert config.num_query_tokens == processor.num_query_tokens == 8
    assert config.qformer_config.cross_attention_frequency == 1
    assert config.qformer_config.encoder_hidden_size == config.vision_config.hidden_size
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == config.image_token_index
    assert config.image_token_index < config.text_config.vocab_size  # a spare row: no resize
    newline = processor.tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert newline == [config.text_config.eos_token_id]  # generation stops on "\n"
    assert 0.01 < model.query_tokens.std().item() < 0.04  # not HF's all-zero init
    assert processor.image_processor.size == {"height": 32, "width": 32}

    # the LLM is opt-s and the ViT is the vision model, weight for weight
    opt = load_file(tiny["opt-s"] / "model.safetensors")
    assert torch.equal(model.language_model.get_input_embeddings().weight, opt["model.decoder.embed_tokens.weight"])
    vision = Blip2VisionModel.from_pretrained(tiny["vision"], local_files_only=True)
    assert vision.config.initializer_range == 0.02
    assert torch.equal(model.vision_model.embeddings.patch_embedding.weight, vision.embeddings.patch_embedding.weight)

    split = tiny["world"] / "vqa_eval"
    rows = _rows(split)[:2]
    images = [Image.open(split / row["image"]).convert("RGB") for row in rows]
    inputs = processor(images=images, text=[f"Question: {r['question']} Answer:" for r in rows], return_tensors="pt",
                       padding=True)
    assert (inputs["input_ids"][:, :8] == config.image_token_index).all()
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2
    captions = model.generate(**processor(images=images, return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert captions.shape[0] == 2


def test_tiny_models_are_deterministic(tiny, tmp_path):
    from vpgtrans.demo.zoo import build_tiny_models

    again = build_tiny_models(tmp_path / "again", seed=0)
    for name in ("opt-s", "llama-s", "vision", "source"):
        assert (tiny[name] / "model.safetensors").read_bytes() == (again[name] / "model.safetensors").read_bytes()
    assert (tiny["opt-s"] / "tokenizer.json").read_bytes() == (again["opt-s"] / "tokenizer.json").read_bytes()


def test_build_zoo_returns_a_complete_cached_zoo_at_once(tmp_path):
    from vpgtrans.demo.zoo import ZOO_VERSION, build_tiny_models, build_zoo

    root = tmp_path / ZOO_VERSION / "seed5"
    build_tiny_models(root, seed=5)  # stands in for a cached build
    paths = build_zoo(cache_dir=tmp_path, seed=5, log=lambda message: pytest.fail(f"rebuilt: {message}"))
    assert paths["root"] == root and paths["source"] == root / "source-blip2-opt-s"


@pytest.mark.slow
def test_full_zoo_source_captions_eval_images(tmp_path):
    from vpgtrans.demo.zoo import build_zoo, evaluate_blip2

    paths = build_zoo(cache_dir=tmp_path, seed=0)
    record = json.loads((paths["root"] / "zoo.json").read_text())
    assert record["trained"] is True
    scores = evaluate_blip2(paths["source"], paths["world"] / "caption_eval")
    assert scores["attribute_accuracy"] >= 0.9
    assert scores["attribute_accuracy"] == record["metrics"]["source/caption_eval/attribute_accuracy"]
    assert build_zoo(cache_dir=tmp_path, seed=0) == paths  # cached
