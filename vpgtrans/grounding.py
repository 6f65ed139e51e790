"""Referring-expression grounding as text: boxes written ``x1,y1,x2,y2`` in normalised [0, 1]
coordinates (InfMLLM's answer format), parsed back, and scored by IoU.

``parse_box`` never raises: it returns the box or ``None``. It accepts spaces, one pair of brackets
(``[]``, ``()``, ``{}``, ``<>``), commas and/or spaces between the numbers, a trailing period, and
cuts the text at a stop string; anything else — other words, fewer or more than four numbers,
coordinates outside [0, 1], ``x2 < x1`` or ``y2 < y1``, NaN — is not a box. A box with zero width or
height parses (it is a poor answer, not a malformed one) and has IoU 0 with everything.
"""

from __future__ import annotations

import math
import re
from numbers import Real

from vpgtrans.errors import VpgtransError

Box = tuple[float, float, float, float]
MAX_ANSWER_CHARS = 200  # a box answer is short; longer text is not one (and is never regex-scanned)

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_SEP = r"(?:\s*,\s*|\s+)"
_BOX = re.compile(rf"[\[({{<]?\s*({_NUMBER}){_SEP}({_NUMBER}){_SEP}({_NUMBER}){_SEP}({_NUMBER})\s*[\])}}>]?\s*\.?")


def box_problem(value) -> str | None:
    """What makes ``value`` not a ground-truth box (four numbers, ``0 <= x1 < x2 <= 1``,
    ``0 <= y1 < y2 <= 1``), or ``None`` when it is one."""
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return "must be a list of four numbers [x1, y1, x2, y2]"
    if not all(isinstance(v, Real) and not isinstance(v, bool) for v in value):
        return "must hold numbers only"
    x1, y1, x2, y2 = (float(v) for v in value)
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in (x1, y1, x2, y2)):
        return "coordinates must be normalised to [0, 1]"
    if not (x1 < x2 and y1 < y2):
        return "needs x1 < x2 and y1 < y2"
    return None


def parse_box(text, stop: str | None = None) -> Box | None:
    """``"[0.1, 0.2, 0.5, 0.9]"`` -> ``(0.1, 0.2, 0.5, 0.9)``; ``None`` when the text is not one box."""
    if not isinstance(text, str):
        return None
    if stop and stop in text:
        text = text.split(stop, 1)[0]
    text = text.strip()
    if len(text) > MAX_ANSWER_CHARS:
        return None
    match = _BOX.fullmatch(text)
    if match is None:
        return None
    return _answer_box([float(group) for group in match.groups()])


def _answer_box(values) -> Box | None:
    """Four numbers as an answer box, or ``None``: in [0, 1] (not NaN), ``x1 <= x2``, ``y1 <= y2``."""
    if not isinstance(values, (list, tuple)) or len(values) != 4 or \
            not all(isinstance(v, Real) and not isinstance(v, bool) for v in values):
        return None
    x1, y1, x2, y2 = (float(v) for v in values)
    if not all(0.0 <= v <= 1.0 for v in (x1, y1, x2, y2)):  # also false for NaN
        return None
    if x2 < x1 or y2 < y1:
        return None
    return (x1, y1, x2, y2)


def format_box(box, digits: int = 3) -> str:
    """The answer text of a box: ``"0.100,0.200,0.500,0.900"``."""
    return ",".join(f"{float(v):.{digits}f}" for v in box)


def box_iou(a, b) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes; 0 when the union is empty."""
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    width = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    height = max(0.0, min(ay2, by2) - max(ay1, by1))
    intersection = width * height
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - intersection
    return intersection / union if union > 0 else 0.0


def grounding_accuracy(predictions: list, boxes: list, threshold: float = 0.5) -> dict:
    """Accuracy at IoU >= ``threshold`` (RefCOCO's metric), mean IoU, and the predictions that do not
    parse as a box, counted apart. ``predictions`` are answer texts (or boxes / ``None``); an unparseable
    one scores IoU 0. Returns ``{"acc_iou50", "mean_iou", "parsed", "unparseable", "n"}``: fractions in
    [0, 1] but ``unparseable`` and ``n``, which are counts (``acc_iou50`` is at ``threshold``, 0.5 unless
    asked otherwise)."""
    if not 0 < threshold <= 1:
        raise VpgtransError(f"IoU threshold must be in (0, 1] (got {threshold})")
    if len(predictions) != len(boxes):
        raise VpgtransError(f"{len(predictions)} predictions but {len(boxes)} boxes; pass one box per prediction")
    if not predictions:
        raise VpgtransError("nothing to score: the list of predictions is empty")
    bad = [i for i, box in enumerate(boxes) if box_problem(box)]
    if bad:
        raise VpgtransError(f"reference box(es) {', '.join(map(str, bad[:5]))} are not valid boxes "
                            f"({box_problem(boxes[bad[0]])})")
    hits = parsed = 0
    total_iou = 0.0
    for prediction, box in zip(predictions, boxes):
        guess = parse_box(prediction) if isinstance(prediction, str) else _answer_box(prediction)
        if guess is None:
            continue
        parsed += 1
        iou = box_iou(guess, box)
        total_iou += iou
        hits += iou >= threshold
    n = len(predictions)
    return {"acc_iou50": hits / n, "mean_iou": total_iou / n, "parsed": parsed / n, "unparseable": n - parsed, "n": n}


CENTRE_BOX = (0.25, 0.25, 0.75, 0.75)  # the middle half of the image on each axis


def grounding_baselines(rows: list[dict]) -> dict:
    """What a model that ignores the expression scores on ``rows`` (grounding rows: ``image``, ``box``,
    optional ``objects``), beside the model's own scores:

    ``centre_box``      always the box ``CENTRE_BOX``;
    ``largest_object``  the largest of the image's known objects: the boxes of every row of the same image
                        plus the row's ``objects``. Scored only on rows whose image has two or more known
                        objects (with one, it would be the answer itself); ``n`` says how many.
    """
    boxes = [list(row["box"]) for row in rows]
    candidates: dict[str, set] = {}
    for row in rows:
        known = candidates.setdefault(str(row["image"]), set())
        known.add(tuple(row["box"]))
        known.update(tuple(box) for box in row.get("objects") or ())
    area = lambda box: (box[2] - box[0]) * (box[3] - box[1])  # noqa: E731
    scored = [(max(candidates[str(row["image"])], key=area), list(row["box"])) for row in rows
              if len(candidates[str(row["image"])]) >= 2]
    result = {"centre_box": _baseline([CENTRE_BOX] * len(boxes), boxes)}
    result["largest_object"] = _baseline([g for g, _ in scored], [b for _, b in scored]) if scored else \
        {"acc_iou50": None, "mean_iou": None, "n": 0}
    return result


def _baseline(guesses: list, boxes: list) -> dict:
    scores = grounding_accuracy(guesses, boxes)
    return {"acc_iou50": scores["acc_iou50"], "mean_iou": scores["mean_iou"], "n": scores["n"]}
