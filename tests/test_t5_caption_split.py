"""FlanT5 caption rows as BLIP-2 / LAVIS train them (prefix language modelling): each training caption is split
at a random word, its first 0..n//2 words go to the encoder after the prompt, the rest (+ </s>) is the decoder's
target; the draw is a function of the run seed and the sample (epoch, row), never of a process's RNG.
``t5_caption_split="none"`` keeps the whole caption as the target, as before; generation prompts never change."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from typer.testing import CliRunner

from vpgtrans.bundle import load_model, read_manifest
from vpgtrans.collate import Collator
from vpgtrans.config import TrainConfig
from vpgtrans.errors import VpgtransError
from vpgtrans.model.vlm import IMAGE_TOKEN_ID
from vpgtrans.prompting import IGNORE_INDEX

# Words the tiny tokenizers were trained on (tests/conftest.py CORPUS), so every word has its own pieces.
CAPTIONS = ["a small red circle on the left of a large blue square on the right",  # 15 words: start 0..7
            "a large green square on the right",  # 7 words: 0..3
            "a yellow circle",  # 3 words: 0..1
            "circle"]  # 1 word: always all target


@pytest.fixture(scope="module")
def t5(tiny, tmp_path_factory):
    """A bundle on the tiny T5 (built from a config in conftest), and its loaded model."""
    from vpgtrans.stages.inherit import inherit

    bundle = inherit(tiny["source"], tiny["t5"], tmp_path_factory.mktemp("t5") / "inherit")
    return bundle, load_model(bundle)


@pytest.fixture(scope="module")
def rows(tiny):
    image = str(tiny["caption"] / "images" / "0000.png")
    return [{"image": image, "caption": caption} for caption in CAPTIONS]


def _collator(model, split="random-prefix", seed=42, mode="train", task="caption"):
    return Collator(model.tokenizer, model.template, task, model.num_image_tokens, model.image_processor,
                    model.is_encoder_decoder, mode=mode, t5_caption_split=split, seed=seed)


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _unpad(batch, i):
    ids = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
    labels = [t for t in batch["labels"][i].tolist() if t != IGNORE_INDEX]
    return ids, labels


def _start_words(model, ids, labels, caption):
    """How many of the caption's words are on the encoder side: the one split whose layout the row has
    exactly — the slots, then the first p words' own tokens, then </s>; labels the rest's tokens + </s>."""
    tok, k, eos = model.tokenizer, model.num_image_tokens, model.tokenizer.eos_token_id
    words = caption.split()
    found = [p for p in range(len(words) + 1)
             if ids == [IMAGE_TOKEN_ID] * k + _ids(tok, " ".join(words[:p])) + [eos]
             and labels == _ids(tok, " ".join(words[p:])) + [eos]]
    assert len(found) == 1, (tok.convert_ids_to_tokens([t for t in ids if t >= 0]), tok.convert_ids_to_tokens(labels))
    return found[0]


def _starts(model, collate, rows, epochs=range(1), indices=range(40)):
    """Encoder-side word counts of every caption, drawn as training rows (epoch, index)."""
    counts = {caption: [] for caption in CAPTIONS}
    for epoch in epochs:
        for index in indices:
            draws = [(epoch, index * len(rows) + j) for j in range(len(rows))]
            batch, _ = collate.prepare(rows, draws)
            for i, row in enumerate(rows):
                counts[row["caption"]].append(_start_words(model, *_unpad(batch, i), row["caption"]))
    return counts


def test_the_caption_start_goes_to_the_encoder_after_the_prompt_and_the_rest_is_the_target(t5, rows):
    _, model = t5
    assert model.is_encoder_decoder and model.template.caption == "{image}"  # BLIP-2 FlanT5: no caption prompt
    starts = _starts(model, _collator(model), rows)
    long = starts[CAPTIONS[0]]
    assert any(p > 0 for p in long), "some rows must carry caption words on the encoder side"
    # one concrete row, spelled out: the encoder holds slots + the first words + </s>, the labels the rest + </s>
    batch, _ = _collator(model).prepare(rows[:1], [(0, len(rows) * long.index(max(long)))])
    ids, labels = _unpad(batch, 0)
    tok, p = model.tokenizer, max(long)
    assert tok.convert_ids_to_tokens(ids[model.num_image_tokens:]) == \
        tok.convert_ids_to_tokens(_ids(tok, " ".join(CAPTIONS[0].split()[:p]))) + ["</s>"]
    assert tok.decode(labels, skip_special_tokens=True).split() == CAPTIONS[0].split()[p:]
    assert labels[-1] == tok.eos_token_id


def test_the_start_is_zero_to_half_the_words_inclusive_and_varies(t5, rows):
    """LAVIS (VPGTrans): point = random.randint(0, len(words)//2), both ends included."""
    _, model = t5
    starts = _starts(model, _collator(model), rows, epochs=range(3))
    for caption, drawn in starts.items():
        half = len(caption.split()) // 2
        assert set(drawn) == set(range(half + 1)), (caption, Counter(drawn))  # every bound reached, none passed
    spread = Counter(starts[CAPTIONS[0]])
    assert max(spread.values()) < 0.3 * len(starts[CAPTIONS[0]])  # roughly uniform over 8 values, not one


def test_the_same_seed_splits_the_same_and_another_seed_or_epoch_differently(t5, rows):
    _, model = t5
    ours = _starts(model, _collator(model, seed=42), rows)
    assert ours == _starts(model, _collator(model, seed=42), rows)  # a fresh collator: nothing carried over
    other = _starts(model, _collator(model, seed=43), rows)
    assert other[CAPTIONS[0]] != ours[CAPTIONS[0]]
    next_epoch = _starts(model, _collator(model, seed=42), rows, epochs=[1])
    assert next_epoch[CAPTIONS[0]] != ours[CAPTIONS[0]]  # a sample seen again gets a fresh draw


def test_the_split_depends_on_the_sample_not_on_the_batch_it_is_in(t5, rows):
    _, model = t5
    collate = _collator(model)
    together, _ = collate.prepare(rows, [(0, 5), (0, 6), (0, 7), (0, 8)])
    for i, row in enumerate(rows):
        alone, _ = collate.prepare([row], [(0, 5 + i)])
        assert _unpad(alone, 0) == _unpad(together, i)


def test_none_keeps_the_whole_caption_as_the_target(t5, rows):
    """Today's layout, byte for byte: encoder = slots + </s>, labels = the caption's tokens + </s>."""
    _, model = t5
    tok, k, eos = model.tokenizer, model.num_image_tokens, model.tokenizer.eos_token_id
    for collate in (_collator(model, split="none"),
                    Collator(model.tokenizer, model.template, "caption", k, model.image_processor, True)):  # default
        batch, _ = collate.prepare(rows, [(0, i) for i in range(len(rows))])
        for i, caption in enumerate(CAPTIONS):
            assert _unpad(batch, i) == ([IMAGE_TOKEN_ID] * k + [eos], _ids(tok, caption) + [eos])
        assert torch.equal(batch["input_ids"], torch.tensor([[IMAGE_TOKEN_ID] * k + [eos]] * len(rows)))


def test_generation_prompts_and_other_tasks_are_unchanged(t5, rows, inherited, tiny):
    _, model = t5
    k, eos = model.num_image_tokens, model.tokenizer.eos_token_id
    for split in ("random-prefix", "none"):
        batch, _ = _collator(model, split=split, mode="generate").prepare(rows)
        assert batch["input_ids"].tolist() == [[IMAGE_TOKEN_ID] * k + [eos]] * len(rows)
    vqa = [{"image": rows[0]["image"], "question": "what color is the circle?", "answers": ["red"] * 10}]
    split, whole = (_collator(model, split=s, task="vqa").prepare(vqa, [(0, 0)])[0] for s in ("random-prefix", "none"))
    assert all(torch.equal(split[key], whole[key]) for key in ("input_ids", "labels"))
    # a decoder-only LLM: the option changes nothing
    llama = load_model(inherited)
    split, whole = (_collator(llama, split=s).prepare(rows, [(0, i) for i in range(len(rows))])[0]
                    for s in ("random-prefix", "none"))
    assert all(torch.equal(split[key], whole[key]) for key in ("input_ids", "attention_mask", "labels"))


def test_the_config_refuses_an_unknown_split():
    assert TrainConfig().t5_caption_split == "random-prefix"
    with pytest.raises(VpgtransError, match="t5_caption_split must be one of random-prefix, none"):
        TrainConfig(t5_caption_split="half")


# --- through a training run -------------------------------------------------------------------------------

RUN = dict(max_steps=3, batch_size=4, log_every=1)


def _losses(bundle):
    return [r["loss"] for r in map(json.loads, (bundle / "metrics.jsonl").read_text().splitlines())
            if r["type"] == "train"]


def test_a_t5_run_splits_the_same_with_workers_and_the_option_reaches_the_collator(t5, tiny, tmp_path):
    from vpgtrans.stages import train
    from vpgtrans.training import RunOptions

    bundle, _ = t5
    # 3 steps x 4 = 12 samples of 24 rows: the run draws each caption of the tiny world once
    plain = train.warmup_projector(bundle, tiny["caption"], tmp_path / "w0", TrainConfig.warmup(**RUN))
    workers = train.warmup_projector(bundle, tiny["caption"], tmp_path / "w2", TrainConfig.warmup(**RUN),
                                     options=RunOptions(num_workers=2))
    assert _losses(workers) == pytest.approx(_losses(plain), abs=1e-6)
    assert read_manifest(plain)["config"]["train"]["t5_caption_split"] == "random-prefix"
    whole = train.warmup_projector(bundle, tiny["caption"], tmp_path / "none",
                                   TrainConfig.warmup(**RUN, t5_caption_split="none"))
    assert read_manifest(whole)["config"]["train"]["t5_caption_split"] == "none"
    assert _losses(whole) != pytest.approx(_losses(plain), abs=1e-6)  # other targets, other losses


def test_one_stage_of_a_transfer_can_set_its_own_split():
    from vpgtrans.cli import _stage_set

    stages = {"finetune": TrainConfig.finetune()}
    assert _stage_set(stages, ["finetune.t5_caption_split=none"], {})["finetune"].t5_caption_split == "none"
    with pytest.raises(VpgtransError, match="t5_caption_split must be one of random-prefix, none"):
        _stage_set(stages, ["finetune.t5_caption_split=half"], {})


def test_the_cli_flag_sets_the_split(t5, tiny, tmp_path):
    from vpgtrans.cli import app

    bundle, _ = t5
    result = CliRunner().invoke(app, ["warmup-projector", str(bundle), "--data", str(tiny["caption"]), "--out",
                                      str(tmp_path / "w"), "--max-steps", "1", "--batch-size", "4",
                                      "--t5-caption-split", "none"])
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "w")["config"]["train"]["t5_caption_split"] == "none"
