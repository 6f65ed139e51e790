"""Image-text data: a directory with a ``*.jsonl`` + images, a ``.jsonl`` file, a LAVIS annotation JSON, an
HF imagefolder (``metadata.jsonl``), a ``datasets.save_to_disk`` directory or a datasets name in the local
HF cache (``vpgtrans.data_sources`` finds which; every form ends as the same rows, checked here).

Rows are ``{"image": "relative/path", "caption": "..." | [...]}`` (captioning),
``{"image", "question", "answers": [...]}`` (VQA) or ``{"image", "question", "box": [x1, y1, x2, y2]}``
(grounding: the question is the referring expression, the box in normalised [0, 1] coordinates) or
``{"question", "choices": [...], "answer": index, "image"?, "context"?}`` (multiple-choice: the only task
whose rows may have no image; see ``vpgtrans.multiple_choice``).

Bad input has one defined outcome each (docs/security.md has the table):

    checked at load time (cheap)            outcome
    line not UTF-8, not JSON, not an object skipped, ``skipped_bad_row``
    a key of the task missing or null       skipped, ``skipped_missing_key``
    text of the wrong type, invalid box     skipped, ``skipped_bad_row``
    caption / question / answers empty      skipped, ``skipped_empty_text`` (empty items of a list dropped)
    text longer than ``max_text_chars``     cut to that length, ``truncated_text``
    image file missing                      skipped, ``skipped_missing_image``
    checked when a batch is built
    image that does not decode              skipped, ``skipped_unreadable_image`` (unique images)
    image over ``MAX_IMAGE_PIXELS``         skipped before decoding, ``skipped_large_image``
    grayscale, 16-bit, palette, CMYK, RGBA  converted to 8-bit RGB (transparency over white)

``strict=True`` (``--strict``) turns every skip into a ``VpgtransError`` naming the row. A dataset with
no usable row fails at load time, and a batch builder that cannot decode any of the first images it
is given stops, so an all-bad dataset never trains. The counts go to the run log and to the bundle
manifest (``data``); rows kept + rows skipped at load time = rows read (``lines``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from vpgtrans.data_sources import (DataOptions, DataSource, load_dataset, locate, parse_columns, raw_rows,
                                   regular_file, source_files)
from vpgtrans.errors import VpgtransError
from vpgtrans.refexp import BBOX_FORMATS, RowProblem, from_refexp, is_refexp

log = logging.getLogger(__name__)

TASK_KEYS = {"caption": ("caption",), "vqa": ("question", "answers"), "grounding": ("question", "box"),
             "multiple-choice": ("question", "choices", "answer")}
TASKS = tuple(TASK_KEYS)
IMAGE_OPTIONAL = ("multiple-choice",)  # tasks whose rows may come without an image (text-only questions)
MAX_TEXT_CHARS = 1000  # per caption / question / answer; longer text is cut (targets are cut again in tokens)
MAX_PROBLEMS = 20  # problems kept verbatim in the stats (all are counted)
NO_IMAGE_LIMIT = 16  # a batch builder that has read none of its first N images stops the run


class DataDir(os.PathLike):
    """A data location (any form ``vpgtrans.data_sources`` reads) plus how to read it. It is a path
    (``os.fspath`` gives the location as given), so it goes wherever a data path goes, and ``load_rows``
    honours its ``strict``, ``bbox_format`` (how RefCOCO-style rows give their pixel boxes: ``xyxy`` or
    ``xywh``, see ``vpgtrans.refexp``) and ``options`` (``--image-root``, ``--data-split``, ``--data-columns``)."""

    def __init__(self, path: str | os.PathLike, strict: bool = False, bbox_format: str = "xyxy",
                 image_root: str | os.PathLike | None = None, split: str | None = None,
                 columns: str | dict | None = None):
        self.path = Path(path)
        self.strict = strict
        self.bbox_format = bbox_format
        self.options = DataOptions(image_root=None if image_root is None else Path(image_root), split=split,
                                   columns=parse_columns(columns))

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"DataDir({str(self.path)!r}, strict={self.strict})"


@dataclass
class LoadStats:
    """What happened to the rows of one data directory. ``to_dict`` is what the manifest records."""

    lines: int = 0  # rows read: non-blank jsonl lines, or rows of a datasets directory
    rows: int = 0  # rows kept
    skipped_bad_row: int = 0
    skipped_missing_key: int = 0
    skipped_empty_text: int = 0
    skipped_missing_image: int = 0
    truncated_text: int = 0
    skipped_unreadable_image: int = 0  # batch time, unique images
    skipped_large_image: int = 0  # batch time, unique images
    problems: list[str] = field(default_factory=list)  # the first MAX_PROBLEMS, "where: what"
    source: dict = field(default_factory=dict)  # the form read (jsonl, lavis, ...), the location, split, options
    strict: bool = field(default=False, repr=False)
    _bad_images: set = field(default_factory=set, repr=False)

    COUNTS = ("lines", "rows", "skipped_bad_row", "skipped_missing_key", "skipped_empty_text",
              "skipped_missing_image", "truncated_text", "skipped_unreadable_image", "skipped_large_image")

    @property
    def skipped_at_load(self) -> int:
        return self.skipped_bad_row + self.skipped_missing_key + self.skipped_empty_text + self.skipped_missing_image

    def to_dict(self) -> dict:
        return {**{name: getattr(self, name) for name in self.COUNTS}, "problems": list(self.problems),
                "source": dict(self.source)}

    def skip(self, kind: str, where: str, what: str) -> None:
        """Count a skipped row (``kind`` names the counter), or raise in strict mode."""
        if self.strict:
            raise VpgtransError(f"{where}: {what}; fix or remove this row, or run without --strict to skip "
                                "and count such rows")
        setattr(self, f"skipped_{kind}", getattr(self, f"skipped_{kind}") + 1)
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(f"{where}: {what}")

    def summary(self) -> str:
        parts = [f"{getattr(self, 'skipped_' + kind)} {kind.replace('_', ' ')}" for kind in
                 ("bad_row", "missing_key", "empty_text", "missing_image", "unreadable_image", "large_image")
                 if getattr(self, "skipped_" + kind)]
        if self.truncated_text:
            parts.append(f"{self.truncated_text} text(s) truncated to {MAX_TEXT_CHARS} characters")
        return ", ".join(parts)


# ------------------------------------------------------------------------------------------ rows

def data_options(data) -> DataOptions:
    """How to read ``data``: a ``DataDir``'s options, else the defaults."""
    return getattr(data, "options", None) or DataOptions()


