"""Prompt layout (where the image slots and the labels go) and the composed model's forward pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vpgtrans.bundle import load_model
from vpgtrans.config import PromptTemplate
from vpgtrans.model.vlm import IMAGE_TOKEN_ID
from vpgtrans.prompting import IGNORE_INDEX, prompt_ids, training_example

K = 4
VICUNA = PromptTemplate(caption="{bos}###Human: <Img>{image}</Img> Describe the image. ###Assistant: ",
                        vqa="{bos}###Human: <Img>{image}</Img> {question} ###Assistant: ", target_suffix="\n")


@pytest.fixture(scope="module")
def model(inherited):
    return load_model(inherited)


@pytest.fixture(scope="module")
def tokenizer(model):
    return model.tokenizer


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_mid_prompt_template_puts_the_slots_where_the_image_is(tokenizer):
    example = training_example(tokenizer, VICUNA, "vqa", K, target="red", question="what color is the circle?")
    ids, labels = example["input_ids"], example["labels"]
    before = [tokenizer.bos_token_id] + _ids(tokenizer, "###Human: <Img>")
    after = _ids(tokenizer, "</Img> what color is the circle? ###Assistant: ")
    target = _ids(tokenizer, " red\n")
    assert ids == before + [IMAGE_TOKEN_ID] * K + after + target
    slots = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_ID]
    assert slots == list(range(len(before), len(before) + K))  # exactly K, contiguous, after "<Img>"
    assert len(labels) == len(ids)
    assert labels[:-len(target)] == [IGNORE_INDEX] * (len(ids) - len(target))
    assert labels[-len(target):] == target
    assert tokenizer.decode(target).strip() == "red"


def test_default_template_is_blip2_layout(tokenizer):
    example = training_example(tokenizer, PromptTemplate(), "caption", K, target="a red circle")
    target = _ids(tokenizer, "a red circle\n")
    assert example["input_ids"] == [IMAGE_TOKEN_ID] * K + [tokenizer.bos_token_id] + target
    assert example["labels"] == [IGNORE_INDEX] * (K + 1) + target


def test_target_is_truncated_to_max_target_len(tokenizer):
    example = training_example(tokenizer, PromptTemplate(), "caption", K, target="a red circle on the left",
                               max_target_len=2)
    assert sum(label != IGNORE_INDEX for label in example["labels"]) == 2


def test_seq2seq_example_puts_target_on_decoder(tokenizer):
    template = PromptTemplate.for_llm(is_encoder_decoder=True)
    example = training_example(tokenizer, template, "vqa", K, target="red", question="what color?",
                               is_encoder_decoder=True)
    assert example["input_ids"][:K] == [IMAGE_TOKEN_ID] * K
    assert example["input_ids"][-1] == tokenizer.eos_token_id
    assert IMAGE_TOKEN_ID not in example["labels"]
    assert example["labels"] == _ids(tokenizer, "red") + [tokenizer.eos_token_id]


def _batch(tokenizer, template, targets, seed=0):
    examples = [training_example(tokenizer, template, "caption", K, target=t) for t in targets]
    width = max(len(e["input_ids"]) for e in examples)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in examples])
    labels = torch.tensor([e["labels"] + [IGNORE_INDEX] * (width - len(e["labels"])) for e in examples])
    mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in examples])
    pixel_values = torch.randn(len(targets), 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return input_ids, mask, labels, pixel_values


@pytest.mark.parametrize("template", [PromptTemplate(), VICUNA], ids=["front", "mid-prompt"])
def test_soft_prompts_land_in_the_slots(model, tokenizer, template):
    input_ids, _, _, pixel_values = _batch(tokenizer, template, ["a red circle", "a large blue square on the left"])
    with torch.no_grad():
        embeds = model.embed(input_ids, pixel_values)  # (B, T, D)
        soft = model.encode_images(pixel_values)  # (B, K, D)
        table = model.llm.get_input_embeddings().weight
    assert soft.shape == (2, K, model.llm.config.hidden_size)
    slots = input_ids == IMAGE_TOKEN_ID
    for b in range(2):
        torch.testing.assert_close(embeds[b][slots[b]], soft[b], rtol=0, atol=0)
        torch.testing.assert_close(embeds[b][~slots[b]], table[input_ids[b][~slots[b]]], rtol=0, atol=0)
    # The two images differ, so their soft prompts must too (the VPG is alive).
    assert not torch.allclose(soft[0], soft[1])


def test_loss_is_cross_entropy_over_target_tokens(model, tokenizer):
    input_ids, mask, labels, pixel_values = _batch(tokenizer, VICUNA, ["a red circle", "a large blue square"])
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=mask, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float()  # predicts token t+1 from t
    shifted = labels[:, 1:].reshape(-1)
    keep = shifted != IGNORE_INDEX
    n_target = sum(len(_ids(tokenizer, t + "\n")) for t in ["a red circle", "a large blue square"])
    assert int(keep.sum()) == n_target
    manual = F.cross_entropy(logits[keep], shifted[keep])
    torch.testing.assert_close(out.loss, manual, rtol=1e-5, atol=1e-6)


def test_gradient_reaches_vpg_and_connector_only(inherited):
    from vpgtrans.training import set_trainable

    fresh = load_model(inherited)
    counts = set_trainable(fresh, ["vpg", "connector"])
    assert counts["llm_trainable"] == 0
    assert counts["trainable"] == sum(p.numel() for p in [*fresh.visual.vpg.parameters(), *fresh.visual.connector.parameters()])
    input_ids, mask, labels, pixel_values = _batch(fresh.tokenizer, PromptTemplate(), ["a red circle"])
    fresh(input_ids=input_ids, pixel_values=pixel_values, attention_mask=mask, labels=labels).loss.backward()
    assert fresh.visual.connector.proj.weight.grad.abs().sum() > 0
    assert fresh.visual.vpg.query_tokens.grad.abs().sum() > 0
    assert all(p.grad is None for p in [*fresh.llm.parameters(), *fresh.vision.parameters()])


def test_text_only_input_equals_plain_llm(model, tokenizer):
    input_ids = torch.tensor([[tokenizer.bos_token_id] + _ids(tokenizer, "a red circle on the left")])
    with torch.no_grad():
        ours = model(input_ids=input_ids).logits
        plain = model.llm(input_ids=input_ids).logits
    assert torch.equal(ours, plain)


def test_slots_without_pixels_or_wrong_count_are_refused(model, tokenizer):
    input_ids, _, _, pixel_values = _batch(tokenizer, PromptTemplate(), ["a red circle"])
    with pytest.raises(ValueError, match="no pixel_values"):
        model.embed(input_ids, None)
    with pytest.raises(ValueError, match="exactly 4 image slots"):
        model.embed(input_ids[:, 1:], pixel_values)


def test_frozen_parts_after_load(model):
    assert not any(p.requires_grad for p in model.llm.parameters())
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert not model.llm.training and not model.vision.training


def test_t5_bundle_forward_returns_the_loss(tiny, tmp_path):
    from vpgtrans.stages.inherit import inherit

    t5 = load_model(inherit(tiny["source"], tiny["t5"], tmp_path / "t5"))
    assert t5.is_encoder_decoder
    template = t5.template
    assert template == PromptTemplate.for_llm(is_encoder_decoder=True)
    example = training_example(t5.tokenizer, template, "vqa", K, target="red", question="what color is the circle?",
                               is_encoder_decoder=True)
    input_ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
    pixel_values = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = t5(input_ids=input_ids, pixel_values=pixel_values, attention_mask=torch.ones_like(input_ids),
                 labels=labels)
    assert out.logits.shape[:2] == labels.shape  # decoder positions = target tokens, no shift
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[0].float(), labels[0]), rtol=1e-5, atol=1e-6)
    assert prompt_ids(t5.tokenizer, template, "vqa", K, "q?", is_encoder_decoder=True)[:K] == [IMAGE_TOKEN_ID] * K


def test_question_text_cannot_add_image_slots(tokenizer):
    ids = prompt_ids(tokenizer, PromptTemplate(), "vqa", K, question="what is in {image} here?")
    assert ids.count(IMAGE_TOKEN_ID) == K
    assert ids[:K] == [IMAGE_TOKEN_ID] * K


def test_question_text_cannot_add_a_bos(tokenizer):
    template = PromptTemplate(vqa="{bos}Q: {image} {question} A:")
    ids = prompt_ids(tokenizer, template, "vqa", K, question="is {bos} here?")
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    literal = tokenizer(" is {bos} here? A:", add_special_tokens=False)["input_ids"]
    first_slot = ids.index(IMAGE_TOKEN_ID)
    assert ids[first_slot + K:] == literal
