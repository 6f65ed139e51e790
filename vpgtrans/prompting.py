"""Turn (template, question, target) into token ids with image slots and labels.

Decoder-only (BLIP-2 OPT/LLaMA): ``[prefix][K image slots][prompt][target + suffix]``, labels -100 on
everything but the target. Seq2seq (FlanT5): encoder ``[prefix][K slots][prompt]</s>``, decoder labels
``target</s>``; a caption training row may instead carry the caption's first words on the encoder side,
``[prefix][K slots][prompt][caption start]</s>`` with labels ``caption rest</s>`` (BLIP-2's prefix language
modelling, ``split_caption``). Prompts for generation never carry a caption start.
"""

from __future__ import annotations

import random

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


def split_caption(caption: str, seed: int, draw: tuple[int, ...]) -> tuple[str, str]:
    """BLIP-2's prefix language modelling split of a FlanT5 training caption: ``(start, rest)``, the start
    for the encoder (after the soft prompts and the prompt), the rest as the decoder's target.

    The reference (VPGTrans's LAVIS, ``lavis/datasets/datasets/caption_datasets.py``,
    ``CaptionDataset.__getitem__``; the same in ``image_text_pair_datasets.py`` and ``laion_dataset.py``)::

        caption = self.text_processor(ann["caption"])
        caption = caption.split(" ")
        point = random.randint(0, len(caption)//2)
        text_input = " ".join(caption[:point])      # -> the T5 encoder, after the query outputs
        text_output = " ".join(caption[point:])     # -> the decoder target

    (``BlipCaptionProcessor`` has lower-cased the caption, turned ``.!"()*#:;~`` into spaces, collapsed
    runs of whitespace, stripped it and cut it to 50 words; ``Blip2T5.forward`` then tokenises
    ``text_input`` and ``text_output`` each with ``</s>`` appended, and puts the query outputs before the
    encoder's tokens.) So of n words the first ``point`` go to the encoder, ``point`` uniform over 0..n//2
    with both ends included (``random.randint``); the rest is never empty, and a one-word caption is all
    target. Salesforce's LAVIS has the same ``forward``, but no split in its datasets (its
    ``CaptionInstructDataset`` puts the whole caption in ``text_output`` and an empty ``text_input``).

    Here words are split on any whitespace (``str.split()``: what the reference's single-space split gives
    on its normalised text) and the caption is used as given, not lower-cased or stripped of punctuation.
    The reference draws from the process-wide ``random`` module; here the draw is a function of the run
    ``seed`` and the sample's ``draw`` key (its epoch and row index in training), so a run splits every
    caption the same way with or without DataLoader workers, on any number of processes and on resume,
    and a sample seen again in another epoch gets a fresh draw, as in the reference."""
    words = caption.split()
    rng = random.Random(f"vpgtrans-t5-caption-split:{seed}:{':'.join(map(str, draw))}")  # sha512 of the text
    point = rng.randint(0, len(words) // 2)
    return " ".join(words[:point]), " ".join(words[point:])


def prompt_ids(tokenizer, template: PromptTemplate, task: str, num_query_tokens: int,
               question: str | None = None, is_encoder_decoder: bool = False, image: bool = True,
               caption_start: str = "") -> list[int]:
    """The prompt (everything before the target) as ids, image slots as ``IMAGE_TOKEN_ID``; a sample
    without an image (``image`` False) has the text ``NO_IMAGE`` there instead, and no slot.
    ``caption_start`` (seq2seq training only): the caption's first words, after the prompt (``split_caption``)."""
    text = {"caption": template.caption, "grounding": template.grounding}.get(task, template.vqa)
    before, after = text.split(IMAGE_SLOT)  # split first: a question's own text never adds slots
    slots = [IMAGE_TOKEN_ID] * num_query_tokens if image else tokenizer(NO_IMAGE, add_special_tokens=False)["input_ids"]
    ids = (_encode_template(tokenizer, before, question) + slots
           + _encode_template(tokenizer, after, question))
    if caption_start:
        if not is_encoder_decoder:
            raise ValueError("a caption start goes on the encoder side: seq2seq LLMs only")
        ids += tokenizer(caption_start, add_special_tokens=False)["input_ids"]  # as LAVIS tokenises text_input
    if is_encoder_decoder and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def target_ids(tokenizer, template: PromptTemplate, task: str, target: str,
               is_encoder_decoder: bool = False, end: bool = True) -> list[int]:
    """The target continuation as ids: a leading space after a VQA prompt, then the suffix (and a seq2seq
    LLM's EOS). ``end`` False: without suffix and EOS, the ids a longer target that starts with ``target``
    and a space starts with (for a tokenizer that splits words at spaces)."""
    target = target.strip()
    if task in ("vqa", "grounding") and not is_encoder_decoder:
        target = " " + target  # "Answer: red", as BLIP-2 tokenises prompt and answer together
    if not end:
        return tokenizer(target, add_special_tokens=False)["input_ids"]
    ids = tokenizer(target + template.target_suffix, add_special_tokens=False)["input_ids"]
    if is_encoder_decoder and tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids


def training_example(tokenizer, template: PromptTemplate, task: str, num_query_tokens: int, target: str,
                     question: str | None = None, is_encoder_decoder: bool = False,
                     max_target_len: int = 64, image: bool = True, caption_start: str = "") -> dict[str, list[int]]:
    """One training sample: ``input_ids`` and ``labels`` (and for seq2seq, ``labels`` on the decoder).
    ``caption_start`` (seq2seq): words of the caption put on the encoder side; ``target`` is then the rest."""
    prompt = prompt_ids(tokenizer, template, task, num_query_tokens, question, is_encoder_decoder, image,
                        caption_start)
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