def data_fingerprint(path) -> str:
    """A content fingerprint of a data location: the rows' files (a directory's ``*.jsonl``, ``*.arrow`` and
    ``*.json``; a data file; a datasets name's cache files), hashed like model files (whole up to 256 MiB,
    else size + first and last MiB), plus the reading options and the dataset name when they are not the
    defaults. Images are not read: an image replaced in place under the same name is not noticed."""
    import hashlib

    from vpgtrans.bundle import fingerprint_files

    options = data_options(path)
    source = locate(path, options)
    location = Path(path)
    if source.kind == "datasets-name":
        files = source_files(source, load_dataset(source, options.columns))
    elif location.is_dir():  # every file that may hold rows (the form of fingerprints made before other sources)
        files = sorted({*(p for p in location.iterdir() if p.suffix in (".jsonl", ".arrow", ".json") and regular_file(p)),
                        *source_files(source)})
    else:
        files = source_files(source)
    fingerprint = fingerprint_files(files)
    if options.is_default() and source.kind != "datasets-name":
        return fingerprint
    how = json.dumps({"files": fingerprint, "name": source.name, "split": source.split, **options.to_dict()},
                     sort_keys=True)
    return "sha256:" + hashlib.sha256(how.encode()).hexdigest()


def _present(row: dict, key: str) -> bool:
    return row.get(key) is not None


def _row_task(row: dict) -> str | None:
    """The task a row's keys hold (first match in TASKS order)."""
    for task, keys in TASK_KEYS.items():
        if all(_present(row, key) for key in keys):
            return task
    return None


