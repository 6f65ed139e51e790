"""Rows -> batches: image slots, labels and padding for training; prompts and references for generation."""

from __future__ import annotations

import logging

import torch

from vpgtrans.config import PromptTemplate
from vpgtrans.data import IMAGE_OPTIONAL, NO_IMAGE_LIMIT, LoadStats, first_line
from vpgtrans.errors import VpgtransError
from vpgtrans.images import ImageTooLarge, image_name, open_image
from vpgtrans.prompting import IGNORE_INDEX, prompt_ids, split_caption, training_example

log = logging.getLogger(__name__)


def _first(value):
    return value[0] if isinstance(value, list) else value


def most_common_answer(answers: list[str]) -> str:
    """The VQA training target: the answer most annotators gave (first one on ties)."""
    counts: dict[str, int] = {}
    for answer in answers:
        counts[answer] = counts.get(answer, 0) + 1
    return max(counts, key=counts.get)


def _target(row: dict, task: str, choice_answer: str) -> str:
    if task == "caption":
        return _first(row["caption"])
    if task == "vqa":
        return most_common_answer(row["answers"])
    if task == "multiple-choice":
        from vpgtrans.multiple_choice import target_text

        return target_text(row["answer"], row["choices"], choice_answer)
    from vpgtrans.grounding import format_box

    return format_box(row["box"])


