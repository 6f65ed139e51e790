"""A synthetic multiple-choice split of the demo world (``vpgtrans.demo.world``): questions whose answer
needs the image, and text-only questions (no image) whose answer is in their context.

    image question      {"image", "question": "what color is the circle?", "choices": [4 colours], "answer": i,
                         "answer_type": "color"}
    text-only question  {"question": "what color is the ball?", "context": "The ball is red.", "choices": [...],
                         "answer": i, "answer_type": "text-color"}

Options are the right answer and up to two wrong values of the same attribute, in random order, so
every letter is right equally often. Deterministic: the same arguments write the same files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from vpgtrans.demo.world import COLORS, POSITIONS, SHAPES, SIZES, _references, public_objects, render_scene, \
    sample_scene
from vpgtrans.errors import VpgtransError

VALUES = {"color": tuple(COLORS), "shape": SHAPES, "size": tuple(SIZES), "position": POSITIONS}
THINGS = ("ball", "kite", "hat", "cup", "box", "flag")  # text-only questions are about these
MAX_OPTIONS = 3  # short prompts: the demo LLMs have 64 positions


def _options(answer: str, values: tuple[str, ...], rng: random.Random) -> tuple[list[str], int]:
    wrong = [v for v in values if v != answer]
    options = [answer, *rng.sample(wrong, min(MAX_OPTIONS - 1, len(wrong)))]
    rng.shuffle(options)
    return options, options.index(answer)


def image_question(scene: dict, rng: random.Random) -> dict:
    """A question about the scene's (first) object that only the image answers."""
    obj = scene["objects"][0]
    kind = rng.choice(("color", "shape", "size", "position"))
    refs = _references(obj, scene["objects"], kind) or ["the object"]
    ref = rng.choice(refs)
    question = {"color": f"what color is {ref}?", "shape": f"what shape is {ref}?", "size": f"what size is {ref}?",
                "position": f"where is {ref}?"}[kind]
    choices, answer = _options(obj[kind], VALUES[kind], rng)
    return {"question": question, "choices": choices, "answer": answer, "answer_type": kind}


def text_question(rng: random.Random) -> dict:
    """A question its context answers: no image needed."""
    thing = rng.choice(THINGS)
    kind = rng.choice(("color", "size"))
    value = rng.choice(VALUES[kind])
    choices, answer = _options(value, VALUES[kind], rng)
    question = f"what {kind} is the {thing}?"
    return {"question": question, "context": f"The {thing} is {value}.", "choices": choices, "answer": answer,
            "answer_type": f"text-{kind}"}


def make_choice_split(out_dir: str | Path, n: int, seed: int, image_size: int = 32,
                      text_fraction: float = 1 / 3) -> Path:
    """``n`` rows to ``out_dir/data.jsonl`` (+ ``images/``): about ``text_fraction`` of them text-only."""
    if not isinstance(n, int) or n < 1 or not 0 <= text_fraction <= 1:
        raise VpgtransError(f"choice split: n must be a positive integer and text_fraction in [0, 1] "
                            f"(got {n!r}, {text_fraction!r})")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"vpgtrans-world:multiple-choice:{seed}")
    rows = []
    for i in range(1, n + 1):
        if rng.random() < text_fraction:
            rows.append(text_question(rng))
            continue
        scene = sample_scene(rng, 1)
        name = f"images/{i:06d}.png"
        render_scene(scene, image_size).save(out_dir / name, optimize=False)
        rows.append({"image": name, **image_question(scene, rng), "objects": public_objects(scene)})
    with open(out_dir / "data.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
    meta = {"task": "multiple-choice", "n": n, "seed": seed, "image_size": image_size, "text_fraction": text_fraction}
    (out_dir / "world.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def strip_images(src: str | Path, out_dir: str | Path) -> Path:
    """The same rows without their images (the text-only baseline's view of a split)."""
    src, out_dir = Path(src), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (src / "data.jsonl").read_text().splitlines() if line.strip()]
    with open(out_dir / "data.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({k: v for k, v in row.items() if k != "image"}) + "\n" for row in rows)
    return out_dir
