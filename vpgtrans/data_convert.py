"""Official annotation files -> vpgtrans data rows (``vpgtrans data convert``).

    kind            source files                                          rows (one JSON object per line)
    coco-captions   captions_<split><year>.json (images + annotations),   {"image", "caption", "image_id"}: one per
                    or Karpathy's dataset_coco.json (its "split" field)   caption (training), or per image with all
                                                                          its captions (--rows image: evaluation)
    vqav2           v2_OpenEnded_mscoco_<subtype>_questions.json +        {"image", "question", "answers" (all 10),
                    v2_mscoco_<subtype>_annotations.json                  "question_id", "answer_type", ...}
    refcoco         refs(<by>).p (a pickle of plain lists and dicts) +    {"image", "expression", "bbox" (pixels,
                    instances.json (COCO's images + annotations)          x1,y1,x2,y2), "objects" (the image's other
                                                                          boxes), "ref_id", "sent_id", ...}

Images are not copied: each row names its image by absolute path under ``image_root`` (the directory that
holds COCO's ``train2014/``, ``val2014/`` ...; a root that is itself that folder works too). The output
directory holds ``data.jsonl`` and ``vpgtrans_data.json`` (what was converted, the counts), written
atomically; it is read like any data directory (``--data DIR``). ``refs(*).p`` is a pickle: it is read
with an unpickler that refuses every global, so only plain containers load and nothing in it runs.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import shutil
from collections import Counter, defaultdict
from pathlib import Path

from vpgtrans.errors import VpgtransError
from vpgtrans.formats.torchfile import first_line

log = logging.getLogger(__name__)

KINDS = ("coco-captions", "vqav2", "refcoco")
ROWS = ("caption", "image")  # coco-captions: one row per caption, or per image with all its captions
KARPATHY_EVAL_SPLITS = {"val", "test"}


# ------------------------------------------------------------------------------------------ reading

def read_json(path: Path, what: str):
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8-sig"))
    except FileNotFoundError:
        raise VpgtransError(f"{path}: no such file ({what})") from None
    except IsADirectoryError:
        raise VpgtransError(f"{path}: is a directory; give the {what} file") from None
    except UnicodeDecodeError as exc:
        raise VpgtransError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:
        raise VpgtransError(f"{path}: not valid JSON ({first_line(exc)})") from None


class _PlainUnpickler(pickle.Unpickler):
    """Plain containers only: every global (a class, a function) is refused, so nothing in the file can run."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it names {module}.{name}")


