"""A deterministic synthetic visual world: small PIL images of coloured shapes, with captions, VQA rows
and boxes, plus a text corpus that teaches a tiny LM to describe a scene written in front of it.

A scene holds 1..``max_objects`` objects, each with a colour, a shape, a size and a position: a cell of a
3x3 grid, named by one word ("top-left", "top", ..., "center", ..., "bottom-right"), so every VQA answer
is a single word. Objects are listed in reading order of their cells. Everything is drawn from
``random.Random`` seeded by the caller: a seed gives the same files byte for byte.

Split directories are what ``vpgtrans.data.load_rows`` reads: ``data.jsonl`` + ``images/*.png`` (+ a
``world.json`` with the generation parameters). Rows carry the ground truth too (``objects``, ``box``:
normalised ``[x1, y1, x2, y2]``) for scoring and for later grounding work.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from vpgtrans.errors import VpgtransError

WORLD_VERSION = 1
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230),
    "yellow": (235, 215, 40), "purple": (150, 60, 200), "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES: dict[str, float] = {"small": 0.14, "large": 0.22}  # radius as a fraction of the image side
POSITIONS = ("top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right")
ATTRIBUTES = ("color", "shape", "size", "position")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TASKS = ("caption", "vqa")

_CELL_CENTRES = (0.2, 0.5, 0.8)  # grid cell centres as fractions of the image side
_JITTER = 0.04  # centre jitter, fraction of the side
_SUPERSAMPLE = 4  # draw at 4x and downsample: antialiased edges keep small shapes recognisable
# (weight, template): a few forms so captions are not all alike; the objects are always listed alike.
_CAPTION_TEMPLATES = ((5, "{objects}"), (2, "there is {objects}"), (2, "a picture of {objects}"),
                      (1, "an image with {objects}"))
_PLURALS = {"cross": "crosses"}


# ---------------------------------------------------------------------------------------------- scenes

def position_phrase(position: str) -> str:
    """"left" -> "on the left", "top-left" -> "at the top-left", "center" -> "in the center"."""
    if position == "center":
        return "in the center"
    return f"on the {position}" if position in ("left", "right") else f"at the {position}"


def _extent(shape: str, radius: float) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a shape drawn around (0, 0) by ``_draw`` — the box, analytically."""
    if shape == "square":
        return (-0.85 * radius, -0.85 * radius, 0.85 * radius, 0.85 * radius)
    if shape == "triangle":
        return (-0.95 * radius, -radius, 0.95 * radius, 0.8 * radius)
    return (-radius, -radius, radius, radius)  # circle, cross


def _object(rng: random.Random, cell: int) -> dict:
    row, col = divmod(cell, 3)
    size = rng.choice(tuple(SIZES))
    shape = rng.choice(SHAPES)
    obj = {"color": rng.choice(tuple(COLORS)), "shape": shape, "size": size, "position": POSITIONS[cell]}
    cx = _CELL_CENTRES[col] + rng.uniform(-_JITTER, _JITTER)
    cy = _CELL_CENTRES[row] + rng.uniform(-_JITTER, _JITTER)
    radius = SIZES[size] * rng.uniform(0.9, 1.1)
    left, top, right, bottom = _extent(shape, radius)
    obj["box"] = [round(min(max(v, 0.0), 1.0), 4) for v in (cx + left, cy + top, cx + right, cy + bottom)]
    obj["_geometry"] = (cx, cy, radius)  # fractions of the side; dropped from the rows
    obj["_shade"] = tuple(rng.randint(-20, 20) for _ in range(3))
    return obj


def _overlap(a: dict, b: dict) -> bool:
    (ax, ay, ar), (bx, by, br) = a["_geometry"], b["_geometry"]
    return ((ax - bx) ** 2 + (ay - by) ** 2) ** 0.5 < ar + br + 0.02  # shapes fit in their radius


def sample_scene(rng: random.Random, max_objects: int = 1) -> dict:
    """A scene: ``{"background": int grey level, "objects": [object dicts in reading order]}``.
    Several objects sit in distinct cells and are re-drawn until they do not touch (a scene too
    crowded to draw that way gets fewer objects)."""
    count = rng.randint(1, max_objects)
    while True:
        for _ in range(100):
            cells = sorted(rng.sample(range(len(POSITIONS)), count))
            objects = [_object(rng, cell) for cell in cells]
            if not any(_overlap(a, b) for i, a in enumerate(objects) for b in objects[i + 1:]):
                return {"background": rng.randint(0, 50), "objects": objects}
        count -= 1  # too crowded for these sizes: one object fewer (one always fits)


