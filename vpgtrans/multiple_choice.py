"""Multiple-choice questions (ScienceQA style, LaVIN's evaluation): prompts with lettered options, the
answer parsed back from generated text, accuracy split by samples with and without an image.

Rows: ``{"question", "choices": [...], "answer": index, "image"?, "context"?}``. The prompt's question
is ``"<question> Context: <context> Options: (A) <choice> (B) <choice> ..."``; the training target is
``"The answer is <letter>"``. ``parse_answer`` never raises and never guesses: it reads ``The answer is
X`` (LaVIN's pattern, with or without brackets) anywhere in the text, else a bare letter (``B``,
``(B)``, ``B.``) as the whole answer, and returns ``None`` for anything else or a letter past the
options. Unparseable answers count as wrong and are reported separately (LaVIN picks a random letter).
"""

from __future__ import annotations

import re
import string

from vpgtrans.errors import VpgtransError

LETTERS = string.ascii_uppercase  # at most 26 options
MAX_ANSWER_CHARS = 500  # longer generations are scanned only this far

_STATED = re.compile(r"(?i:the answer is):?\s*\(?([A-Z])\)?(?![A-Za-z])")  # the letter itself: capital
_BARE = re.compile(r"\(?([A-Z])\)?[.)]?")


def choices_problem(choices, answer) -> str | None:
    """What makes ``choices`` / ``answer`` not a multiple-choice item, or None."""
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
        return f"'choices' must be a list of 2 to {len(LETTERS)} options"
    if not all(isinstance(c, str) and c.strip() for c in choices):
        return "'choices' must be non-empty strings"
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        return f"'answer' must be the index of the right option (0 to {len(choices) - 1})"
    return None


def format_question(row: dict) -> str:
    """The text that goes in the template's ``{question}``: question, context, lettered options."""
    options = " ".join(f"({LETTERS[i]}) {choice.strip()}" for i, choice in enumerate(row["choices"]))
    context = (row.get("context") or "").strip()
    return f"{row['question'].strip()}{f' Context: {context}' if context else ''} Options: {options}"


def target_text(answer: int) -> str:
    return f"The answer is {LETTERS[answer]}"


def parse_answer(text: str, num_choices: int) -> int | None:
    """The option index a generated answer names, or None (see the module docstring)."""
    if not isinstance(text, str):
        return None
    text = text[:MAX_ANSWER_CHARS].strip()
    match = _STATED.search(text)
    if match is None:
        match = _BARE.fullmatch(text)
    if match is None:
        return None
    index = LETTERS.index(match.group(1).upper())
    return index if index < num_choices else None


def multiple_choice_scores(predictions: list[str], references: list[dict]) -> dict:
    """Accuracy overall and split by samples with / without an image; unparseable answers are wrong and
    counted (``unparseable``). ``references[i]``: ``{"answer": index, "num_choices": n, "image": bool}``."""
    if len(predictions) != len(references):
        raise VpgtransError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise VpgtransError("no multiple-choice sample to score")
    right = {True: 0, False: 0}
    total = {True: 0, False: 0}
    unparseable = {True: 0, False: 0}
    for prediction, reference in zip(predictions, references):
        with_image = bool(reference["image"])
        parsed = parse_answer(prediction, reference["num_choices"])
        total[with_image] += 1
        unparseable[with_image] += parsed is None
        right[with_image] += parsed == reference["answer"]

    def rate(count: int, of: int) -> float | None:
        return count / of if of else None

    n = total[True] + total[False]
    return {"accuracy": (right[True] + right[False]) / n,
            "accuracy_image": rate(right[True], total[True]), "accuracy_text": rate(right[False], total[False]),
            "unparseable": unparseable[True] + unparseable[False], "unparseable_rate": (unparseable[True] + unparseable[False]) / n,
            "samples": n, "samples_image": total[True], "samples_text": total[False]}
