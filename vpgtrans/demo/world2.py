"""World v2: the harder synthetic world of the benchmark zoo (``zoo-v2``).

Every scene holds 2 or 3 objects (colour, shape, size, a cell of the 3x3 grid), drawn on 48-pixel
images, so the VPG must find each object, bind its four attributes, keep reading order and count —
the expensive part of an MLLM, as at scale (DESIGN §5: a one-object world is learnt from scratch in a
few hundred steps and leaves nothing to transfer).

The scene sampler, the drawing, the VQA questions and the annotator noise are ``world``'s (v1); what
changes is the object count, the image size, the caption (it starts with the count:
``"three objects : a small red circle at the top-left and ..."``) and the rows, which carry every
object's grounding box (``"boxes"``, normalised ``[x1, y1, x2, y2]`` in reading order). Split
directories are what ``vpgtrans.data.load_rows`` reads, like v1's.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from vpgtrans.demo import world
from vpgtrans.errors import VpgtransError

WORLD_VERSION = 2
IMAGE_SIZE = 48
MIN_OBJECTS, MAX_OBJECTS = 2, 3
TASKS = world.TASKS


def sample_scene(rng: random.Random) -> dict:
    """A scene with ``MIN_OBJECTS``..``MAX_OBJECTS`` objects in distinct cells, none touching."""
    while True:
        count = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
        for _ in range(100):
            cells = sorted(rng.sample(range(len(world.POSITIONS)), count))
            objects = [world._object(rng, cell) for cell in cells]
            if not any(world._overlap(a, b) for i, a in enumerate(objects) for b in objects[i + 1:]):
                return {"background": rng.randint(0, 50), "objects": objects}


def caption_for(scene: dict) -> str:
    """"two objects : a small red circle at the top-left and a large blue cross in the center"."""
    objects = scene["objects"]
    return f"{world.NUMBERS[len(objects)]} objects : " + " and ".join(world.describe(o) for o in objects)


def boxes(scene: dict) -> list[list[float]]:
    return [obj["box"] for obj in scene["objects"]]


def make_split(out_dir: str | Path, task: str, n: int, seed: int, image_size: int = IMAGE_SIZE) -> Path:
    """Write ``n`` rows of ``task`` to ``out_dir/data.jsonl`` + ``out_dir/images/``; same arguments ->
    same bytes. Caption rows: ``{"image", "caption", "boxes", "objects"}``; VQA rows: ``{"image",
    "question", "answers" (10), "answer_type", "box" (what the question is about), "boxes", "objects"}``."""
    if task not in TASKS or not isinstance(n, int) or n < 1:
        raise VpgtransError(f"world v2 split: task must be one of {', '.join(TASKS)} and n >= 1 (got {task!r}, {n!r})")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"vpgtrans-world2:{task}:{seed}")
    rows = []
    for i in range(1, n + 1):
        scene = sample_scene(rng)
        name = f"images/{i:06d}.png"
        world.render_scene(scene, image_size).save(out_dir / name, optimize=False)
        row: dict = {"image": name}
        if task == "caption":
            row["caption"] = caption_for(scene)
        else:
            item = world.question_for(scene, rng)
            row.update(question=item["question"], answers=world.annotator_answers(item["answer"], item["alternatives"], rng),
                       answer_type=item["answer_type"], box=item["box"])
        row["boxes"] = boxes(scene)
        row["objects"] = world.public_objects(scene)
        rows.append(row)
    with open(out_dir / "data.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
    meta = {"world_version": WORLD_VERSION, "task": task, "n": n, "seed": seed, "image_size": image_size,
            "objects": [MIN_OBJECTS, MAX_OBJECTS]}
    (out_dir / "world.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def make_world(out_dir: str | Path, n_train: int, n_eval: int, seed: int = 0, image_size: int = IMAGE_SIZE) -> dict[str, Path]:
    """``caption_train``, ``caption_eval``, ``vqa_train``, ``vqa_eval``; train and eval seeds are disjoint
    (2*seed, 2*seed + 1)."""
    out_dir = Path(out_dir)
    return {f"{task}_{part}": make_split(out_dir / f"{task}_{part}", task, n, split_seed, image_size)
            for task in TASKS
            for part, n, split_seed in (("train", n_train, 2 * seed), ("eval", n_eval, 2 * seed + 1))}


# ------------------------------------------------------------------------------------------- corpus

def text_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """(context, text) pairs for LM pre-training: the scene as an attribute list (the stand-in for the
    soft prompts), then a caption (60%) or ``Question: ... Answer: ...`` about it. The LM learns to read
    the scene in front of its BOS, to count the objects listed and to keep their order."""
    rng = random.Random(f"vpgtrans-corpus2:{seed}")
    pairs = []
    for _ in range(n):
        scene = sample_scene(rng)
        context = world._context(scene, rng)
        if rng.random() < 0.6:
            text = caption_for(scene)
        else:
            item = world.question_for(scene, rng)
            text = f"Question: {item['question']} Answer: {item['answer']}"
        pairs.append((context, text))
    return pairs


def text_corpus(n: int, seed: int) -> list[str]:
    """``n`` lines "context . text" (tokenizer training)."""
    return [f"{context} . {text}" for context, text in text_pairs(n, seed)]


# ------------------------------------------------------------------------------------------- scoring

def caption_accuracy(predictions: list[str], rows: list[dict]) -> dict:
    """v1's per-attribute scores (``world.caption_accuracy`` after the count prefix) plus ``count``:
    the caption's leading number word is the number of objects."""
    if len(predictions) != len(rows):
        raise VpgtransError(f"caption_accuracy: {len(predictions)} predictions for {len(rows)} rows")
    bodies, counts = [], 0
    for prediction, row in zip(predictions, rows):
        head, _, body = prediction.partition(" objects : ")
        bodies.append(body if _ else prediction)
        counts += head.strip() == world.NUMBERS[len(row["objects"])]
    scores = world.caption_accuracy(bodies, rows)
    return {**scores, "count": counts / max(len(rows), 1)}
