"""Scores for generated text: COCO captioning (CIDEr, BLEU) and VQAv2 accuracy.

Captions are scored with pycocoevalcap's own ``Cider`` and ``Bleu`` scorers, but tokenised by
``normalize_caption`` instead of pycocoevalcap's ``PTBTokenizer``, which shells out to Java. VQA accuracy
re-implements the official VQAv2 evaluation (``vqaEval.py``): answer normalisation, then the
leave-one-annotator-out "min(1, matches / 3)" score. All scores are fractions in [0, 1] except CIDEr
(which is on its usual 0-10 scale, about 1.0 for a good COCO model).
"""

from __future__ import annotations

import contextlib
import io
import re
from collections import Counter

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from vpgtrans.errors import VpgtransError

# --- captions ------------------------------------------------------------------------------------------

# Clitics the Stanford PTB tokenizer splits into their own token: "don't" -> "do n't", "dog's" -> "dog 's".
# They are words for BLEU / CIDEr, so they are kept; the bare quote marks around words are not.
_CLITICS = ("n't", "'s", "'re", "'ve", "'ll", "'d", "'m")
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
# Marks that the COCO pipeline drops (its PUNCTUATIONS list after PTB tokenisation): brackets, quotes,
# . , ! ? ; : and dash runs. A period or comma between digits is part of a number ("3.5", "2,000") and stays.
_CAPTION_PUNCTUATION = re.compile(r"""[!?;:()\[\]{}"`“”…]|-{2,}|(?<!\d)[.,]|[.,](?!\d)""")
# PTB makes currency and percent signs tokens of their own ("$5" -> "$ 5"); COCO keeps them.
_CAPTION_SYMBOL = re.compile(r"([$%])")


def normalize_caption(text: str) -> str:
    """A Java-free approximation of COCO's PTB tokenisation: lowercase, split off clitics, drop punctuation.

    Returns the tokens joined by single spaces, e.g. ``"A dog's toy, (red)!"`` -> ``"a dog 's toy red"``.
    Hyphenated words stay one token ("t-shirt"), as in PTB; unlike PTB, abbreviation periods are dropped
    too ("mr." -> "mr"), which only matters if references and predictions spell them differently.
    """
    text = text.lower().replace("’", "'").replace("‘", "'")
    text = re.sub(r"\bcannot\b", "can not", text)  # PTB splits this one as well
    text = _CLITIC.sub(r" \1", text)
    text = _CAPTION_PUNCTUATION.sub(" ", text)
    text = _CAPTION_SYMBOL.sub(r" \1 ", text)
    tokens = []
    for token in text.split():
        # A lone or edge quote / hyphen is punctuation; inner ones belong to the word ("o'clock", "x-ray").
        token = token if token in _CLITICS else token.strip("'-")
        if token:
            tokens.append(token)
    return " ".join(tokens)


CAPTION_TOKENIZERS = ("regex", "ptb")


def ptb_tokenize(captions: dict[int, list[str]]) -> dict[int, list[str]]:
    """COCO's own tokenisation: pycocoevalcap's ``PTBTokenizer`` (Stanford CoreNLP's PTB tokenizer, run with
    Java), for scores comparable with published COCO numbers."""
    import shutil

    if shutil.which("java") is None:
        raise VpgtransError("--tokenizer ptb runs COCO's PTB tokenizer, which needs Java (java on PATH); the "
                            "default regex tokenizer needs none")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    with contextlib.redirect_stdout(io.StringIO()):
        return PTBTokenizer().tokenize({i: [{"caption": c} for c in caps] for i, caps in captions.items()})


