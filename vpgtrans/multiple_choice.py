"""Multiple-choice questions (ScienceQA style, LaVIN's evaluation): prompts with lettered options, the
answer parsed back from generated text, accuracy split by samples with and without an image.

Rows: ``{"question", "choices": [...], "answer": index, "image"?, "context"?}``. The prompt's question
is ``"<question> Context: <context> Options: (A) <choice> (B) <choice> ..."`` in both answer formats
(``choice_answer``, ``vpgtrans.config.CHOICE_ANSWERS``); the training target is

- ``letter`` (LaVIN's, the default): ``"The answer is <letter>"``;
- ``text``: ``"The answer is <the option's own words>"`` (as written in the row, stripped).

Parsing never raises and never guesses; ``None`` is an unparseable answer. ``letter`` (``parse_answer``)
reads ``The answer is X`` (LaVIN's pattern, with or without brackets) anywhere in the text, else a bare
letter (``B``, ``(B)``, ``B.``) as the whole answer; a letter past the options is ``None``. ``text``
(``parse_text_answer``) compares case-folded text with runs of whitespace made one space and trailing
``. , ; : ! ?`` ignored, on the options too: every ``The answer is <option>`` in the text (the option
ending at a word boundary, a hyphen being part of the word, so ``top`` is not read in ``top-left``; of
options that both fit there, the longer: ``big red`` over ``big``), else the whole answer equal to an
option. Naming no option, or two different ones (also: two options that are equal once normalised), is
``None``. A bare letter is not an option's text. Unparseable answers count as wrong and are reported
separately (LaVIN picks a random letter).
"""

from __future__ import annotations

import re
import string

from vpgtrans.config import CHOICE_ANSWERS
from vpgtrans.errors import VpgtransError

LETTERS = string.ascii_uppercase  # at most 26 options
MAX_ANSWER_CHARS = 500  # longer generations are scanned only this far
STATED = "The answer is"  # LaVIN's answer prefix, in both formats

_STATED = re.compile(r"(?i:the answer is):?\s*\(?([A-Z])\)?(?![A-Za-z])")  # the letter itself: capital
_BARE = re.compile(r"\(?([A-Z])\)?[.)]?")
_STATED_TEXT = re.compile(r"(?<![\w-])the answer is(?![\w-]):?\s*")  # on case-folded text
_TRAILING = ".,;:!? "


def check_choice_answer(choice_answer: str) -> None:
    if choice_answer not in CHOICE_ANSWERS:
        raise VpgtransError(f"--choice-answer must be one of {', '.join(CHOICE_ANSWERS)} (got {choice_answer!r})")


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


def option_text(answer: int, choices: list[str], choice_answer: str = "letter") -> str:
    """What the target of option ``answer`` states after ``The answer is``: its letter, or its own words."""
    check_choice_answer(choice_answer)
    return LETTERS[answer] if choice_answer == "letter" else choices[answer].strip()


def target_text(answer: int, choices: list[str], choice_answer: str = "letter") -> str:
    """The training target of option ``answer`` (and what likelihood scoring scores for each option)."""
    return f"{STATED} {option_text(answer, choices, choice_answer)}"


def per_byte(log_likelihoods: list[float], options: list[str]) -> list[float]:
    """Each option's log-likelihood divided by the length of its text in UTF-8 bytes: the score of
    lm-evaluation-harness's length-normalised pick. The harness computes ``pred_norm = np.argmax(lls /
    completion_len)`` with ``completion_len = [float(len(i)) for i in choices]`` for ``acc_norm`` (Python
    characters) and ``byte_length = [float(len(i.encode("utf-8"))) for i in choices]`` for ``acc_bytes``;
    this is the byte length, the same number as ``acc_norm``'s for ASCII options."""
    return [ll / len(option.encode("utf-8")) for ll, option in zip(log_likelihoods, options)]


def parse_answer(text: str, num_choices: int) -> int | None:
    """The option index a generated ``letter`` answer names, or None (see the module docstring)."""
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


def _normal(text: str) -> str:
    """Case-folded, whitespace runs as one space, trailing ``. , ; : ! ?`` and spaces dropped."""
    return " ".join(text.casefold().split()).rstrip(_TRAILING)


def _ends_word(text: str, end: int) -> bool:
    return end == len(text) or not (text[end].isalnum() or text[end] in "-_")