def _draw(draw, shape: str, cx: float, cy: float, radius: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif shape == "square":
        half = 0.85 * radius
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - 0.95 * radius, cy + 0.8 * radius),
                      (cx + 0.95 * radius, cy + 0.8 * radius)], fill=fill)
    elif shape == "cross":
        arm = 0.3 * radius
        draw.rectangle([cx - radius, cy - arm, cx + radius, cy + arm], fill=fill)
        draw.rectangle([cx - arm, cy - radius, cx + arm, cy + radius], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_scene(scene: dict, image_size: int = 32):
    """The scene as an RGB ``PIL.Image`` of ``image_size`` x ``image_size``."""
    from PIL import Image, ImageDraw

    side = image_size * _SUPERSAMPLE
    grey = scene["background"]
    image = Image.new("RGB", (side, side), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    for obj in scene["objects"]:
        cx, cy, radius = (v * side for v in obj["_geometry"])
        fill = tuple(min(max(c + d, 0), 255) for c, d in zip(COLORS[obj["color"]], obj["_shade"]))
        _draw(draw, obj["shape"], cx, cy, radius, fill)
    return image.resize((image_size, image_size), Image.Resampling.BOX)


def public_objects(scene: dict) -> list[dict]:
    """The objects as stored on rows: attributes and box, no drawing details."""
    return [{k: v for k, v in obj.items() if not k.startswith("_")} for obj in scene["objects"]]


# ------------------------------------------------------------------------------------------- language

def describe(obj: dict) -> str:
    """"a small red circle on the left"."""
    return f"a {obj['size']} {obj['color']} {obj['shape']} {position_phrase(obj['position'])}"


def caption_for(scene: dict, rng: random.Random) -> str:
    """A caption naming every object's attributes, in one of a few template forms."""
    weights, templates = zip(*_CAPTION_TEMPLATES)
    template = rng.choices(templates, weights=weights)[0]
    return template.format(objects=" and ".join(describe(obj) for obj in scene["objects"]))


def _references(obj: dict, objects: list[dict], asked: str) -> list[str]:
    """Noun phrases that pick out ``obj`` among ``objects`` without naming the ``asked`` attribute."""
    options = [  # (attributes used, phrase), simplest first
        (("shape",), f"the {obj['shape']}"),
        (("color",), f"the {obj['color']} object"),
        (("color", "shape"), f"the {obj['color']} {obj['shape']}"),
        (("size", "shape"), f"the {obj['size']} {obj['shape']}"),
        (("position",), f"the object {position_phrase(obj['position'])}"),
    ]
    unique = []
    for used, phrase in options:
        if asked in used:
            continue
        if sum(all(o[a] == obj[a] for a in used) for o in objects) == 1:
            unique.append(phrase)
    return unique


def _plural(shape: str) -> str:
    return _PLURALS.get(shape, shape + "s")


def question_for(scene: dict, rng: random.Random, kinds: tuple[str, ...] | None = None) -> dict:
    """One VQA item: ``{"question", "answer", "answer_type", "alternatives", "box"}``; ``alternatives``
    are the wrong answers of the same type (annotator noise is drawn from them)."""
    objects = scene["objects"]
    if kinds is None:
        kinds = ("color", "shape", "size", "position", "yesno") + (("count",) if len(objects) > 1 else ())
    kind = rng.choice(kinds)
    obj = rng.choice(objects)
    asked = rng.choice(("color", "shape", "size")) if kind == "yesno" else kind
    if kind != "count" and not _references(obj, objects, asked):  # twins: no phrase tells them apart
        kind = "count"
    if kind == "count":
        if rng.random() < 0.5:
            question, answer = "how many objects are there?", NUMBERS[len(objects)]
        else:
            shape = rng.choice(objects)["shape"]
            question = f"how many {_plural(shape)} are there?"
            answer = NUMBERS[sum(o["shape"] == shape for o in objects)]
        boxes = [o["box"] for o in objects]
        box = [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]
        alternatives = [n for n in NUMBERS[1:len(POSITIONS) + 1] if n != answer]
        return {"question": question, "answer": answer, "answer_type": "count", "alternatives": alternatives,
                "box": box}
    values = {"color": tuple(COLORS), "shape": SHAPES, "size": tuple(SIZES), "position": POSITIONS}
    if kind == "yesno":
        attribute = asked
        wrong = [v for v in values[attribute] if v != obj[attribute]]
        value = obj[attribute] if rng.random() < 0.5 else rng.choice(wrong)
        refs = _references(obj, objects, attribute)
        ref = refs[0] if rng.random() < 0.6 else rng.choice(refs)
        question = f"is {ref} a {value}?" if attribute == "shape" else f"is {ref} {value}?"
        answer = "yes" if value == obj[attribute] else "no"
        return {"question": question, "answer": answer, "answer_type": "yesno",
                "alternatives": ["no" if answer == "yes" else "yes"], "box": obj["box"]}
    refs = _references(obj, objects, kind)
    ref = refs[0] if rng.random() < 0.6 else rng.choice(refs)
    question = {"color": f"what color is {ref}?", "shape": f"what shape is {ref}?",
                "size": rng.choice((f"what size is {ref}?", f"is {ref} small or large?")),
                "position": f"where is {ref}?"}[kind]
    answer = obj[kind]
    return {"question": question, "answer": answer, "answer_type": kind,
            "alternatives": [v for v in values[kind] if v != answer], "box": obj["box"]}


def annotator_answers(answer: str, alternatives: list[str], rng: random.Random, count: int = 10) -> list[str]:
    """``count`` VQA answers, mostly the right one (at most 3 wrong, as human annotators disagree)."""
    wrong = rng.choice((0, 0, 1, 1, 2, 3)) if alternatives else 0
    answers = [answer] * (count - wrong) + [rng.choice(alternatives) for _ in range(wrong)]
    rng.shuffle(answers)
    return answers


# -------------------------------------------------------------------------------------------- splits

def _validate(task: str, n: int, image_size: int, max_objects: int) -> None:
    problems = []
    if task not in TASKS:
        problems.append(f"task must be one of {', '.join(TASKS)} (got {task!r})")
    if not isinstance(n, int) or n < 1:
        problems.append(f"n must be a positive integer (got {n!r})")
    if not isinstance(image_size, int) or image_size < 16:
        problems.append(f"image_size must be an integer >= 16 (got {image_size!r})")
    if not isinstance(max_objects, int) or not 1 <= max_objects <= len(POSITIONS):
        problems.append(f"max_objects must be an integer in 1..{len(POSITIONS)} (got {max_objects!r})")
    if problems:
        raise VpgtransError("world split: " + "; ".join(problems))


def make_split(out_dir: str | Path, task: str, n: int, seed: int, image_size: int = 32,
               max_objects: int = 1) -> Path:
    """Write ``n`` rows of ``task`` ("caption" | "vqa") to ``out_dir/data.jsonl`` + ``out_dir/images/``.

    Caption rows: ``{"image", "caption", "box", "objects"}``; VQA rows: ``{"image", "question",
    "answers" (10), "answer_type", "box", "objects"}``. Same arguments -> same files.
    """
    _validate(task, n, image_size, max_objects)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"vpgtrans-world:{task}:{seed}")
    rows = []
    for i in range(1, n + 1):
        scene = sample_scene(rng, max_objects)
        name = f"images/{i:06d}.png"
        render_scene(scene, image_size).save(out_dir / name, optimize=False)
        row = {"image": name}
        if task == "caption":
            row.update(caption=caption_for(scene, rng), box=scene["objects"][0]["box"])
        else:
            item = question_for(scene, rng)
            row.update(question=item["question"], answers=annotator_answers(item["answer"], item["alternatives"], rng),
                       answer_type=item["answer_type"], box=item["box"])
        row["objects"] = public_objects(scene)
        rows.append(row)
    with open(out_dir / "data.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
    meta = {"world_version": WORLD_VERSION, "task": task, "n": n, "seed": seed, "image_size": image_size,
            "max_objects": max_objects}
    (out_dir / "world.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def make_world(out_dir: str | Path, n_train: int = 2000, n_eval: int = 200, seed: int = 0, image_size: int = 32,
               max_objects: int = 1) -> dict[str, Path]:
    """``caption_train``, ``caption_eval``, ``vqa_train``, ``vqa_eval`` under ``out_dir``; train and eval
    use disjoint seeds (2*seed and 2*seed + 1)."""
    out_dir = Path(out_dir)
    splits = {}
    for task in TASKS:
        for part, n, split_seed in (("train", n_train, 2 * seed), ("eval", n_eval, 2 * seed + 1)):
            splits[f"{task}_{part}"] = make_split(out_dir / f"{task}_{part}", task, n, split_seed, image_size,
                                                  max_objects)
    return splits


# ------------------------------------------------------------------------------------------- corpus

def _context(scene: dict, rng: random.Random) -> str:
    """The scene written as an attribute list, the stand-in for soft prompts during LM pre-training:
    "red circle small left" or "size small , color red , shape circle , position left" (any order)."""
    parts = []
    keyed = rng.random() < 0.5
    for obj in scene["objects"]:
        order = list(ATTRIBUTES)
        if rng.random() < 0.5:
            rng.shuffle(order)
        parts.append(" , ".join(f"{a} {obj[a]}" for a in order) if keyed else " ".join(obj[a] for a in order))
    return " ; ".join(parts)


def world_text_pairs(n: int, seed: int, max_objects: int = 1) -> list[tuple[str, str]]:
    """``n`` (context, text) pairs: the text (a caption, or ``Question: ... Answer: ...`` in BLIP-2's VQA
    prompt form) describes the scene written in the context, so an LM trained on
    ``[context][BOS][text]`` learns to copy attributes from in front of its BOS — where the MLLM later
    puts its soft prompts (DESIGN §5)."""
    rng = random.Random(f"vpgtrans-corpus:{seed}")
    pairs = []
    for _ in range(n):
        scene = sample_scene(rng, max_objects)
        context = _context(scene, rng)
        if rng.random() < 0.6:
            text = caption_for(scene, rng)
        else:
            item = question_for(scene, rng)
            text = f"Question: {item['question']} Answer: {item['answer']}"
        pairs.append((context, text))
    return pairs


def world_text_corpus(n: int, seed: int, max_objects: int = 1) -> list[str]:
    """``n`` lines "context . text", e.g. "red circle small left . a small red circle on the left"."""
    return [f"{context} . {text}" for context, text in world_text_pairs(n, seed, max_objects)]


# ------------------------------------------------------------------------------------------- scoring

_WORD = re.compile(r"[a-z]+(?:-[a-z]+)?")


def parse_caption(text: str) -> list[dict]:
    """Attributes named in a caption, one dict per " and "-separated object (``None`` where missing)."""
    found = []
    for chunk in text.lower().split(" and "):
        words = _WORD.findall(chunk)
        pick = lambda vocabulary: next((w for w in words if w in vocabulary), None)  # noqa: E731
        found.append({"color": pick(COLORS), "shape": pick(SHAPES), "size": pick(SIZES),
                      "position": pick(POSITIONS)})
    return found


def caption_accuracy(predictions: list[str], rows: list[dict]) -> dict:
    """Score captions against the rows' ``objects``: ``attribute_accuracy`` (all objects' attributes),
    per-attribute accuracies, and ``exact`` (every attribute of every object right, no extra object)."""
    if len(predictions) != len(rows):
        raise VpgtransError(f"caption_accuracy: {len(predictions)} predictions for {len(rows)} rows")
    hits = {a: 0 for a in ATTRIBUTES}
    slots = exact = 0
    for prediction, row in zip(predictions, rows):
        truth, parsed = row["objects"], parse_caption(prediction)
        all_right = len(parsed) == len(truth)
        for i, obj in enumerate(truth):
            guess = parsed[i] if i < len(parsed) else {}
            for a in ATTRIBUTES:
                right = guess.get(a) == obj[a]
                hits[a] += right
                all_right &= right
        slots += len(truth)
        exact += all_right
    per_attribute = {a: hits[a] / max(slots, 1) for a in ATTRIBUTES}
    return {"attribute_accuracy": sum(hits.values()) / max(slots * len(ATTRIBUTES), 1),
            "exact": exact / max(len(rows), 1), **per_attribute, "n": len(rows)}