def read_plain_pickle(path: Path):
    """A pickle of plain lists, dicts, strings and numbers (RefCOCO's ``refs(unc).p``); anything else is refused
    in one line. Python 2 byte strings are read as Latin-1 text."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise VpgtransError(f"{path}: no such file (refs pickle)") from None
    except IsADirectoryError:
        raise VpgtransError(f"{path}: is a directory; give the refs(...).p file") from None
    try:
        return _PlainUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise VpgtransError(f"{path}: refused: not a pickle of plain lists and dicts ({first_line(exc)}); nothing in it "
                            "was run") from None
    except Exception as exc:  # noqa: BLE001 - a truncated or damaged pickle: one line
        raise VpgtransError(f"{path}: not a readable pickle ({type(exc).__name__}: {first_line(exc)})") from None


def _records(value, key: str, path: Path, fields: tuple) -> list[dict]:
    """``value[key]``: a list of objects that all have ``fields``; else one line naming what is missing."""
    items = value.get(key) if isinstance(value, dict) else None
    if not isinstance(items, list):
        raise VpgtransError(f"{path}: no {key!r} list; is this the right file?")
    for index, item in enumerate(items):
        missing = [name for name in fields if not isinstance(item, dict) or name not in item]
        if missing:
            raise VpgtransError(f"{path}: {key}[{index}] has no {', '.join(map(repr, missing))}")
    return items


class ImagePaths:
    """COCO image paths under ``root``: ``root/<folder>/<file>`` where ``root/<folder>`` exists, else
    ``root/<file>`` (a root that is the folder itself); counts the images that are not there."""

    def __init__(self, root: Path):
        self.root = Path(os.path.abspath(root))
        self._bases: dict[str, Path] = {}
        self.seen: set[str] = set()
        self.missing = 0

    def __call__(self, folder: str | None, file_name: str) -> str:
        if folder not in self._bases:
            self._bases[folder] = self.root / folder if folder and (self.root / folder).is_dir() else self.root
        path = str(self._bases[folder] / file_name)
        if path not in self.seen:
            self.seen.add(path)
            self.missing += not os.path.isfile(path)
        return path


def _split_choice(splits: Counter, split: str | None, what: str) -> set[str]:
    have = ", ".join(f"{name} ({count})" for name, count in sorted(splits.items()))
    if split is None:
        raise VpgtransError(f"{what} holds several splits: {have}; choose with --split (comma-separated for several, "
                            "e.g. train,restval)")
    chosen = {item.strip() for item in split.split(",") if item.strip()}
    unknown = sorted(chosen - set(splits))
    if unknown or not chosen:
        raise VpgtransError(f"{what} has no split {', '.join(unknown) or repr(split)}; it has {have}")
    return chosen


# ------------------------------------------------------------------------------------------ converters

def coco_captions_rows(src: Path, image_root: Path, split: str | None = None, rows: str | None = None):
    """Rows of a COCO captions file (official or Karpathy's) and what was converted."""
    if rows is not None and rows not in ROWS:
        raise VpgtransError(f"--rows must be one of {', '.join(ROWS)} (got {rows!r})")
    value = read_json(src, "COCO captions")
    images = ImagePaths(image_root)
    if isinstance(value, dict) and isinstance(value.get("images"), list) and "annotations" not in value:
        by_image, info = _karpathy(value, src, images, split)
        rows = rows or ("image" if info["split"] <= KARPATHY_EVAL_SPLITS else "caption")
        info["split"] = sorted(info["split"])
    else:
        if split is not None:
            raise VpgtransError(f"{src}: an official captions file is one split already; --split is for Karpathy's "
                                "dataset_coco.json")
        by_image, info = _official_captions(value, src, images)
        rows = rows or "caption"
    out = []
    for (path, image_id), captions in by_image.items():
        if rows == "image":
            out.append({"image": path, "caption": captions, "image_id": image_id})
        else:
            out.extend({"image": path, "caption": caption, "image_id": image_id} for caption in captions)
    return out, {**info, "rows_per": rows, "images": len(by_image), "images_missing": images.missing}


def _official_captions(value, src: Path, images: ImagePaths):
    records = _records(value, "images", src, ("id", "file_name"))
    annotations = _records(value, "annotations", src, ("image_id", "caption"))
    names = {}
    for image in records:
        url = image.get("coco_url") or ""
        folder = url.rstrip("/").split("/")[-2] if url.count("/") >= 3 else None  # .../train2014/COCO_...jpg
        names[image["id"]] = images(folder, image["file_name"])
    by_image, orphans = defaultdict(list), 0
    for annotation in annotations:
        caption = annotation["caption"]
        if annotation["image_id"] not in names or not isinstance(caption, str):
            orphans += 1
            continue
        by_image[(names[annotation["image_id"]], annotation["image_id"])].append(caption.strip())
    return by_image, {"format": "coco", "annotations_skipped": orphans}


def _karpathy(value, src: Path, images: ImagePaths, split: str | None):
    records = _records(value, "images", src, ("filename", "split", "sentences"))
    chosen = _split_choice(Counter(str(image["split"]) for image in records), split, str(src))
    by_image = {}
    for image in records:
        if image["split"] not in chosen:
            continue
        captions = [s["raw"].strip() for s in image["sentences"] if isinstance(s, dict) and isinstance(s.get("raw"), str)]
        image_id = image.get("cocoid", image.get("imgid"))
        by_image[(images(image.get("filepath"), image["filename"]), image_id)] = captions
    return by_image, {"format": "karpathy", "split": chosen}


def vqav2_rows(questions_path: Path, image_root: Path, annotations_path: Path | None = None):
    """Rows of a VQAv2 questions file and its annotations (all ten answers, ``question_id``, ``answer_type``)."""
    annotations_path = annotations_path or _vqa_annotations_beside(questions_path)
    questions_file = read_json(questions_path, "VQAv2 questions")
    questions = _records(questions_file, "questions", questions_path, ("question_id", "image_id", "question"))
    annotations = _records(read_json(annotations_path, "VQAv2 annotations"), "annotations", annotations_path,
                           ("question_id", "answers"))
    subtype = questions_file.get("data_subtype")
    if not isinstance(subtype, str) or not subtype:
        raise VpgtransError(f"{questions_path}: no 'data_subtype' (train2014, val2014, ...): the image file names "
                            "are built from it")
    by_question = {annotation["question_id"]: annotation for annotation in annotations}
    images = ImagePaths(image_root)
    rows, unanswered = [], 0
    for question in questions:
        annotation = by_question.get(question["question_id"])
        if annotation is None:
            unanswered += 1
            continue
        answers = [a["answer"] for a in annotation["answers"] if isinstance(a, dict) and isinstance(a.get("answer"), str)]
        if not isinstance(question["image_id"], int) or isinstance(question["image_id"], bool):
            raise VpgtransError(f"{questions_path}: question {question['question_id']!r:.40} has a non-integer image_id")
        file_name = f"COCO_{subtype}_{question['image_id']:012d}.jpg"  # the VQA API's naming
        rows.append({"image": images(subtype, file_name), "question": question["question"], "answers": answers,
                     "question_id": question["question_id"], "answer_type": annotation.get("answer_type"),
                     "question_type": annotation.get("question_type"),
                     "multiple_choice_answer": annotation.get("multiple_choice_answer"),
                     "image_id": question["image_id"]})
    if not rows:
        raise VpgtransError(f"{annotations_path}: answers none of the {len(questions)} questions of {questions_path}; "
                            "are they the same split?")
    return rows, {"format": "vqav2", "data_subtype": subtype, "annotations": str(Path(annotations_path).resolve()),
                  "questions_without_annotation": unanswered, "images": len(images.seen),
                  "images_missing": images.missing}


def _vqa_annotations_beside(questions_path: Path) -> Path:
    """``v2_OpenEnded_mscoco_train2014_questions.json`` -> ``v2_mscoco_train2014_annotations.json`` beside it."""
    name = Path(questions_path).name
    if not (name.startswith("v2_OpenEnded_mscoco_") and name.endswith("_questions.json")):
        raise VpgtransError(f"{questions_path}: give its annotations file with --annotations (the official name "
                            "v2_OpenEnded_mscoco_<subtype>_questions.json tells where it is)")
    subtype = name.removeprefix("v2_OpenEnded_mscoco_").removesuffix("_questions.json")
    path = Path(questions_path).parent / f"v2_mscoco_{subtype}_annotations.json"
    if not path.is_file():
        raise VpgtransError(f"{path}: not found (the annotations of {name}; test questions have none); give it with "
                            "--annotations")
    return path


def refcoco_rows(refs_path: Path, image_root: Path, split: str | None = None, instances_path: Path | None = None):
    """Rows of RefCOCO / RefCOCO+ / RefCOCOg: one per referring sentence, the referred box in pixels
    (``[x, y, w, h]`` in the files -> ``[x1, y1, x2, y2]``) and the image's other boxes."""
    instances_path = instances_path or Path(refs_path).parent / "instances.json"
    refs = read_plain_pickle(refs_path)
    if not isinstance(refs, list) or not all(isinstance(ref, dict) for ref in refs):
        raise VpgtransError(f"{refs_path}: not a list of refs (dicts); is this a refs(...).p file?")
    for index, ref in enumerate(refs):
        missing = [key for key in ("ann_id", "image_id", "split", "sentences") if key not in ref]
        if missing:
            raise VpgtransError(f"{refs_path}: ref {index} has no {', '.join(map(repr, missing))}")
    instances = read_json(instances_path, "RefCOCO instances")
    images_by_id = {image["id"]: image for image in _records(instances, "images", instances_path, ("id", "file_name"))}
    annotations = _records(instances, "annotations", instances_path, ("id", "image_id", "bbox"))
    boxes = {annotation["id"]: annotation for annotation in annotations}
    per_image = defaultdict(list)
    for annotation in annotations:
        per_image[annotation["image_id"]].append(annotation["id"])
    chosen = _split_choice(Counter(str(ref["split"]) for ref in refs), split, str(refs_path))
    images = ImagePaths(image_root)
    rows, unmatched = [], 0
    for ref in refs:
        if ref["split"] not in chosen:
            continue
        image = images_by_id.get(ref["image_id"])
        if image is None or ref["ann_id"] not in boxes:
            unmatched += 1
            continue
        file_name = image["file_name"]
        folder = file_name.split("_")[1] if file_name.startswith("COCO_") and file_name.count("_") >= 2 else None
        path = images(folder, file_name)
        others = [_xyxy(boxes[other]["bbox"]) for other in per_image[ref["image_id"]] if other != ref["ann_id"]]
        for sentence in ref["sentences"]:
            text = sentence.get("sent") or sentence.get("raw") if isinstance(sentence, dict) else None
            rows.append({"image": path, "expression": text, "bbox": _xyxy(boxes[ref["ann_id"]]["bbox"]), "objects": others,
                         "ref_id": ref.get("ref_id"), "sent_id": sentence.get("sent_id") if isinstance(sentence, dict)
                         else None, "ann_id": ref["ann_id"], "image_id": ref["image_id"], "split": ref["split"],
                         "category_id": ref.get("category_id")})
    return rows, {"format": "refcoco", "split": sorted(chosen), "instances": str(Path(instances_path).resolve()),
                  "refs_unmatched": unmatched, "images": len(images.seen), "images_missing": images.missing,
                  "bbox_format": "xyxy"}


def _xyxy(box) -> list:
    """COCO's ``[x, y, w, h]`` -> ``[x1, y1, x2, y2]`` (a malformed box is kept as is: the reader skips its row)."""
    if isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box):
        x, y, w, h = box
        return [x, y, x + w, y + h]
    return box


