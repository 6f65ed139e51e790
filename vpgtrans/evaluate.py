"""``eval``: generate with the bundle's prompt template and score — captions with CIDEr and BLEU-4
(pycocoevalcap), VQA with the standard VQAv2 accuracy and exact match, grounding (box text
``x1,y1,x2,y2``) with accuracy at IoU >= 0.5 and mean IoU, multiple-choice with accuracy (by image / text-only)
and the count of unparseable answers. Never writes into the bundle."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from vpgtrans.data import TASKS, LoadStats, load_rows

from vpgtrans.collate import Collator
from vpgtrans.errors import VpgtransError
from vpgtrans.prompting import clean_generation, stop_token_ids


def score(task: str, predictions: list[str], references: list, tokenizer: str = "regex") -> dict:
    """The task's scores: caption -> CIDEr / BLEU; vqa -> VQA accuracy / EM; grounding -> accuracy at
    IoU >= 0.5, mean IoU, parse rate (``references`` are the boxes); multiple-choice -> accuracy overall,
    with / without an image, unparseable answers counted."""
    from vpgtrans.grounding import grounding_accuracy
    from vpgtrans.metrics import caption_scores, vqa_scores
    from vpgtrans.multiple_choice import multiple_choice_scores

    if task not in TASKS:
        raise VpgtransError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task == "caption":  # (tokenizer: regex, or COCO's Java PTB tokenizer)
        return caption_scores(predictions, references, tokenizer)
    return {"vqa": vqa_scores, "grounding": grounding_accuracy,
            "multiple-choice": multiple_choice_scores}[task](predictions, references)


def group_caption_rows(dataset) -> list[dict]:
    """One eval sample per image with all its reference captions (COCO has five per image)."""
    by_image: dict[str, dict] = {}
    for row in dataset:
        key = row["image"] if isinstance(row["image"], str) else str(len(by_image))
        captions = row["caption"] if isinstance(row["caption"], list) else [row["caption"]]
        entry = by_image.setdefault(key, {"image": row["image"], "caption": []})
        entry["caption"].extend(captions)
    return list(by_image.values())


@torch.no_grad()
def evaluate_model(model, dataset, task: str, batch_size: int = 16, max_samples: int | None = None,
                   max_new_tokens: int = 20, num_beams: int = 1, stats: LoadStats | None = None, progress=None,
                   tokenizer: str = "regex") -> dict:
    """Scores and predictions of ``model`` on ``dataset`` (a ``datasets.Dataset`` or list of rows of one task).
    ``progress(done, total)``: called after each batch with the rows done so far."""
    rows = group_caption_rows(dataset) if task == "caption" else list(dataset)
    if max_samples is not None:
        rows = rows[:max_samples]
    collate = Collator(model.tokenizer, model.template, task, model.num_image_tokens, model.image_processor,
                       model.is_encoder_decoder, mode="generate", stats=stats)
    device = next(model.visual.parameters()).device
    was_training = model.training
    model.eval()
    predictions, references = [], []
    stop_ids = stop_token_ids(model.tokenizer, model.template)
    pad_id = collate.pad_id
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start:start + batch_size])
        if not batch:
            continue
        pixel_values = batch["pixel_values"].to(device) if batch["pixel_values"] is not None else None  # text-only
        generated = model.generate(batch["input_ids"].to(device), pixel_values,
                                   batch["attention_mask"].to(device), max_new_tokens=max_new_tokens,
                                   num_beams=num_beams, do_sample=False, eos_token_id=stop_ids, pad_token_id=pad_id)
        texts = model.tokenizer.batch_decode(generated, skip_special_tokens=True)
        predictions.extend(clean_generation(t, model.template) for t in texts)
        references.extend(batch["references"])
        if progress is not None:
            progress(min(start + batch_size, len(rows)), len(rows))
    model.train(was_training)
    if not predictions:
        raise VpgtransError("no sample could be evaluated: every image was unreadable")
    scores = score(task, predictions, references, tokenizer)
    return {"scores": scores, "predictions": predictions, "references": references}


def evaluate(bundle_dir: Path, data: Path, task: str | None = None, batch_size: int = 16,
             max_samples: int | None = None, max_new_tokens: int = 20, num_beams: int = 1,
             out: Path | None = None, device=None, strict: bool | None = None, force: bool = False,
             dtype: str | None = None, quantization: str | None = None, device_map=None, progress=None,
             tokenizer: str = "regex") -> dict:
    """Load a bundle, score it on ``data``; write scores + predictions to ``out`` (never to the bundle;
    an existing ``out`` file only with ``force``). ``strict``: a bad data row is an error, not a skip.
    ``dtype`` ("bf16" / "fp16" / "fp32") for the frozen LLM, ``quantization`` ("8bit" / "4bit") and
    ``device_map`` ("auto", ...) let an LLM larger than one device be evaluated. ``device`` None: accelerate's
    device for this process (the GPU where there is one)."""
    from vpgtrans.bundle import load_model
    from vpgtrans.outputs import check_out_dir, check_writable

    from vpgtrans.training import torch_dtype

    frozen_dtype = torch_dtype(dtype)
    if tokenizer == "ptb":
        from vpgtrans.metrics import ptb_tokenize

        ptb_tokenize({0: ["a check that java runs"]})  # before any model is loaded
    elif tokenizer != "regex":
        raise VpgtransError(f"--tokenizer must be regex or ptb (got {tokenizer!r})")
    bad = [f"--{name.replace('_', '-')} must be >= 1 (got {value})" for name, value in
           (("batch_size", batch_size), ("max_new_tokens", max_new_tokens), ("num_beams", num_beams),
            ("max_samples", max_samples)) if value is not None and value < 1]
    if bad:
        raise VpgtransError("; ".join(bad))
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise VpgtransError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, mps, ...)") from None
        if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
            raise VpgtransError(f"--device {device}: no such CUDA device here ({torch.cuda.device_count()} visible)")
    if out is not None:
        check_out_dir(out, force, inputs=[bundle_dir, data], is_file=True)
        check_writable(out)
    dataset, found_task, stats = load_rows(data, task, strict=strict)
    llm_options = {k: v for k, v in (("quantization", quantization), ("device_map", device_map)) if v is not None}
    model = load_model(bundle_dir, device=device, dtype=frozen_dtype, **llm_options)
    result = evaluate_model(model, dataset, found_task, batch_size, max_samples, max_new_tokens, num_beams, stats,
                            progress=progress, tokenizer=tokenizer)
    data_name = str(Path(data).resolve()) if Path(data).exists() else os.fspath(data)  # a datasets name as given
    report = {"bundle": str(Path(bundle_dir).resolve()), "data": data_name, "task": found_task,
              "scores": result["scores"], "data_stats": stats.to_dict()}
    if found_task == "caption":
        report["tokenizer"] = tokenizer  # which caption tokenisation the scores used (ptb: COCO's own)
    if found_task == "grounding":  # what ignoring the expression scores on the same rows, beside the model
        from vpgtrans.grounding import grounding_baselines

        report["baselines"] = grounding_baselines(list(dataset)[:max_samples])
    if out is not None:
        from vpgtrans.io import atomic_write_text

        from vpgtrans.outputs import output_errors

        samples = [{"prediction": p, "references": r} for p, r in zip(result["predictions"], result["references"])]
        with output_errors(out):
            atomic_write_text(Path(out), json.dumps({**report, "samples": samples}, indent=2) + "\n")
    return report