def parse_text_answer(text: str, choices: list[str]) -> int | None:
    """The option index a generated ``text`` answer names, or None (see the module docstring)."""
    if not isinstance(text, str):
        return None
    text = " ".join(text[:MAX_ANSWER_CHARS].casefold().split())
    options = [_normal(choice) for choice in choices]
    named: set[int] = set()
    for stated in _STATED_TEXT.finditer(text):
        rest = text[stated.end():]
        fits = [o for o in options if o and rest.startswith(o) and _ends_word(rest, len(o))]
        if fits:  # options that fit at one place nest (each starts the same text): the longest is what is said
            longest = max(fits, key=len)
            named.update(i for i, option in enumerate(options) if option == longest)
    if not named:
        whole = text.rstrip(_TRAILING)
        named = {i for i, option in enumerate(options) if option and option == whole}
    return named.pop() if len(named) == 1 else None


def read_answer(text: str, reference: dict, choice_answer: str = "letter") -> int | None:
    """The option a generated answer names in format ``choice_answer``; ``reference``: ``{"num_choices"}``
    (letter), ``{"choices"}`` (text)."""
    if choice_answer == "letter":
        return parse_answer(text, reference["num_choices"])
    check_choice_answer(choice_answer)
    if not isinstance(reference.get("choices"), list):
        raise VpgtransError("text answers are read against the options: the references need 'choices'")
    return parse_text_answer(text, reference["choices"])


def option_histogram(predictions: list[str], references: list[dict], choice_answer: str = "letter") -> dict:
    """How often each option was answered: ``by_position`` (``A``, ``B``, ... and ``unparseable``) and, where
    the references carry the options, ``by_value`` (the option's text, case-folded): a model that answers
    one letter, or one word, to everything shows as one bar."""
    by_position: dict[str, int] = {}
    by_value: dict[str, int] = {}
    for prediction, reference in zip(predictions, references):
        index = read_answer(prediction, reference, choice_answer)
        key = "unparseable" if index is None else LETTERS[index]
        by_position[key] = by_position.get(key, 0) + 1
        if isinstance(reference.get("choices"), list):
            value = "unparseable" if index is None else _normal(reference["choices"][index])
            by_value[value] = by_value.get(value, 0) + 1
    histogram = {"by_position": dict(sorted(by_position.items()))}
    if by_value:
        histogram["by_value"] = dict(sorted(by_value.items(), key=lambda item: (-item[1], item[0])))
    return histogram


def multiple_choice_scores(predictions: list[str], references: list[dict], choice_answer: str = "letter",
                           predictions_norm: list[str] | None = None) -> dict:
    """Accuracy overall and split by samples with / without an image; unparseable answers are wrong and
    counted (``unparseable``). ``references[i]``: ``{"answer": index, "num_choices": n, "image": bool}``, and
    ``"choices"`` (the options) when ``choice_answer`` is "text". ``predictions_norm`` (likelihood scoring:
    the length-normalised picks, one per prediction) adds their accuracy as ``accuracy_norm``,
    ``accuracy_norm_image``, ``accuracy_norm_text``."""
    check_choice_answer(choice_answer)
    if len(predictions) != len(references):
        raise VpgtransError(f"{len(predictions)} predictions for {len(references)} references")
    if predictions_norm is not None and len(predictions_norm) != len(references):
        raise VpgtransError(f"{len(predictions_norm)} length-normalised predictions for {len(references)} references")
    if not predictions:
        raise VpgtransError("no multiple-choice sample to score")
    right = {True: 0, False: 0}
    right_norm = {True: 0, False: 0}
    total = {True: 0, False: 0}
    unparseable = {True: 0, False: 0}
    for i, (prediction, reference) in enumerate(zip(predictions, references)):
        with_image = bool(reference["image"])
        parsed = read_answer(prediction, reference, choice_answer)
        total[with_image] += 1
        unparseable[with_image] += parsed is None
        right[with_image] += parsed == reference["answer"]
        if predictions_norm is not None:
            picked = read_answer(predictions_norm[i], reference, choice_answer)
            right_norm[with_image] += picked == reference["answer"]

    def rate(count: int, of: int) -> float | None:
        return count / of if of else None

    n = total[True] + total[False]
    scores = {"accuracy": (right[True] + right[False]) / n,
              "accuracy_image": rate(right[True], total[True]), "accuracy_text": rate(right[False], total[False])}
    if predictions_norm is not None:
        scores.update({"accuracy_norm": (right_norm[True] + right_norm[False]) / n,
                       "accuracy_norm_image": rate(right_norm[True], total[True]),
                       "accuracy_norm_text": rate(right_norm[False], total[False])})
    return {**scores, "unparseable": unparseable[True] + unparseable[False],
            "unparseable_rate": (unparseable[True] + unparseable[False]) / n,
            "samples": n, "samples_image": total[True], "samples_text": total[False]}