def _choose_task(rows: list[dict], task: str | None, where: str) -> str:
    votes = {name: 0 for name in TASKS}
    for row in rows:
        held = _row_task(row)
        if held:
            votes[held] += 1
    if task is not None:
        others = [name for name, count in votes.items() if count and name != task]
        if not votes[task] and others:
            raise VpgtransError(f"{where}: holds {others[0]} data, but task '{task}' was asked for")
        return task
    best = max(TASKS, key=lambda name: votes[name])  # ties: the first in TASKS
    if rows and not votes[best]:
        raise VpgtransError(f"{where}: no row has 'caption', 'question' + 'answers', 'question' + 'box' or "
                            "'question' + 'choices' + 'answer' "
                            f"({len(rows)} rows read); see docs/formats.md for the row formats")
    return best


class _Bad(Exception):
    """A row problem: ``kind`` is the LoadStats counter, the message what is wrong."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _text(value, key: str, max_chars: int, stats: LoadStats) -> str:
    if not isinstance(value, str):
        raise _Bad("bad_row", f"'{key}' must be a string (got {type(value).__name__})")
    text = value.strip()
    if not text:
        raise _Bad("empty_text", f"'{key}' is empty")
    if len(text) > max_chars:
        stats.truncated_text += 1
        text = text[:max_chars]
    return text


def _texts(value, key: str, max_chars: int, stats: LoadStats) -> list[str]:
    """A string or a list of strings -> the non-empty ones, stripped and cut to ``max_chars``."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise _Bad("bad_row", f"'{key}' must be a string or a list of strings")
    kept = [item.strip() for item in items if item.strip()]
    if not kept:
        raise _Bad("empty_text", f"'{key}' has no non-empty text")
    cut = [item[:max_chars] for item in kept]
    stats.truncated_text += sum(len(item) > max_chars for item in kept)
    return cut


def _box(value) -> list[float]:
    from vpgtrans.grounding import box_problem

    problem = box_problem(value)
    if problem:
        raise _Bad("bad_row", f"'box' {problem}")
    return [float(v) for v in value]


def clean_row(row: dict, task: str, max_chars: int, stats: LoadStats) -> dict:
    """The task's fields of ``row``, checked and normalised (captions and answers as lists of strings,
    the box as four floats); raises ``_Bad`` for a row to skip. The image is not touched."""
    needed = TASK_KEYS[task] if task in IMAGE_OPTIONAL else ("image", *TASK_KEYS[task])
    missing = [key for key in needed if not _present(row, key)]
    if missing:
        raise _Bad("missing_key", f"no {', '.join(repr(k) for k in missing)} (a {task} row needs "
                                  f"{', '.join(needed)})")
    clean = {"image": row.get("image")}
    if task == "caption":
        clean["caption"] = _texts(row["caption"], "caption", max_chars, stats)
    else:
        clean["question"] = _text(row["question"], "question", max_chars, stats)
        if task == "vqa":
            clean["answers"] = _texts(row["answers"], "answers", max_chars, stats)
            clean.update(_vqa_keys(row))
        elif task == "grounding":
            clean["box"] = _box(row["box"])
            objects = row.get("objects") or []  # the image's other objects (the largest-object baseline)
            if not isinstance(objects, list):
                raise _Bad("bad_row", "'objects' must be a list of boxes")
            clean["objects"] = [_box(box) for box in objects]
        else:
            clean.update(_multiple_choice(row, max_chars, stats))
    return clean


VQA_KEYS = ("question_id", "answer_type")  # VQAv2's optional keys a VQA row keeps (None when absent)


def _vqa_keys(row: dict) -> dict:
    """``question_id`` (an integer: what ``eval --submission`` answers by) and ``answer_type`` (VQAv2's
    ``yes/no``, ``number``, ``other``: the scores' breakdown) of a VQA row."""
    question_id, answer_type = row.get("question_id"), row.get("answer_type")
    if question_id is not None and (isinstance(question_id, bool) or not isinstance(question_id, int)):
        raise _Bad("bad_row", f"'question_id' must be an integer (got {type(question_id).__name__})")
    if answer_type is not None and not isinstance(answer_type, str):
        raise _Bad("bad_row", f"'answer_type' must be a string (got {type(answer_type).__name__})")
    return {"question_id": question_id, "answer_type": answer_type.strip() if answer_type else None}


