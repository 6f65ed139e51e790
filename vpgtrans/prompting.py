"""Turn (template, question, target) into token ids with image slots and labels.

Decoder-only (BLIP-2 OPT/LLaMA): ``[prefix][K image slots][prompt][target + suffix]``, labels -100 on
everything but the target. Seq2seq (FlanT5): encoder ``[prefix][K slots][prompt]</s>``, decoder labels
``target</s>``.
"""

from __future__ import annotations

from vpgtrans.config import BOS_SLOT, IMAGE_SLOT, PromptTemplate
from vpgtrans.model.vlm import IMAGE_TOKEN_ID

IGNORE_INDEX = -100
NO_IMAGE = "Image: N/A"  # what a text-only sample has in place of the image slots (LaVIN's form)


def _encode_template(tokenizer, text: str, question: str | None) -> list[int]:
    """Template text with optional ``{bos}`` markers -> ids (no other special tokens added). The
    question is put in after splitting at the markers, so a question's own text never adds a BOS."""
    ids: list[int] = []
    for i, part in enumerate(text.split(BOS_SLOT)):
        if i > 0 and tokenizer.bos_token_id is not None:
            ids.append(tokenizer.bos_token_id)
        if question is not None:
            part = part.replace("{question}", question.strip())
        if part:
            ids.extend(tokenizer(part, add_special_tokens=False)["input_ids"])
    return ids


def prompt_ids(tokenizer, template: PromptTemplate, task: str, num_query_tokens: int,
               question: str | None = None, is_encoder_decoder: bool = False, image: bool = True) -> list[int]:
    """The prompt (everything before the target) as ids, image slots as ``IMAGE_TOKEN_ID``; a sample
    without an image (``image`` False) has the text ``NO_IMAGE`` there instead, and no slot."""
    text = {"caption": template.caption, "grounding": template.grounding}.get(task, template.vqa)
    before, after = text.split(IMAGE_SLOT)  # split first: a question's own text never adds slots
    slots = [IMAGE_TOKEN_ID] * num_query_tokens if image else tokenizer(NO_IMAGE, add_special_tokens=False)["input_ids"]
    ids = (_encode_template(tokenizer, before, question) + slots
           + _encode_template(tokenizer, after, question))
    if is_encoder_decoder and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def target_ids(tokenizer, template: PromptTemplate, task: str, target: str,
               is_encoder_decoder: bool = False) -> list[int]:
    """The target continuation as ids: a leading space after a VQA prompt, then the suffix."""
    target = target.strip()
    if task in ("vqa", "grounding") and not is_encoder_decoder:
        target = " " + target  # "Answer: red", as BLIP-2 tokenises prompt and answer together
    ids = tokenizer(target + template.target_suffix, add_special_tokens=False)["input_ids"]
    if is_encoder_decoder and tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids


def training_example(tokenizer, template: PromptTemplate, task: str, num_query_tokens: int, target: str,
                     question: str | None = None, is_encoder_decoder: bool = False,
                     max_target_len: int = 64, image: bool = True) -> dict[str, list[int]]:
    """One training sample: ``input_ids`` and ``labels`` (and for seq2seq, ``labels`` on the decoder)."""
    prompt = prompt_ids(tokenizer, template, task, num_query_tokens, question, is_encoder_decoder, image)
    target_tokens = target_ids(tokenizer, template, task, target, is_encoder_decoder)[:max_target_len]
    if is_encoder_decoder:
        return {"input_ids": prompt, "labels": target_tokens}
    return {"input_ids": prompt + target_tokens, "labels": [IGNORE_INDEX] * len(prompt) + target_tokens}


def stop_token_ids(tokenizer, template: PromptTemplate) -> list[int]:
    """Token ids that end generation: EOS, plus the stop string if it is a single token."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if template.stop:
        stop = tokenizer(template.stop, add_special_tokens=False)["input_ids"]
        if len(stop) == 1:
            ids.append(stop[0])
    return ids


def clean_generation(text: str, template: PromptTemplate) -> str:
    """Cut a decoded generation at the stop string and strip it."""
    if template.stop and template.stop in text:
        text = text.split(template.stop, 1)[0]
    return text.strip()
