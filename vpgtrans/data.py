"""Image-text data: a directory with a ``*.jsonl`` + images, or a ``datasets.save_to_disk`` directory.

Rows are ``{"image": "relative/path", "caption": "..." | [...]}`` (captioning),
``{"image", "question", "answers": [...]}`` (VQA) or ``{"image", "question", "box": [x1, y1, x2, y2]}``
(grounding: the question is the referring expression, the box in normalised [0, 1] coordinates).

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

import io
import json
import hashlib
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vpgtrans.config import PromptTemplate
from vpgtrans.errors import VpgtransError
from vpgtrans.prompting import IGNORE_INDEX, prompt_ids, training_example

log = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

TASK_KEYS = {"caption": ("caption",), "vqa": ("question", "answers"), "grounding": ("question", "box")}
TASKS = tuple(TASK_KEYS)
MAX_TEXT_CHARS = 1000  # per caption / question / answer; longer text is cut (targets are cut again in tokens)
MAX_LINE_BYTES = 1 << 20  # a jsonl line longer than this is a bad row, never parsed
MAX_IMAGE_PIXELS = 8192 * 8192  # checked from the header, before decoding (decompression bombs)
MAX_PROBLEMS = 20  # problems kept verbatim in the stats (all are counted)
NO_IMAGE_LIMIT = 16  # a batch builder that has read none of its first N images stops the run

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class DataDir(os.PathLike):
    """A data directory plus how strictly to read it. It is a path (``os.fspath`` gives the directory),
    so it goes wherever a data path goes, and ``load_rows`` honours its ``strict``."""

    def __init__(self, path: str | os.PathLike, strict: bool = False):
        self.path = Path(path)
        self.strict = strict

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
    strict: bool = field(default=False, repr=False)
    _bad_images: set = field(default_factory=set, repr=False)

    COUNTS = ("lines", "rows", "skipped_bad_row", "skipped_missing_key", "skipped_empty_text",
              "skipped_missing_image", "truncated_text", "skipped_unreadable_image", "skipped_large_image")

    @property
    def skipped_at_load(self) -> int:
        return self.skipped_bad_row + self.skipped_missing_key + self.skipped_empty_text + self.skipped_missing_image

    def to_dict(self) -> dict:
        return {**{name: getattr(self, name) for name in self.COUNTS}, "problems": list(self.problems)}

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

def _lines(path: Path):
    """(line number, bytes) of each non-blank line; ``None`` for a line over ``MAX_LINE_BYTES``."""
    with open(path, "rb") as fh:
        line_no = 0
        while True:
            line = fh.readline(MAX_LINE_BYTES + 1)
            if not line:
                return
            line_no += 1
            if len(line) > MAX_LINE_BYTES:
                while line and not line.endswith(b"\n"):  # drop the rest of the line unread
                    line = fh.readline(MAX_LINE_BYTES)
                yield line_no, None
            elif line.strip():
                yield line_no, line


def _parse_line(line: bytes | None, first: bool) -> tuple[object, str | None]:
    """(JSON value, None) or (None, what is wrong)."""
    if line is None:
        return None, f"line longer than {MAX_LINE_BYTES} bytes"
    try:
        text = line.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not valid UTF-8 (byte {exc.start})"
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
        return None, f"not valid JSON ({_first_line(exc)})"
    if not isinstance(value, dict):
        return None, f"not a JSON object (a {type(value).__name__})"
    return value, None


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
        raise VpgtransError(f"{where}: no row has 'caption', 'question' + 'answers' or 'question' + 'box' "
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
    missing = [key for key in ("image", *TASK_KEYS[task]) if not _present(row, key)]
    if missing:
        raise _Bad("missing_key", f"no {', '.join(repr(k) for k in missing)} (a {task} row needs "
                                  f"{', '.join(('image', *TASK_KEYS[task]))})")
    clean = {"image": row["image"]}
    if task == "caption":
        clean["caption"] = _texts(row["caption"], "caption", max_chars, stats)
    else:
        clean["question"] = _text(row["question"], "question", max_chars, stats)
        if task == "vqa":
            clean["answers"] = _texts(row["answers"], "answers", max_chars, stats)
        else:
            clean["box"] = _box(row["box"])
    return clean


def _read_jsonl_dir(data_dir: Path, task: str | None, max_chars: int, stats: LoadStats) -> tuple[list[dict], str]:
    files = sorted(data_dir.glob("*.jsonl"))
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "none"
        raise VpgtransError(f"{data_dir}: expected exactly one *.jsonl file (found {found})")
    path = files[0]
    parsed = []  # (where, row)
    try:
        for line_no, line in _lines(path):
            stats.lines += 1
            row, problem = _parse_line(line, first=line_no == 1)
            where = f"{path.name}:{line_no}"
            if problem:
                stats.skip("bad_row", where, problem)
            else:
                parsed.append((where, row))
    except OSError as exc:
        raise VpgtransError(f"{path}: cannot read ({exc.strerror or exc})") from None
    task = _choose_task([row for _, row in parsed], task, str(data_dir))
    rows = []
    for where, row in parsed:
        try:
            clean = clean_row(row, task, max_chars, stats)
            if not isinstance(clean["image"], str) or not clean["image"]:
                raise _Bad("bad_row", "'image' must be a non-empty path string")
            image = data_dir / clean["image"]
            if not image.is_file():
                raise _Bad("missing_image", f"image {clean['image']!r} not found")
        except _Bad as bad:
            stats.skip(bad.kind, where, str(bad))
            continue
        clean["image"] = str(image.resolve())
        rows.append(clean)
    return rows, task


def _read_datasets_dir(data_dir: Path, task: str | None, max_chars: int, stats: LoadStats):
    import datasets

    try:
        dataset = datasets.load_from_disk(str(data_dir))
    except Exception as exc:  # noqa: BLE001 - whatever datasets raises for a damaged directory
        raise VpgtransError(f"{data_dir}: not a readable datasets directory ({_first_line(exc)})") from None
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    columns = set(dataset.column_names)
    if "image" not in columns:
        raise VpgtransError(f"{data_dir}: the dataset has no 'image' column")
    held = [name for name, keys in TASK_KEYS.items() if set(keys) <= columns]
    if not held:
        raise VpgtransError(f"{data_dir}: rows need 'caption', or 'question' and 'answers', or 'question' and "
                            f"'box' (columns: {sorted(columns)})")
    if task is not None and task not in held:
        raise VpgtransError(f"{data_dir}: holds {held[0]} data, but task '{task}' was asked for")
    task = task or held[0]
    keys = TASK_KEYS[task]
    images = dataset.select_columns(["image"])
    if isinstance(images.features["image"], datasets.Image):
        images = images.cast_column("image", datasets.Image(decode=False))  # presence only: nothing decoded here
    text = dataset.select_columns(list(keys)).to_list()
    kept, cleaned = [], {key: [] for key in keys}
    for index, (image, row) in enumerate(zip(images["image"], text)):
        stats.lines += 1
        where = f"{data_dir.name}[{index}]"
        try:
            clean = clean_row({**row, "image": image}, task, max_chars, stats)
            if isinstance(image, str) and not Path(image).is_file():
                raise _Bad("missing_image", f"image {image!r} not found")
        except _Bad as bad:
            stats.skip(bad.kind, where, str(bad))
            continue
        kept.append(index)
        for key in keys:
            cleaned[key].append(clean[key])
    dataset = dataset.select_columns(["image"]).select(kept)
    for key in keys:
        dataset = dataset.add_column(key, cleaned[key])
    return dataset, task


def load_rows(data_dir: str | os.PathLike, task: str | None = None, strict: bool | None = None,
              max_text_chars: int = MAX_TEXT_CHARS):
    """Load a data directory as a ``datasets.Dataset`` plus the task it holds and the load stats.

    ``task`` (``caption``, ``vqa``, ``grounding``) is inferred from the rows when omitted.
    ``strict`` (default: the ``DataDir``'s, else False) raises on the first row that would be skipped.
    Rows whose image does not decode are counted later, by the ``Collator``.
    """
    if task is not None and task not in TASKS:
        raise VpgtransError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if strict is None:
        strict = bool(getattr(data_dir, "strict", False))
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise VpgtransError(f"{data_dir}: data directory not found")
    stats = LoadStats(strict=strict)
    if (data_dir / "dataset_info.json").is_file() or (data_dir / "state.json").is_file():
        dataset, found = _read_datasets_dir(data_dir, task, max_text_chars, stats)
    else:
        import datasets

        rows, found = _read_jsonl_dir(data_dir, task, max_text_chars, stats)
        dataset = datasets.Dataset.from_list(rows) if rows else None
    if dataset is None or len(dataset) == 0:
        first = f"; first problem: {stats.problems[0]}" if stats.problems else ""
        raise VpgtransError(f"{data_dir}: no usable rows of {stats.lines} (missing images: {stats.skipped_missing_image}, "
                            f"bad rows: {stats.skipped_bad_row}, missing keys: {stats.skipped_missing_key}, "
                            f"empty text: {stats.skipped_empty_text}){first}")
    stats.rows = len(dataset)
    if stats.skipped_at_load or stats.truncated_text:
        log.warning("%s: kept %d of %d rows (%s); first problem: %s", data_dir, stats.rows, stats.lines,
                    stats.summary(), stats.problems[0] if stats.problems else "-")
    return dataset, found, stats


# ---------------------------------------------------------------------------------------- images

def build_image_processor(image_size: int, mean=None, std=None):
    """BLIP-2's preprocessing: RGB, bicubic resize to a square, rescale, normalise (CLIP stats)."""
    try:  # the PIL backend, without torchvision (same preprocessing, no warning)
        from transformers import BlipImageProcessorPil as BlipImageProcessor
    except ImportError:
        from transformers import BlipImageProcessor

    return BlipImageProcessor(size={"height": image_size, "width": image_size},
                              image_mean=list(mean or OPENAI_CLIP_MEAN), image_std=list(std or OPENAI_CLIP_STD),
                              do_convert_rgb=True)


class ImageTooLarge(ValueError):
    """An image whose header announces more than ``MAX_IMAGE_PIXELS`` pixels."""


def to_rgb(img):
    """Any PIL image -> 8-bit RGB: 16-bit grayscale scaled (not clipped) to 8 bits, transparency
    composited over white (as transformers' ``convert_to_rgb`` does for RGBA), CMYK / palette /
    grayscale / 1-bit converted by PIL."""
    import numpy as np
    from PIL import Image

    if img.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(img, dtype=np.float64)  # 0..65535 from a 16-bit file
        img = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(image):
    """A row's image (a path, a PIL image, or a ``datasets`` ``{"bytes", "path"}`` dict) as 8-bit RGB.

    The size is checked from the header before anything is decoded; raises ``ImageTooLarge`` over
    ``MAX_IMAGE_PIXELS``, and whatever PIL raises for a file it cannot decode."""
    from PIL import Image

    if isinstance(image, Image.Image):
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ImageTooLarge(f"{image.width}x{image.height} pixels is over the limit of {MAX_IMAGE_PIXELS}")
        return to_rgb(image)
    if isinstance(image, dict):
        source = io.BytesIO(image["bytes"]) if image.get("bytes") is not None else image.get("path")
    else:
        source = image
    if source is None:
        raise ValueError("no image data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
        try:
            img = Image.open(source)
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(str(exc)) from None
    with img:
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise ImageTooLarge(f"{img.width}x{img.height} pixels is over the limit of {MAX_IMAGE_PIXELS}")
        img.load()
        return to_rgb(img)


def _image_name(image) -> str:
    """A path, or for an image stored in the dataset a name from its content."""
    if isinstance(image, str):
        return image
    if isinstance(image, dict) and image.get("path"):
        return str(image["path"])
    if isinstance(image, dict) and isinstance(image.get("bytes"), bytes):
        return f"<embedded image sha1:{hashlib.sha1(image['bytes']).hexdigest()[:12]}>"
    return f"<embedded image {id(image):x}>"


# --------------------------------------------------------------------------------------- batches

def _first(value):
    return value[0] if isinstance(value, list) else value


def most_common_answer(answers: list[str]) -> str:
    """The VQA training target: the answer most annotators gave (first one on ties)."""
    counts: dict[str, int] = {}
    for answer in answers:
        counts[answer] = counts.get(answer, 0) + 1
    return max(counts, key=counts.get)


def _target(row: dict, task: str) -> str:
    if task == "caption":
        return _first(row["caption"])
    if task == "vqa":
        return most_common_answer(row["answers"])
    from vpgtrans.grounding import format_box

    return format_box(row["box"])


class Collator:
    """Rows -> a batch. ``mode="train"``: right-padded ids with labels. ``mode="generate"``: the prompt
    only, left-padded for decoder-only LLMs, plus the references for scoring (grounding: the box).

    Rows whose image cannot be used are left out of the batch and counted in ``stats`` (an error
    when ``stats.strict``); a batch with no usable row is ``{}``."""

    def __init__(self, tokenizer, template: PromptTemplate, task: str, num_query_tokens: int, image_processor,
                 is_encoder_decoder: bool, mode: str = "train", max_target_len: int = 64, stats: LoadStats | None = None):
        self.tokenizer = tokenizer
        self.template = template
        self.task = task
        self.num_query_tokens = num_query_tokens
        self.image_processor = image_processor
        self.is_encoder_decoder = is_encoder_decoder
        self.mode = mode
        self.max_target_len = max_target_len
        self.stats = stats if stats is not None else LoadStats()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self._decoded = self._failed = 0
        self._pending: list[str] = []

    def _pad(self, sequences: list[list[int]], value: int, left: bool) -> torch.Tensor:
        width = max(len(s) for s in sequences)
        padded = [([value] * (width - len(s)) + s) if left else (s + [value] * (width - len(s))) for s in sequences]
        return torch.tensor(padded, dtype=torch.long)

    def _skip_image(self, row: dict, kind: str, exc: Exception) -> None:
        name = _image_name(row["image"])
        what = f"{'image too large' if kind == 'large_image' else 'unreadable image'} ({type(exc).__name__}: " \
               f"{_first_line(exc)})"
        self._failed += 1
        if name not in self.stats._bad_images or self.stats.strict:
            self.stats._bad_images.add(name)
            self.stats.skip(kind, name, what)
            if self.stats.skipped_unreadable_image + self.stats.skipped_large_image <= 10:
                # Held back until one image has decoded: when none does, the error below says it all.
                self._pending.append(f"skipping {name}: {what}")
        if not self._decoded and self._failed >= min(NO_IMAGE_LIMIT, self.stats.rows or NO_IMAGE_LIMIT):
            raise VpgtransError(f"none of the first {self._failed} images could be used (e.g. {name}: {what}); "
                                "check the image files")

    def _flush_warnings(self) -> None:
        for message in self._pending:
            log.warning("%s", message)
        self._pending.clear()

    def __call__(self, rows: list[dict]) -> dict:
        images, kept = [], []
        for row in rows:
            try:
                images.append(open_image(row["image"]))
            except ImageTooLarge as exc:
                self._skip_image(row, "large_image", exc)
                continue
            except Exception as exc:  # noqa: BLE001 - a corrupt image is skipped and counted, never fatal
                self._skip_image(row, "unreadable_image", exc)
                continue
            self._decoded += 1
            kept.append(row)
        if self._decoded:
            self._flush_warnings()
        if not kept:
            return {}
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        # Grounding prompts through the template's VQA slot: the referring expression is the question.
        prompt_task = "caption" if self.task == "caption" else "vqa"
        question = (lambda r: None) if self.task == "caption" else (lambda r: r["question"])
        if self.mode == "generate":
            ids = [prompt_ids(self.tokenizer, self.template, prompt_task, self.num_query_tokens, question(r),
                              self.is_encoder_decoder) for r in kept]
            left = not self.is_encoder_decoder
            input_ids = self._pad(ids, self.pad_id, left=left)
            attention_mask = self._pad([[1] * len(s) for s in ids], 0, left=left)
            references = [r["answers"] if self.task == "vqa" else list(r["box"]) if self.task == "grounding" else
                          (r["caption"] if isinstance(r["caption"], list) else [r["caption"]]) for r in kept]
            return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                    "references": references}
        examples = [training_example(self.tokenizer, self.template, prompt_task, self.num_query_tokens,
                                     _target(r, self.task), question(r), self.is_encoder_decoder, self.max_target_len)
                    for r in kept]
        input_ids = self._pad([e["input_ids"] for e in examples], self.pad_id, left=False)
        attention_mask = self._pad([[1] * len(e["input_ids"]) for e in examples], 0, left=False)
        labels = self._pad([e["labels"] for e in examples], IGNORE_INDEX, left=False)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "pixel_values": pixel_values}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