def _multiple_choice(row: dict, max_chars: int, stats: LoadStats) -> dict:
    from vpgtrans.multiple_choice import choices_problem

    problem = choices_problem(row["choices"], row["answer"])
    if problem:
        raise _Bad("bad_row", problem)
    context = row.get("context")
    if context is not None and not isinstance(context, str):
        raise _Bad("bad_row", f"'context' must be a string (got {type(context).__name__})")
    context = context.strip()[:max_chars] if context else ""
    return {"choices": [_text(choice, "choices", max_chars, stats) for choice in row["choices"]],
            "answer": row["answer"], "context": context}


def _read_json_rows(source: DataSource, label: str, task: str | None, max_chars: int, stats: LoadStats,
                    bbox_format: str = "xyxy", columns: dict | None = None) -> tuple[list[dict], str]:
    """Rows of a jsonl, imagefolder or LAVIS source, cleaned; images relative to ``source.image_root``."""
    parsed = []  # (where, row)
    for where, row, problem in raw_rows(source, columns or {}):
        stats.lines += 1
        if problem:
            stats.skip("bad_row", where, problem)
        elif is_refexp(row):  # RefCOCO-style: pixel box -> the normalised grounding row
            try:
                parsed.append((where, from_refexp(row, source.image_root, bbox_format)))
            except RowProblem as bad:
                stats.skip(bad.kind, where, str(bad))
        else:
            parsed.append((where, row))
    task = _choose_task([row for _, row in parsed], task, label)
    rows = []
    found = {}  # image as written -> its resolved path, None if missing (captions of one image share it)
    for where, row in parsed:
        try:
            clean = clean_row(row, task, max_chars, stats)
            if clean["image"] is None and task in IMAGE_OPTIONAL:  # a text-only question
                rows.append(clean)
                continue
            if not isinstance(clean["image"], str) or not clean["image"]:
                raise _Bad("bad_row", "'image' must be a non-empty path string")
            if clean["image"] not in found:  # missing, a FIFO / device, or a name the file system refuses: None
                image = source.image_root / clean["image"]
                found[clean["image"]] = str(image.resolve()) if regular_file(image) else None
            if found[clean["image"]] is None:
                raise _Bad("missing_image", f"image {clean['image']!r:.300} not found (or not a regular file)")
        except _Bad as bad:
            stats.skip(bad.kind, where, str(bad))
            continue
        clean["image"] = found[clean["image"]]
        rows.append(clean)
    return rows, task


def _read_dataset(dataset, label: str, task: str | None, max_chars: int, stats: LoadStats,
                  image_root: Path | None = None):
    """A ``datasets.Dataset`` (from a directory or the HF cache) cleaned like jsonl rows: the same checks and
    counts; images stay as the dataset holds them (PIL images decoded when a batch is built, or paths,
    relative ones read from ``image_root``)."""
    import datasets

    name = Path(label).name or label
    columns = set(dataset.column_names)
    optional = task in IMAGE_OPTIONAL or task is None and set(TASK_KEYS["multiple-choice"]) <= columns
    if "image" not in columns and optional:  # text-only questions
        dataset = dataset.add_column("image", [None] * len(dataset))
        columns.add("image")
    if "image" not in columns:
        raise VpgtransError(f"{label}: the dataset has no 'image' column (columns: {sorted(columns)}); map one with "
                            "--data-columns image=THEIRS")
    held = [name for name, keys in TASK_KEYS.items() if set(keys) <= columns]
    if not held:
        raise VpgtransError(f"{label}: rows need 'caption', or 'question' and 'answers', or 'question' and "
                            f"'box' (columns: {sorted(columns)}); map yours with --data-columns")
    if task is not None and task not in held:
        raise VpgtransError(f"{label}: holds {held[0]} data, but task '{task}' was asked for")
    task = task or held[0]
    keys = TASK_KEYS[task]
    images = dataset.select_columns(["image"])
    if isinstance(images.features["image"], datasets.Image):
        images = images.cast_column("image", datasets.Image(decode=False))  # presence only: nothing decoded here
    keys = (*keys, "context") if "context" in columns and task in IMAGE_OPTIONAL else keys
    keys = (*keys, *(key for key in VQA_KEYS if key in columns)) if task == "vqa" else keys
    text = dataset.select_columns(list(keys)).to_list()
    kept, cleaned, paths = [], {key: [] for key in keys}, []
    for index, (image, row) in enumerate(zip(images["image"], text)):
        stats.lines += 1
        where = f"{name}[{index}]"
        try:
            clean = clean_row({**row, "image": image}, task, max_chars, stats)
            if isinstance(image, str):  # a path (None: a text-only question)
                image = str(image_root / image) if image_root is not None else image
                if not regular_file(image):
                    raise _Bad("missing_image", f"image {row.get('image', image)!r:.300} not found")
        except _Bad as bad:
            stats.skip(bad.kind, where, str(bad))
            continue
        kept.append(index)
        paths.append(image)
        for key in keys:
            cleaned[key].append(clean[key])
    dataset = dataset.select_columns(["image"]).select(kept)
    if image_root is not None and isinstance(dataset.features["image"], datasets.Value):  # paths, now resolved
        dataset = dataset.remove_columns("image").add_column("image", paths)
    for key in keys:
        dataset = dataset.add_column(key, cleaned[key])
    return dataset, task