def caption_scores(predictions: list[str], references: list[list[str]], tokenizer: str = "regex") -> dict:
    """Corpus CIDEr-D, BLEU-4 and BLEU-1 of ``predictions`` against their reference captions.

    ``references[i]`` is the list of reference captions for ``predictions[i]`` (COCO has five). Both
    sides go through ``normalize_caption`` (``tokenizer="regex"``) or COCO's Java PTB tokenizer (``"ptb"``). An empty prediction is scored as it is, a hypothesis with no
    words: it matches nothing and counts towards BLEU's brevity penalty (pycocoevalcap handles it
    without error). CIDEr's idf comes from the references of this corpus, so a one-image corpus scores 0.

    Returns ``{"cider": float, "bleu4": float, "bleu1": float, "n": int}``.
    """
    _check_pairs(predictions, references, "reference captions")
    if tokenizer not in CAPTION_TOKENIZERS:
        raise VpgtransError(f"--tokenizer must be one of {', '.join(CAPTION_TOKENIZERS)} (got {tokenizer!r})")
    if tokenizer == "ptb":
        gts = ptb_tokenize({i: list(refs) for i, refs in enumerate(references)})
        res = ptb_tokenize({i: [prediction] for i, prediction in enumerate(predictions)})
    else:
        gts = {i: [normalize_caption(ref) for ref in refs] for i, refs in enumerate(references)}
        res = {i: [normalize_caption(prediction)] for i, prediction in enumerate(predictions)}
    # Without one worded reference a sample cannot be scored (and CIDEr's idf table would be empty).
    wordless = [i for i, refs in gts.items() if not any(refs)]
    if wordless:
        raise VpgtransError(f"no reference caption with any words for sample(s) {_list_indices(wordless)}; "
                            "drop those samples or fix their captions")
    # Bleu prints its counts ("{'testlen': ...}") to stdout; keep a library call quiet.
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, _ = Bleu(4).compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
    return {"cider": float(cider), "bleu4": float(bleu[3]), "bleu1": float(bleu[0]), "n": len(predictions)}


# --- VQA -----------------------------------------------------------------------------------------------

# The marks the official evaluation removes (periods are handled separately). Apostrophes and colons stay.
_VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                    ",", "?", "!")
_COMMA_IN_NUMBER = re.compile(r"\d,\d")
# The official pattern means "a period not between digits", but as written it drops every period that
# is not followed by a digit ("3.5" stays, "dog." and "5." lose theirs). We keep its actual behaviour.
_VQA_PERIOD = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# Answers typed without the apostrophe -> the annotation spelling. Forms that are also ordinary words
# ("well", "were", "its", "shed", "ill", "hell", "lets", "wed", "id") are deliberately absent, as in the
# official table.
_CONTRACTIONS = {word.replace("'", ""): word for word in """
    ain't aren't can't couldn't didn't doesn't don't hadn't hasn't haven't isn't mightn't mustn't needn't
    oughtn't shan't shouldn't wasn't weren't won't wouldn't could've might've must've should've would've
    he'd he's how'd how'll how's it'd it'll ma'am o'clock somebody's someone's something'll that's there'd
    there're there's they'd they'll they're they've we've what'll what're what's what've when's where'd
    where's where've who'd who'll who's who've why'll why're why's y'all you'd you'll you're you've
    """.split()}


def normalize_answer(text: str) -> str:
    """The official VQAv2 answer normalisation, e.g. ``"Two"`` -> ``"2"``, ``"the dog."`` -> ``"dog"``.

    Punctuation: a mark touching a space anywhere in the answer, or any mark in an answer with a comma
    inside a number ("2,000" -> "2000"), is deleted; otherwise it becomes a space ("black-and-white" ->
    "black and white"). Then: lowercase, number words to digits, articles dropped, contractions restored.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # Decide per mark on the original text, as the official code does: glued marks are separators.
    glue_numbers = _COMMA_IN_NUMBER.search(text) is not None
    cleaned = text
    for mark in _VQA_PUNCTUATION:
        separated = f"{mark} " in text or f" {mark}" in text
        cleaned = cleaned.replace(mark, "" if glue_numbers or separated else " ")
    cleaned = _VQA_PERIOD.sub("", cleaned)
    words = [_NUMBER_WORDS.get(word, word) for word in cleaned.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Official VQAv2 accuracy of one prediction against the annotators' ``answers`` (normally ten).

    For each annotator, ``min(1, #other annotators who gave the prediction / 3)``, averaged over the
    annotators — the average of ``min(1, matches / 3)`` over the leave-one-out subsets. Fewer than ten
    answers use the same formula, so with n answers the best score is ``min(1, (n - 1) / 3)``. A single
    answer has no "others"; there the score is exact match (1.0 or 0.0) rather than always 0.

    Unlike ``vqaEval.py``, the answers get the full ``normalize_answer`` too (it only strips their
    punctuation, since the VQAv2 annotation files are already normalised); on those files it is the same.
    """
    if not answers:
        raise VpgtransError("no reference answers to score the VQA prediction against; pass at least one")
    guess = normalize_answer(prediction)
    gold = [normalize_answer(answer) for answer in answers]
    if len(gold) == 1:
        return float(guess == gold[0])
    matches = sum(answer == guess for answer in gold)
    # Leaving annotator i out removes one match exactly when annotator i gave the predicted answer.
    return sum(min(1.0, (matches - (answer == guess)) / 3) for answer in gold) / len(gold)


