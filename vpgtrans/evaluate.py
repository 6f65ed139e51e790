"""``eval``: generate with the bundle's prompt template and score — captions with CIDEr and BLEU-4
(pycocoevalcap), VQA with the standard VQAv2 accuracy and exact match, grounding (box text
``x1,y1,x2,y2``) with accuracy at IoU >= 0.5 and mean IoU, multiple-choice with accuracy (by image / text-only)
and the count of unparseable answers (by likelihood: also the length-normalised ``accuracy_norm``). Never
writes into the bundle."""

from __future__ import annotations

import json
import os
from collections import Counter
from contextlib import closing
from pathlib import Path

import torch

from vpgtrans.data import TASKS, VQA_KEYS, LoadStats, load_rows

from vpgtrans.collate import Collator
from vpgtrans.errors import VpgtransError
from vpgtrans.loader import load_micro_batches
from vpgtrans.prompting import clean_generation, stop_token_ids


def score(task: str, predictions: list[str], references: list, tokenizer: str = "regex",
          answer_types: list[str | None] | None = None, choice_answer: str = "letter",
          predictions_norm: list[str] | None = None) -> dict:
    """The task's scores: caption -> CIDEr / BLEU; vqa -> VQA accuracy / EM (and by answer type when
    ``answer_types`` names any); grounding -> accuracy at
    IoU >= 0.5, mean IoU, parse rate (``references`` are the boxes); multiple-choice -> accuracy overall,
    with / without an image, unparseable answers counted, the answers read in format ``choice_answer``
    (and ``accuracy_norm*`` of ``predictions_norm``, likelihood scoring's length-normalised picks)."""
    from vpgtrans.grounding import grounding_accuracy
    from vpgtrans.metrics import caption_scores, vqa_scores
    from vpgtrans.multiple_choice import multiple_choice_scores

    if task not in TASKS:
        raise VpgtransError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task == "caption":  # (tokenizer: regex, or COCO's Java PTB tokenizer)
        return caption_scores(predictions, references, tokenizer)
    if task == "vqa":
        return vqa_scores(predictions, references, answer_types)
    if task == "multiple-choice":
        return multiple_choice_scores(predictions, references, choice_answer, predictions_norm)
    return grounding_accuracy(predictions, references)


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
                   tokenizer: str = "regex", num_workers: int = 0, choice_scoring: str = "generate",
                   choice_answer: str = "letter") -> dict:
    """Scores and predictions of ``model`` on ``dataset`` (a ``datasets.Dataset`` or list of rows of one task),
    and ``indices``: the evaluated row (caption: image) each prediction is for. ``num_workers`` DataLoader
    workers decode the images. ``progress(done, total)``: called after each batch with the rows done so far.
    ``choice_scoring`` (multiple-choice only): "generate" parses the generated answer (LaVIN's way);
    "likelihood" picks the option whose answer text the model finds most likely, and also the most likely
    per byte of the option (``predictions_norm``, scored as ``accuracy_norm``; see ``_rank_choices``).
    ``choice_answer`` (multiple-choice only): the answer's format, "letter" (``The answer is B``) or "text"
    (``The answer is <option>``), as parsed from the generation and as scored by likelihood."""
    rows = group_caption_rows(dataset) if task == "caption" else list(dataset)
    if max_samples is not None:
        rows = rows[:max_samples]
    if choice_scoring not in CHOICE_SCORING:
        raise VpgtransError(f"--choice-scoring must be {' or '.join(CHOICE_SCORING)} (got {choice_scoring!r})")
    if task == "multiple-choice" and choice_scoring == "likelihood":
        return _rank_choices(model, rows, stats, progress, choice_answer)
    collate = Collator(model.tokenizer, model.template, task, model.num_image_tokens, model.image_processor,
                       model.is_encoder_decoder, mode="generate", stats=stats, choice_answer=choice_answer)
    device = next(model.visual.parameters()).device
    was_training = model.training
    model.eval()
    predictions, references, indices = [], [], []
    stop_ids = stop_token_ids(model.tokenizer, model.template)
    plan = [list(range(start, min(start + batch_size, len(rows)))) for start in range(0, len(rows), batch_size)]
    with closing(load_micro_batches(rows, collate, plan, num_workers, device)) as loaded:
        for chunk, batch in loaded:
            if batch:
                generated = model.generate(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                                           max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                                           eos_token_id=stop_ids, pad_token_id=collate.pad_id)
                texts = model.tokenizer.batch_decode(generated, skip_special_tokens=True)
                predictions.extend(clean_generation(t, model.template) for t in texts)
                references.extend(batch["references"])
                indices.extend(chunk[position] for position in batch["positions"])
            if progress is not None:
                progress(chunk[-1] + 1, len(rows))
    model.train(was_training)
    if not predictions:
        raise VpgtransError("no sample could be evaluated: every image was unreadable")
    answer_types = [rows[i].get("answer_type") for i in indices] if task == "vqa" else None
    scores = score(task, predictions, references, tokenizer, answer_types, choice_answer)
    return {"scores": scores, "predictions": predictions, "references": references, "indices": indices}