# ------------------------------------------------------------------------------------------ writing

def convert(kind: str, src: Path, out_dir: Path, image_root: Path, *, split: str | None = None,
            rows: str | None = None, annotations: Path | None = None, instances: Path | None = None,
            force: bool = False) -> tuple[Path, dict]:
    """Convert ``src`` (``kind``: coco-captions, vqav2, refcoco) into a data directory ``out_dir``
    (``data.jsonl`` + ``vpgtrans_data.json``), written atomically; return it and the summary."""
    from vpgtrans.io import atomic_write_text
    from vpgtrans.outputs import DATA_INFO, check_out_dir, commit_out_dir, output_errors, prepare_out_dir

    if kind not in KINDS:
        raise VpgtransError(f"unknown data kind {kind!r}; choose one of {', '.join(KINDS)}")
    src, out_dir, image_root = Path(src), Path(out_dir), Path(image_root)
    if not image_root.is_dir():
        raise VpgtransError(f"--image-root {image_root}: no such directory")
    inputs = [src, annotations, instances]
    check_out_dir(out_dir, force, inputs)  # before reading: a refused --out costs nothing
    if kind == "coco-captions" and (annotations or instances):
        raise VpgtransError("--annotations and --instances are for vqav2 and refcoco")
    if kind == "vqav2" and (split or rows or instances):
        raise VpgtransError("vqav2: a questions file is one split; --split, --rows and --instances do not apply")
    if kind == "refcoco" and (rows or annotations):
        raise VpgtransError("refcoco: --rows and --annotations do not apply (--instances names instances.json)")
    try:
        if kind == "coco-captions":
            found, info = coco_captions_rows(src, image_root, split, rows)
        elif kind == "vqav2":
            found, info = vqav2_rows(src, image_root, annotations)
        else:
            found, info = refcoco_rows(src, image_root, split, instances)
    except (TypeError, AttributeError, ValueError, KeyError) as exc:  # a field of another type than the format's
        raise VpgtransError(f"{src}: not in the official {kind} layout ({type(exc).__name__}: {first_line(exc)}); "
                            "see docs/data.md") from None
    if not found:
        raise VpgtransError(f"{src}: no rows to write")
    summary = {"format": "vpgtrans-data", "kind": kind, "source": str(src.resolve()),
               "image_root": str(Path(os.path.abspath(image_root))), "rows": len(found), **info}
    tmp = prepare_out_dir(out_dir, force, inputs)
    try:
        with output_errors(out_dir, partial=tmp):
            atomic_write_text(tmp / "data.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in found))
            atomic_write_text(tmp / DATA_INFO, json.dumps(summary, indent=2) + "\n")
            commit_out_dir(tmp, out_dir)
    except BaseException:  # interrupted: nothing half-written stays beside --out
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if info.get("images_missing"):
        log.warning("%s: %d of %d images are not under %s (their rows are skipped when read)", out_dir,
                    info["images_missing"], info["images"], image_root)
    return out_dir, summary