def _describe(source: DataSource, label: str, options: DataOptions) -> dict:
    """What the manifest records of where rows came from: the form, the location as given, and the split and
    reading options where they apply."""
    described = {"form": source.kind, "location": label}
    if source.split is not None:
        described["split"] = source.split
    return {**described, **{k: v for k, v in options.to_dict().items() if v and k != "split"}}


def load_rows(data_dir: str | os.PathLike, task: str | None = None, strict: bool | None = None,
              max_text_chars: int = MAX_TEXT_CHARS):
    """Load data (any form ``vpgtrans.data_sources`` reads) as a ``datasets.Dataset`` plus the task it holds
    and the load stats.

    ``task`` (``caption``, ``vqa``, ``grounding``, ``multiple-choice``) is inferred from the rows when omitted.
    ``strict`` (default: the ``DataDir``'s, else False) raises on the first row that would be skipped.
    Rows whose image does not decode are counted later, by the ``Collator``.
    """
    if task is not None and task not in TASKS:
        raise VpgtransError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if strict is None:
        strict = bool(getattr(data_dir, "strict", False))
    bbox_format = getattr(data_dir, "bbox_format", "xyxy")
    if bbox_format not in BBOX_FORMATS:
        raise VpgtransError(f"--bbox-format must be one of {', '.join(BBOX_FORMATS)} (got {bbox_format!r})")
    options = data_options(data_dir)
    source = locate(data_dir, options)
    label = os.fspath(data_dir)
    stats = LoadStats(strict=strict, source=_describe(source, label, options))
    if source.kind in ("datasets-dir", "datasets-name"):
        dataset, found = _read_dataset(load_dataset(source, options.columns), label, task, max_text_chars, stats,
                                       source.image_root)
    else:
        import datasets

        rows, found = _read_json_rows(source, label, task, max_text_chars, stats, bbox_format, options.columns)
        dataset = datasets.Dataset.from_list(rows) if rows else None
    if dataset is None or len(dataset) == 0:
        first = f"; first problem: {stats.problems[0]}" if stats.problems else ""
        raise VpgtransError(f"{label}: no usable rows of {stats.lines} (missing images: {stats.skipped_missing_image}, "
                            f"bad rows: {stats.skipped_bad_row}, missing keys: {stats.skipped_missing_key}, "
                            f"empty text: {stats.skipped_empty_text}){first}")
    stats.rows = len(dataset)
    if stats.skipped_at_load or stats.truncated_text:
        log.warning("%s: kept %d of %d rows (%s); first problem: %s", label, stats.rows, stats.lines,
                    stats.summary(), stats.problems[0] if stats.problems else "-")
    return dataset, found, stats

def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