def vqa_scores(predictions: list[str], answers: list[list[str]], answer_types: list[str | None] | None = None) -> dict:
    """Mean VQAv2 accuracy and exact match of ``predictions`` against each question's ``answers``.

    Exact match: the normalised prediction equals the normalised most common answer (on a tie, any of
    the most common). Returns ``{"vqa_accuracy": float, "exact_match": float, "n": int}``, fractions in [0, 1].
    With ``answer_types`` (one per question, VQAv2's ``yes/no``, ``number``, ``other``; None where a question
    has none), ``by_answer_type`` adds ``{type: {"vqa_accuracy", "exact_match", "n"}}``: each the mean over
    the questions of that type, as the official evaluation's ``perAnswerType`` (which prints it x100).
    """
    _check_pairs(predictions, answers, "answers")
    if answer_types is not None and len(answer_types) != len(predictions):
        raise VpgtransError(f"{len(predictions)} predictions but {len(answer_types)} answer types")
    per_question = []  # (accuracy, exact match) of each question
    for prediction, gold in zip(predictions, answers):
        counts = Counter(normalize_answer(answer) for answer in gold)
        exact = counts[normalize_answer(prediction)] == max(counts.values())
        per_question.append((vqa_accuracy(prediction, gold), float(exact)))
    scores = _mean_scores(per_question)
    kinds = sorted({kind for kind in answer_types or () if kind is not None})
    if kinds:
        scores["by_answer_type"] = {kind: _mean_scores([q for q, k in zip(per_question, answer_types) if k == kind])
                                    for kind in kinds}
    return scores


def _mean_scores(per_question: list[tuple[float, float]]) -> dict:
    n = len(per_question)
    return {"vqa_accuracy": sum(a for a, _ in per_question) / n, "exact_match": sum(e for _, e in per_question) / n,
            "n": n}


# --- input checks --------------------------------------------------------------------------------------

def _check_pairs(predictions: list[str], references: list[list[str]], what: str) -> None:
    """Raise one ``VpgtransError`` naming every way ``predictions`` / ``references`` cannot be scored."""
    if len(predictions) != len(references):
        raise VpgtransError(f"{len(predictions)} predictions but {len(references)} lists of {what}; "
                            "pass exactly one list per prediction")
    if not predictions:
        raise VpgtransError("nothing to score: the list of predictions is empty")
    problems = []
    # A bare string would be iterated character by character, silently giving nonsense scores.
    not_lists = [i for i, refs in enumerate(references) if not isinstance(refs, (list, tuple))]
    if not_lists:
        problems.append(f"{what} for sample(s) {_list_indices(not_lists)} are not a list (wrap a single one in [...])")
    empty = [i for i, refs in enumerate(references) if isinstance(refs, (list, tuple)) and not refs]
    if empty:
        problems.append(f"no {what} for sample(s) {_list_indices(empty)}")
    not_text = [i for i, prediction in enumerate(predictions) if not isinstance(prediction, str)]
    if not_text:
        problems.append(f"prediction(s) {_list_indices(not_text)} are not strings")
    if problems:
        raise VpgtransError("; ".join(problems) + "; every prediction needs a string and a non-empty list")


def _list_indices(indices: list[int], shown: int = 5) -> str:
    """``[3, 8]`` -> ``"3, 8"``; long lists are cut: ``"0, 1, 2, 3, 4, ... (12 in all)"``."""
    head = ", ".join(str(i) for i in indices[:shown])
    return head if len(indices) <= shown else f"{head}, ... ({len(indices)} in all)"
