"""A grounding split of world v2 (``vpgtrans.demo.world2``): 2 or 3 objects per image, a referring
expression that names one of them by its attributes only — "the small red square", never its position —
and that object's box as the answer. Finding the box needs the image's spatial layout: which object the
words pick out, then where it is.

The expression is the shortest of (shape), (colour shape), (size shape), (size colour shape) that no other
object of the scene matches; a scene whose objects cannot all be told apart that way contributes a target
that can. Rows are the loader's normalised grounding rows plus the other objects' boxes::

    {"image": "images/000001.png", "question": "the small red square", "box": [x1, y1, x2, y2],
     "objects": [[...], ...]}

so ``vpgtrans eval --task grounding`` can score the largest-object baseline. Same arguments -> same bytes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from vpgtrans.demo import world, world2
from vpgtrans.errors import VpgtransError

_FORMS = (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"))


def expression_for(target: dict, others: list[dict]) -> str | None:
    """The shortest attribute-only description of ``target`` that fits none of ``others``; None if none does."""
    for keys in _FORMS:
        if not any(all(other[key] == target[key] for key in keys) for other in others):
            return "the " + " ".join(target[key] for key in keys)
    return None


def _scenes(n: int, seed: int):
    """The split's ``n`` (scene, target index, expression) triples, in row order (no image drawn)."""
    rng = random.Random(f"vpgtrans-grounding:{seed}")
    found = 0
    while found < n:
        scene = world2.sample_scene(rng)
        objects = scene["objects"]
        candidates = [(i, expression_for(obj, objects[:i] + objects[i + 1:])) for i, obj in enumerate(objects)]
        candidates = [(i, text) for i, text in candidates if text is not None]
        if not candidates:
            continue  # identical twins only: no attribute-only expression
        index, text = rng.choice(candidates)
        found += 1
        yield scene, index, text


def attribute_oracle(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[list[float]], list[list[float]]]:
    """(guesses, true boxes) for the eval split of ``make_grounding_world(..., n_train, n_eval, seed)``, in row
    order; guesses from a reader that knows which object the expression names and that object's cell and size (what the
    scene written out in words tells) and nothing of the pixels: the mean box of the training split's
    targets with that cell and size (the cell's, or all targets', where the training split has none).
    Scored against the eval rows it is the ceiling the world allows a model that reads the attributes
    perfectly; the rest (jitter within a cell, radius) is only in the pixels."""
    sums: dict[tuple, list[float]] = {}
    for scene, index, _ in _scenes(n_train, seed):
        target = scene["objects"][index]
        for key in ((target["position"], target["size"]), (target["position"],), ()):
            total = sums.setdefault(key, [0.0] * 5)
            total[:4] = [a + b for a, b in zip(total[:4], target["box"])]
            total[4] += 1
    guesses, truths = [], []
    for scene, index, _ in _scenes(n_eval, seed + 10_000):
        target = scene["objects"][index]
        total = sums.get((target["position"], target["size"])) or sums.get((target["position"],)) or sums[()]
        guesses.append([round(v / total[4], 4) for v in total[:4]])
        truths.append(target["box"])
    return guesses, truths


def make_split(out_dir: str | Path, n: int, seed: int, image_size: int = world2.IMAGE_SIZE) -> Path:
    """Write ``n`` grounding rows to ``out_dir/data.jsonl`` + ``out_dir/images/``."""
    if not isinstance(n, int) or n < 1:
        raise VpgtransError(f"grounding split: n must be >= 1 (got {n!r})")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for scene, index, text in _scenes(n, seed):
        objects = scene["objects"]
        name = f"images/{len(rows) + 1:06d}.png"
        world.render_scene(scene, image_size).save(out_dir / name, optimize=False)
        rows.append({"image": name, "question": text, "box": objects[index]["box"],
                     "objects": [obj["box"] for i, obj in enumerate(objects) if i != index]})
    with open(out_dir / "data.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
    (out_dir / "world.json").write_text(json.dumps({"world_version": world2.WORLD_VERSION, "task": "grounding", "n": n,
                                                    "seed": seed, "image_size": image_size}, indent=2) + "\n")
    return out_dir


def make_grounding_world(out_dir: str | Path, n_train: int, n_eval: int, seed: int = 0,
                         image_size: int = world2.IMAGE_SIZE) -> dict[str, Path]:
    """``{"grounding_train", "grounding_eval"}`` split directories (different seeds: no shared scene)."""
    out_dir = Path(out_dir)
    return {"grounding_train": make_split(out_dir / "grounding_train", n_train, seed, image_size),
            "grounding_eval": make_split(out_dir / "grounding_eval", n_eval, seed + 10_000, image_size)}