CHOICE_SCORING = ("generate", "likelihood")


def answer_token_log_probs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_probs, labels)``, both (B, T): log p(token | prompt, image, earlier tokens) of each target token
    of a ``Collator(mode="train")`` batch, from one forward pass (the training loss's own tokens and
    alignment: for a decoder-only LLM both are shifted so that position t holds the token at t + 1);
    ``log_probs`` is 0 and ``labels`` ``IGNORE_INDEX`` off the targets."""
    from vpgtrans.prompting import IGNORE_INDEX

    labels = batch["labels"]
    logits = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], labels=labels).logits
    if not model.is_encoder_decoder:  # a decoder-only LLM's logits at t predict the token at t + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    chosen = labels != IGNORE_INDEX
    log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return log_probs * chosen, labels


def answer_log_likelihoods(model, batch: dict) -> torch.Tensor:
    """Sum over each sample's target tokens of log p(token | prompt, image, earlier tokens), from one
    forward pass of a ``Collator(mode="train")`` batch (the training loss's own tokens and alignment)."""
    return answer_token_log_probs(model, batch)[0].sum(dim=-1)


def option_log_likelihood(log_probs: torch.Tensor, labels: torch.Tensor, stated: list[int]) -> float:
    """One option's log-likelihood without its leading ``The answer is``: the sum of ``log_probs`` (T,) over
    its target tokens (``labels`` (T,) not ``IGNORE_INDEX``) after the first ``len(stated)``, which must be
    ``stated`` (``The answer is`` as the target's tokenisation starts): the option's own tokens and the
    template's end of answer (its suffix; EOS for a seq2seq LLM). Raises when the target starts otherwise
    (a tokenizer that joins ``is`` with the option)."""
    from vpgtrans.prompting import IGNORE_INDEX

    ids, scores = labels[labels != IGNORE_INDEX].tolist(), log_probs[labels != IGNORE_INDEX]
    if ids[:len(stated)] != stated or len(ids) == len(stated):
        raise VpgtransError(f"likelihood scoring: an option's target tokens {ids} do not start with those of 'The "
                            f"answer is' alone ({stated}), so its own log-likelihood (accuracy_norm) cannot be "
                            "separated; use --choice-scoring generate")
    return float(scores[len(stated):].sum())


def _rank_choices(model, rows: list[dict], stats: LoadStats | None, progress, choice_answer: str = "letter") -> dict:
    """Multiple-choice by likelihood, two picks from one forward pass per row (its options as one batch):

    - ``predictions`` (score ``accuracy``, lm-evaluation-harness's ``acc``): the option whose whole
      training target in format ``choice_answer`` (``The answer is X`` / ``The answer is <option>``, + the
      template's suffix) has the highest summed log-probability after the row's prompt and image. The shared
      ``The answer is`` adds the same to every option, so the options' own tokens decide, and with "text" a
      shorter option (fewer tokens to pay for) is favoured.
    - ``predictions_norm`` (``accuracy_norm``, the harness's length-normalised ``acc_norm``): the option
      with the highest ``option_log_likelihood / len(option_text.encode("utf-8"))``, where
      ``option_log_likelihood`` sums the same tokens' log-probabilities without the leading ``The answer is``
      (the harness scores a choice after a context, which is where that prefix belongs) and
      ``option_text`` is what follows ``The answer is`` (the letter, or the option's words, stripped). The
      harness divides by ``len(choice)`` in characters for ``acc_norm`` and in UTF-8 bytes for
      ``acc_bytes``: these agree on ASCII options; this is the byte count. With "letter" every option is
      one byte and the dropped prefix scores the same in every option, so the two picks agree.

    Each pick is written as that option's target, so ``multiple_choice_scores`` reads it; ``choice_scores``
    has each row's per-option numbers, ``{"summed": [...], "per_byte": [...]}``. No answer is
    unparseable by construction (except between options that are equal as text), so this measures what the
    model prefers, not whether it can say it; the prompts are exactly the training prompts. Ties go to the
    first option. Rows whose image cannot be used are skipped and counted as in generation."""
    from vpgtrans.multiple_choice import STATED, option_text, per_byte, target_text
    from vpgtrans.prompting import target_ids

    # The ids every option's target starts with (the collator scores multiple choice as a VQA answer).
    stated = target_ids(model.tokenizer, model.template, "vqa", STATED, model.is_encoder_decoder, end=False)
    collate = Collator(model.tokenizer, model.template, "multiple-choice", model.num_image_tokens,
                       model.image_processor, model.is_encoder_decoder, mode="train", stats=stats,
                       choice_answer=choice_answer)
    device = next(model.visual.parameters()).device
    was_training = model.training
    model.eval()
    predictions, predictions_norm, choice_scores, references, indices = [], [], [], [], []
    for done, row in enumerate(rows, 1):
        options = range(len(row["choices"]))
        batch = collate([{**row, "answer": i} for i in options])
        if batch:
            indices.append(done - 1)
            batch = {k: v if v is None else v.to(device) for k, v in batch.items()}
            log_probs, labels = answer_token_log_probs(model, batch)  # (options, T)
            summed = log_probs.sum(dim=-1)
            best = int(summed.argmax())
            own = [option_log_likelihood(log_probs[i], labels[i], stated) for i in options]
            normalised = per_byte(own, [option_text(i, row["choices"], choice_answer) for i in options])
            best_norm = max(options, key=normalised.__getitem__)  # (the first of equals, as argmax)
            choice_scores.append({"summed": summed.tolist(), "per_byte": normalised})
            predictions.append(target_text(best, row["choices"], choice_answer))
            predictions_norm.append(target_text(best_norm, row["choices"], choice_answer))
            references.append({"answer": row["answer"], "num_choices": len(row["choices"]),
                               "choices": list(row["choices"]), "image": row.get("image") is not None})
        if progress is not None:
            progress(done, len(rows))
    model.train(was_training)
    if not predictions:
        raise VpgtransError("no sample could be evaluated: every image was unreadable")
    return {"scores": score("multiple-choice", predictions, references, choice_answer=choice_answer,
                            predictions_norm=predictions_norm),
            "predictions": predictions, "predictions_norm": predictions_norm, "choice_scores": choice_scores,
            "references": references, "indices": indices}


def evaluate(bundle_dir: Path, data: Path, task: str | None = None, batch_size: int = 16,
             max_samples: int | None = None, max_new_tokens: int = 20, num_beams: int = 1,
             out: Path | None = None, device=None, strict: bool | None = None, force: bool = False,
             dtype: str | None = None, quantization: str | None = None, device_map=None, progress=None,
             tokenizer: str = "regex", num_workers: int = 0, submission: Path | None = None,
             choice_scoring: str = "generate", choice_answer: str | None = None) -> dict:
    """Load a bundle, score it on ``data``; write scores + predictions to ``out`` (never to the bundle;
    an existing ``out`` file only with ``force``). ``strict``: a bad data row is an error, not a skip.
    ``submission`` (VQA rows with a ``question_id``): also write the answers as a VQAv2 test-server file.
    ``num_workers``: DataLoader worker processes decoding the images.
    ``dtype`` ("bf16" / "fp16" / "fp32") for the frozen LLM, ``quantization`` ("8bit" / "4bit") and
    ``device_map`` ("auto", ...) let an LLM larger than one device be evaluated. ``device`` None: accelerate's
    device for this process (the GPU where there is one). ``choice_answer`` (multiple-choice): "letter" or
    "text"; None: the format the bundle was trained with (``trained_choice_answer``)."""
    from vpgtrans.bundle import load_model
    from vpgtrans.outputs import check_out_dir, check_writable

    from vpgtrans.training import torch_dtype

    frozen_dtype = torch_dtype(dtype)
    if tokenizer == "ptb":
        from vpgtrans.metrics import ptb_tokenize

        ptb_tokenize({0: ["a check that java runs"]})  # before any model is loaded
    elif tokenizer != "regex":
        raise VpgtransError(f"--tokenizer must be regex or ptb (got {tokenizer!r})")
    if choice_scoring not in CHOICE_SCORING:
        raise VpgtransError(f"--choice-scoring must be {' or '.join(CHOICE_SCORING)} (got {choice_scoring!r})")
    if choice_answer is not None:
        from vpgtrans.multiple_choice import check_choice_answer

        check_choice_answer(choice_answer)
    bad = [f"--{name.replace('_', '-')} must be >= 1 (got {value})" for name, value in
           (("batch_size", batch_size), ("max_new_tokens", max_new_tokens), ("num_beams", num_beams),
            ("max_samples", max_samples)) if value is not None and value < 1]
    if num_workers < 0:
        bad.append(f"--num-workers must be >= 0 (got {num_workers})")
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
    if submission is not None:
        if out is not None and Path(submission).absolute() == Path(out).absolute():
            raise VpgtransError(f"{submission}: --submission and --out must be two files")
        check_out_dir(submission, force, inputs=[bundle_dir, data], is_file=True)
        check_writable(submission)
    dataset, found_task, stats = load_rows(data, task, strict=strict)
    if submission is not None:  # before any model is loaded
        check_submission_rows(dataset, found_task, max_samples)
    answer_from = "option"
    if choice_answer is None:  # the format the bundle learned to answer in, else LaVIN's
        trained = trained_choice_answer(bundle_dir) if found_task == "multiple-choice" else None
        choice_answer, answer_from = (trained, "bundle") if trained is not None else ("letter", "default")
    llm_options = {k: v for k, v in (("quantization", quantization), ("device_map", device_map)) if v is not None}
    model = load_model(bundle_dir, device=device, dtype=frozen_dtype, **llm_options)
    result = evaluate_model(model, dataset, found_task, batch_size, max_samples, max_new_tokens, num_beams, stats,
                            progress=progress, tokenizer=tokenizer, num_workers=num_workers,
                            choice_scoring=choice_scoring, choice_answer=choice_answer)
    data_name = str(Path(data).resolve()) if Path(data).exists() else os.fspath(data)  # a datasets name as given
    report = {"bundle": str(Path(bundle_dir).resolve()), "data": data_name, "task": found_task,
              "scores": result["scores"], "data_stats": stats.to_dict()}
    if found_task == "caption":
        report["tokenizer"] = tokenizer  # which caption tokenisation the scores used (ptb: COCO's own)
    if found_task == "multiple-choice":
        report["choice_scoring"] = choice_scoring  # how the answer was read: generated text or likelihood
        # In which format (letter / text), and whether --choice-answer, the bundle's training or the default said so.
        report["choice_answer"], report["choice_answer_from"] = choice_answer, answer_from
    if found_task == "grounding":  # what ignoring the expression scores on the same rows, beside the model
        from vpgtrans.grounding import grounding_baselines

        report["baselines"] = grounding_baselines(list(dataset)[:max_samples])
    if out is not None:
        from vpgtrans.io import atomic_write_text

        from vpgtrans.outputs import output_errors

        samples = [{"prediction": p, "references": r} for p, r in zip(result["predictions"], result["references"])]
        if "predictions_norm" in result:  # likelihood scoring: the length-normalised pick and every option's scores
            for sample, prediction, scores in zip(samples, result["predictions_norm"], result["choice_scores"]):
                sample.update(prediction_norm=prediction, choice_scores=scores)
        if found_task == "vqa":  # which question each answer is for, where the rows say (VQAv2's id and type)
            for sample, row in zip(samples, (dataset[i] for i in result["indices"])):
                sample.update({key: row[key] for key in VQA_KEYS if row.get(key) is not None})
        with output_errors(out):
            atomic_write_text(Path(out), json.dumps({**report, "samples": samples}, indent=2) + "\n")
    if submission is not None:
        report["submission"] = write_submission(submission, [dataset[i]["question_id"] for i in result["indices"]],
                                                result["predictions"])
    return report


def trained_choice_answer(bundle_dir: Path) -> str | None:
    """The answer format the bundle's latest multiple-choice training used (``config.train.choice_answer`` of
    the newest stage, following ``parent_config``, whose ``task`` was multiple-choice; "letter" for one trained
    before the option existed), or None when no stage of it trained on multiple choice (or the manifest
    cannot be read: loading the bundle then names the problem)."""
    from vpgtrans.bundle import read_manifest

    try:
        config = read_manifest(Path(bundle_dir)).get("config")
    except VpgtransError:
        return None
    for _ in range(64):  # parent_config nests one level per stage
        if not isinstance(config, dict):
            return None
        train = config.get("train")
        if config.get("task") == "multiple-choice" and isinstance(train, dict):
            from vpgtrans.config import CHOICE_ANSWERS

            value = train.get("choice_answer", "letter")
            if value not in CHOICE_ANSWERS:
                raise VpgtransError(f"{bundle_dir}: the manifest's training choice_answer is {value!r}, not one of "
                                    f"{', '.join(CHOICE_ANSWERS)}; pass --choice-answer")
            return value
        config = config.get("parent_config")
    return None


def check_submission_rows(dataset, task: str, max_samples: int | None) -> None:
    """Every row to answer has its own integer ``question_id`` (what the VQAv2 test server keys answers by)."""
    if task != "vqa":
        raise VpgtransError(f"--submission writes VQAv2 answers; this data holds {task} rows")
    count = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    ids = list(dataset.select(range(count))["question_id"]) if "question_id" in dataset.column_names else [None] * count
    missing = [i for i, question_id in enumerate(ids) if question_id is None]
    if missing:
        raise VpgtransError(f"--submission: {len(missing)} of {count} rows have no 'question_id' (e.g. row "
                            f"{missing[0]} of the rows kept); VQAv2's test server matches answers by it: add it to "
                            "every row")
    repeated = [(question_id, count) for question_id, count in Counter(ids).items() if count > 1]
    if repeated:
        raise VpgtransError(f"--submission: question_id {repeated[0][0]} is on more than one row ({repeated[0][1]} "
                            f"rows; {len(repeated)} repeated id(s) in all); the test server takes one answer per "
                            "question")


def write_submission(path: Path, question_ids: list[int], answers: list[str]) -> dict:
    """Write VQAv2's result format, ``[{"question_id": int, "answer": str}, ...]``, atomically. The answers
    are as generated: the evaluation server normalises them itself."""
    from vpgtrans.io import atomic_write_text
    from vpgtrans.outputs import output_errors

    entries = [{"question_id": int(question_id), "answer": answer}
               for question_id, answer in zip(question_ids, answers)]
    with output_errors(path):
        atomic_write_text(Path(path), json.dumps(entries) + "\n")
    return {"file": str(Path(path).resolve()), "answers": len(entries)}