class Collator:
    """Rows -> a batch. ``mode="train"``: right-padded ids with labels. ``mode="generate"``: the prompt
    only, left-padded for decoder-only LLMs, plus the references for scoring (grounding: the box).

    Rows whose image cannot be used are left out of the batch and counted in ``stats`` (an error
    when ``stats.strict``); a batch with no usable row is ``{}``. Multiple-choice rows may have no image
    (``"image": None``): they get no image slots, and ``pixel_values`` holds the images of the other rows
    only, in order (None when no row of the batch has one). A generate batch's ``positions`` name the
    given rows it holds.

    ``t5_caption_split="random-prefix"`` (train mode, caption rows, seq2seq LLM): each caption's first words
    go to the encoder, the rest is the target (``vpgtrans.prompting.split_caption``), drawn from ``seed``
    and each row's draw key (``prepare``'s ``draws``); "none" (the default): the whole caption is the target.

    ``choice_answer`` (multiple-choice rows): the target's format, "letter" (``The answer is B``, the default)
    or "text" (``The answer is <option>``; ``vpgtrans.multiple_choice``). Generate batches' references carry
    the options (``choices``), so either format can be read back.

    ``prepare`` builds a batch and touches no state (it runs in DataLoader workers, ``vpgtrans.loader``);
    ``account`` counts what it met, in the training process; calling the collator does both."""

    def __init__(self, tokenizer, template: PromptTemplate, task: str, num_query_tokens: int, image_processor,
                 is_encoder_decoder: bool, mode: str = "train", max_target_len: int = 64,
                 stats: LoadStats | None = None, t5_caption_split: str = "none", seed: int = 0,
                 choice_answer: str = "letter"):
        from vpgtrans.multiple_choice import check_choice_answer

        check_choice_answer(choice_answer)
        self.tokenizer = tokenizer
        self.template = template
        self.task = task
        self.num_query_tokens = num_query_tokens
        self.image_processor = image_processor
        self.is_encoder_decoder = is_encoder_decoder
        self.mode = mode
        self.max_target_len = max_target_len
        self.stats = stats if stats is not None else LoadStats()
        self.split_captions = (t5_caption_split == "random-prefix" and mode == "train" and task == "caption"
                               and is_encoder_decoder)
        self.seed = seed
        self.choice_answer = choice_answer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self._decoded = self._failed = 0
        self._pending: list[str] = []

    def _pad(self, sequences: list[list[int]], value: int, left: bool) -> torch.Tensor:
        width = max(len(s) for s in sequences)
        padded = [([value] * (width - len(s)) + s) if left else (s + [value] * (width - len(s))) for s in sequences]
        return torch.tensor(padded, dtype=torch.long)

    def _skip_image(self, kind: str, name: str, what: str) -> None:
        self._failed += 1
        if name not in self.stats._bad_images or self.stats.strict:
            self.stats._bad_images.add(name)
            self.stats.skip(kind, name, what)
            if self.stats.skipped_unreadable_image + self.stats.skipped_large_image <= 10:
                # Held back until one image has decoded: when none does, the error below says it all.
                self._pending.append(f"skipping {name}: {what}")
        if not self._decoded and self._failed >= min(NO_IMAGE_LIMIT, self.stats.rows or NO_IMAGE_LIMIT):
            raise VpgtransError(f"none of the first {self._failed} images could be used (e.g. {name}: {what}); "
                                "check the image files")

    def _flush_warnings(self) -> None:
        for message in self._pending:
            log.warning("%s", message)
        self._pending.clear()

    def __call__(self, rows: list[dict], draws: list[tuple[int, ...]] | None = None) -> dict:
        batch, outcomes = self.prepare(rows, draws)
        self.account(outcomes)
        return batch

    def account(self, outcomes: list) -> None:
        """Count what ``prepare`` met, row by row in order (``--strict`` and the no-readable-image stop raise
        here): in the training process, whichever process decoded the images."""
        for outcome in outcomes:
            if outcome is None:
                self._decoded += 1
            else:
                self._skip_image(*outcome)
        if self._decoded:
            self._flush_warnings()

    def prepare(self, rows: list[dict], draws: list[tuple[int, ...]] | None = None) -> tuple[dict, list]:
        """``(batch, outcomes)``: the batch of ``rows`` (``{}`` when no row is usable) and, for each row with an
        image, in order, ``None`` (decoded) or ``(kind, name, what)`` (left out). Touches no state, so it can
        run in a DataLoader worker; ``account`` then counts the outcomes. ``draws``: one key per row for its
        random choices (training: ``(epoch, row index)``), needed when captions are split."""
        if self.split_captions and (draws is None or len(draws) != len(rows)):
            raise ValueError("splitting captions needs one draw key per row (e.g. (epoch, row index))")
        images, kept, outcomes = [], [], []
        for position, row in enumerate(rows):
            if row.get("image") is None and self.task in IMAGE_OPTIONAL:
                kept.append(position)  # a text-only question: nothing to open
                continue
            try:
                images.append(open_image(row["image"]))
            except ImageTooLarge as exc:
                outcomes.append(("large_image", image_name(row["image"]),
                                 f"image too large ({type(exc).__name__}: {first_line(exc)})"))
                continue
            except Exception as exc:  # noqa: BLE001 - a corrupt image is skipped and counted, never fatal
                outcomes.append(("unreadable_image", image_name(row["image"]),
                                 f"unreadable image ({type(exc).__name__}: {first_line(exc)})"))
                continue
            outcomes.append(None)
            kept.append(position)
        if not kept:
            return {}, outcomes
        positions, kept = kept, [rows[position] for position in kept]
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"] if images else None
        # Multiple-choice prompts through the template's VQA slot: the question with its lettered options is
        # the question. Grounding has its own template (the referring expression is its {question}).
        prompt_task = self.task if self.task in ("caption", "grounding") else "vqa"
        question = (lambda r: None) if self.task == "caption" else (lambda r: r["question"])
        if self.task == "multiple-choice":
            from vpgtrans.multiple_choice import format_question as question
        has_image = [r.get("image") is not None for r in kept]
        if self.mode == "generate":
            ids = [prompt_ids(self.tokenizer, self.template, prompt_task, self.num_query_tokens, question(r),
                              self.is_encoder_decoder, image) for r, image in zip(kept, has_image)]
            left = not self.is_encoder_decoder
            input_ids = self._pad(ids, self.pad_id, left=left)
            attention_mask = self._pad([[1] * len(s) for s in ids], 0, left=left)
            references = [r["answers"] if self.task == "vqa" else list(r["box"]) if self.task == "grounding" else
                          {"answer": r["answer"], "num_choices": len(r["choices"]), "choices": list(r["choices"]),
                           "image": image}
                          if self.task == "multiple-choice" else
                          (r["caption"] if isinstance(r["caption"], list) else [r["caption"]])
                          for r, image in zip(kept, has_image)]
            return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                    "references": references, "positions": positions}, outcomes
        targets = [("", _target(r, self.task, self.choice_answer)) for r in kept]
        if self.split_captions:  # BLIP-2 FlanT5's prefix language modelling: (caption start, rest)
            targets = [split_caption(target, self.seed, draws[position])
                       for (_, target), position in zip(targets, positions)]
        examples = [training_example(self.tokenizer, self.template, prompt_task, self.num_query_tokens,
                                     target, question(r), self.is_encoder_decoder, self.max_target_len,
                                     image, caption_start=start)
                    for r, image, (start, target) in zip(kept, has_image, targets)]
        input_ids = self._pad([e["input_ids"] for e in examples], self.pad_id, left=False)
        attention_mask = self._pad([[1] * len(e["input_ids"]) for e in examples], 0, left=False)
        labels = self._pad([e["labels"] for e in examples], IGNORE_INDEX, left=False)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "pixel_values": pixel_values}, outcomes
