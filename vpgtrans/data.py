"""Image-text data: a directory with a ``*.jsonl`` + images, or a ``datasets.save_to_disk`` directory.

Rows are ``{"image": "relative/path", "caption": "..." | [...]}`` (captioning) or
``{"image", "question", "answers": [...]}`` (VQA). Rows whose image file is missing are skipped and
counted at load time; images that fail to decode are skipped and counted when their batch is built
(``LoadStats``). The count goes to the run log and the bundle manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vpgtrans.config import PromptTemplate
from vpgtrans.errors import VpgtransError
from vpgtrans.prompting import IGNORE_INDEX, prompt_ids, training_example

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass
class LoadStats:
    rows: int = 0
    skipped_missing_image: int = 0
    skipped_bad_row: int = 0
    skipped_unreadable_image: int = 0
    bad_rows: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "skipped_missing_image": self.skipped_missing_image,
                "skipped_bad_row": self.skipped_bad_row, "skipped_unreadable_image": self.skipped_unreadable_image}


def _read_jsonl_dir(data_dir: Path, stats: LoadStats) -> list[dict]:
    files = sorted(data_dir.glob("*.jsonl"))
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "none"
        raise VpgtransError(f"{data_dir}: expected exactly one *.jsonl file (found {found})")
    rows = []
    with open(files[0], encoding="utf-8", errors="replace") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                    raise ValueError("no 'image' path")
            except ValueError as exc:
                stats.skipped_bad_row += 1
                stats.bad_rows.append(f"{files[0].name}:{line_no}: {exc}")
                continue
            path = (data_dir / row["image"]).resolve()
            if not path.is_file():
                stats.skipped_missing_image += 1
                continue
            row["image"] = str(path)
            rows.append(row)
    return rows


def load_rows(data_dir: str | Path, task: str | None = None):
    """Load a data directory as a ``datasets.Dataset`` plus the task it holds and the load stats."""
    import datasets

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise VpgtransError(f"{data_dir}: data directory not found")
    stats = LoadStats()
    if (data_dir / "dataset_info.json").is_file() or (data_dir / "state.json").is_file():
        try:
            dataset = datasets.load_from_disk(str(data_dir))
        except Exception as exc:  # noqa: BLE001
            raise VpgtransError(f"{data_dir}: not a readable datasets directory ({exc})") from None
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
        if "image" not in dataset.column_names:
            raise VpgtransError(f"{data_dir}: the dataset has no 'image' column")
    else:
        rows = _read_jsonl_dir(data_dir, stats)
        dataset = datasets.Dataset.from_list(rows) if rows else None
    if dataset is None or len(dataset) == 0:
        raise VpgtransError(f"{data_dir}: no usable rows (missing images: {stats.skipped_missing_image}, "
                            f"bad rows: {stats.skipped_bad_row})")
    columns = set(dataset.column_names)
    found = "caption" if "caption" in columns else "vqa" if {"question", "answers"} <= columns else None
    if found is None:
        raise VpgtransError(f"{data_dir}: rows need 'caption', or 'question' and 'answers' (columns: {sorted(columns)})")
    if task is not None and task != found:
        raise VpgtransError(f"{data_dir}: holds {found} data, but task '{task}' was asked for")
    stats.rows = len(dataset)
    return dataset, found, stats


def build_image_processor(image_size: int, mean=None, std=None):
    """BLIP-2's preprocessing: RGB, bicubic resize to a square, rescale, normalise (CLIP stats)."""
    try:  # the PIL backend, without torchvision (same preprocessing, no warning)
        from transformers import BlipImageProcessorPil as BlipImageProcessor
    except ImportError:
        from transformers import BlipImageProcessor

    return BlipImageProcessor(size={"height": image_size, "width": image_size},
                              image_mean=list(mean or OPENAI_CLIP_MEAN), image_std=list(std or OPENAI_CLIP_STD),
                              do_convert_rgb=True)


def _open_image(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, dict) and image.get("bytes") is not None:  # datasets Image feature, undecoded
        import io

        return Image.open(io.BytesIO(image["bytes"])).convert("RGB")
    with Image.open(image if isinstance(image, str) else image["path"]) as img:
        return img.convert("RGB")


def _first(value):
    return value[0] if isinstance(value, list) else value


def most_common_answer(answers: list[str]) -> str:
    """The VQA training target: the answer most annotators gave (first one on ties)."""
    counts: dict[str, int] = {}
    for answer in answers:
        counts[answer] = counts.get(answer, 0) + 1
    return max(counts, key=counts.get)


class Collator:
    """Rows -> a batch. ``mode="train"``: right-padded ids with labels. ``mode="generate"``: the prompt
    only, left-padded for decoder-only LLMs, plus the references for scoring."""

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

    def _pad(self, sequences: list[list[int]], value: int, left: bool) -> torch.Tensor:
        width = max(len(s) for s in sequences)
        padded = [([value] * (width - len(s)) + s) if left else (s + [value] * (width - len(s))) for s in sequences]
        return torch.tensor(padded, dtype=torch.long)

    def __call__(self, rows: list[dict]) -> dict:
        images, kept = [], []
        for row in rows:
            try:
                images.append(_open_image(row["image"]))
                kept.append(row)
            except Exception:  # noqa: BLE001 - a corrupt image is skipped and counted, never fatal
                self.stats.skipped_unreadable_image += 1
        if not kept:
            return {}
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        question = (lambda r: r["question"]) if self.task == "vqa" else (lambda r: None)
        if self.mode == "generate":
            ids = [prompt_ids(self.tokenizer, self.template, self.task, self.num_query_tokens, question(r),
                              self.is_encoder_decoder) for r in kept]
            left = not self.is_encoder_decoder
            input_ids = self._pad(ids, self.pad_id, left=left)
            attention_mask = self._pad([[1] * len(s) for s in ids], 0, left=left)
            references = [r["answers"] if self.task == "vqa" else
                          (r["caption"] if isinstance(r["caption"], list) else [r["caption"]]) for r in kept]
            return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                    "references": references}
        examples = [training_example(self.tokenizer, self.template, self.task, self.num_query_tokens,
                                     most_common_answer(r["answers"]) if self.task == "vqa" else _first(r["caption"]),
                                     question(r), self.is_encoder_decoder, self.max_target_len) for r in kept]
        input_ids = self._pad([e["input_ids"] for e in examples], self.pad_id, left=False)
        attention_mask = self._pad([[1] * len(e["input_ids"]) for e in examples], 0, left=False)
        labels = self._pad([e["labels"] for e in examples], IGNORE_INDEX, left=False)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "pixel_values": pixel_values}
