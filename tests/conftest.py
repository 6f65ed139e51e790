"""Shared fixtures: tiny models built from configs (random weights), tiny data — all offline."""

from __future__ import annotations

import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20)}
SHAPES = ["circle", "square"]
CORPUS = [f"a {size} {colour} {shape} on the {side}\n" for size in ("small", "large") for colour in COLOURS
          for shape in SHAPES for side in ("left", "right")] * 5 + \
    [f"Question: what color is the {shape}? Answer: {colour}\n" for colour in COLOURS for shape in SHAPES] * 5


def _byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "</s>", "<unk>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def _metaspace_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=220, special_tokens=["<unk>", "<s>", "</s>", "\n"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def _randomise(model, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8, initializer_range=0.02)
QFORMER = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
               encoder_hidden_size=32, cross_attention_frequency=1, vocab_size=100)


def make_source_blip2(path, seed=0):
    """A tiny HF BLIP-2 with an OPT LLM (random weights) and its tokenizer, saved at ``path``."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

    tokenizer = _byte_level_tokenizer()
    text = OPTConfig(hidden_size=48, ffn_dim=96, num_hidden_layers=2, num_attention_heads=2, vocab_size=len(tokenizer),
                     word_embed_proj_dim=48, max_position_embeddings=96, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=text.to_dict(), num_query_tokens=4)
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    _randomise(model, seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_llama(path, seed=1, hidden=40):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _metaspace_tokenizer()
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=96,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    _randomise(model, seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_opt(path, seed=2, hidden=56):
    from transformers import OPTConfig, OPTForCausalLM

    tokenizer = _byte_level_tokenizer()
    config = OPTConfig(hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
                       vocab_size=len(tokenizer), word_embed_proj_dim=hidden, max_position_embeddings=96,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = OPTForCausalLM(config)
    _randomise(model, seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_t5(path, seed=3):
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = _metaspace_tokenizer()
    config = T5Config(d_model=40, d_kv=20, d_ff=80, num_layers=2, num_decoder_layers=2, num_heads=2,
                      vocab_size=len(tokenizer), decoder_start_token_id=tokenizer.pad_token_id,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    _randomise(model, seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_data(path, task="caption", n=24, seed=0):
    """A directory with data.jsonl + images/ of coloured shapes."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    (path / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        image = Image.new("RGB", (32, 32), (0, 0, 0))
        draw = ImageDraw.Draw(image)
        (draw.ellipse if shape == "circle" else draw.rectangle)([6, 6, 26, 26], fill=COLOURS[colour])
        name = f"images/{i:04d}.png"
        image.save(path / name)
        if task == "caption":
            rows.append({"image": name, "caption": f"a {colour} {shape}"})
        else:
            rows.append({"image": name, "question": f"what color is the {shape}?", "answers": [colour] * 9 + ["red"]})
    (path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of tiny models and data: source (HF BLIP-2 OPT), llama, opt, t5, caption, vqa."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        "source": make_source_blip2(root / "source-blip2-opt"),
        "llama": make_llama(root / "llama"),
        "opt": make_opt(root / "opt"),
        "t5": make_t5(root / "t5"),
        "caption": make_data(root / "caption", "caption"),
        "vqa": make_data(root / "vqa", "vqa", seed=1),
        "root": root,
    }


@pytest.fixture(scope="session")
def inherited(tiny, tmp_path_factory):
    """An inherit bundle: tiny BLIP-2 OPT source -> tiny LLaMA target, shared-token converter."""
    from vpgtrans.stages.inherit import inherit

    return inherit(tiny["source"], tiny["llama"], tmp_path_factory.mktemp("bundles") / "inherit")


def assert_curves_close(ours: list[dict], theirs: list[dict], abs: float = 1e-6) -> None:
    """Evaluation curves agree point by point: the same steps and keys, every number within `abs`.

    (pytest >= 9.2 refuses `pytest.approx` on nested data, so each point is compared on its own.)
    """
    assert [sorted(point) for point in ours] == [sorted(point) for point in theirs]
    for mine, other in zip(ours, theirs):
        assert mine == pytest.approx(other, abs=abs), (mine, other)


class StopHere(Exception):
    """Raised by a ``stop_at`` progress callback: an interrupted run, after its checkpoints were written."""


def stop_at(step: int):
    """A training progress callback that interrupts the run when it reports ``step`` as done."""
    def progress(done, total, loss, lr):
        if done == step:
            raise StopHere(f"stopped after step {done}")
    return progress


def assert_one_line_error(result, *fragments):
    """A CLI result that failed as users are promised: exit code 2, exactly one line "error: ..." on stderr
    holding every fragment, no traceback anywhere."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
