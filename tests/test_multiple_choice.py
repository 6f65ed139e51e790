"""Multiple-choice data (rows with and without an image), answer parsing, scores, and ``eval --task
multiple-choice``."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from vpgtrans.cli import app
from vpgtrans.demo.choices import make_choice_split, strip_images
from vpgtrans.errors import VpgtransError
from vpgtrans.multiple_choice import (format_question, multiple_choice_scores, option_histogram, parse_answer,
                                      parse_text_answer, per_byte, read_answer, target_text)


@pytest.mark.parametrize("text, expected", [
    ("The answer is B", 1), ("The answer is B.", 1), ("the answer is (C)", 2), ("Answer: the answer is: D because", 3),
    ("B", 1), ("(A)", 0), (" A. ", 0), ("C)", 2),
    ("The answer is a cat", None), ("b", None), ("The answer is E", None), ("AB", None), ("The answer is Bob", None),
    ("", None), ("red", None), ("E", None),
])
def test_parse_answer(text, expected):
    assert parse_answer(text, 4) == expected


def test_scores_count_unparseable_answers_separately():
    references = [{"answer": 0, "num_choices": 4, "image": True}, {"answer": 1, "num_choices": 4, "image": True},
                  {"answer": 2, "num_choices": 3, "image": False}, {"answer": 0, "num_choices": 2, "image": True},
                  {"answer": 1, "num_choices": 2, "image": False}]
    predictions = ["The answer is A", "nonsense", "C", "The answer is B", "The answer is C"]  # C is past 2 options
    scores = multiple_choice_scores(predictions, references)
    assert scores == {"accuracy": 2 / 5, "accuracy_image": 1 / 3, "accuracy_text": 1 / 2, "unparseable": 2,
                      "unparseable_rate": 2 / 5, "samples": 5, "samples_image": 3, "samples_text": 2}
    assert multiple_choice_scores(["A"], [{"answer": 0, "num_choices": 2, "image": True}])["accuracy_text"] is None


def test_prompt_and_target_text():
    row = {"question": "what color is the ball?", "context": "The ball is red.", "choices": ["blue", "red"], "answer": 1}
    assert format_question(row) == "what color is the ball? Context: The ball is red. Options: (A) blue (B) red"
    assert format_question({**row, "context": ""}) == "what color is the ball? Options: (A) blue (B) red"
    assert target_text(1, row["choices"]) == target_text(1, row["choices"], "letter") == "The answer is B"
    assert target_text(1, [" blue ", " dark red "], "text") == "The answer is dark red"  # the option's own words
    with pytest.raises(VpgtransError, match="--choice-answer must be one of letter, text"):
        target_text(1, row["choices"], "word")


OPTIONS = ["top", "top-left", "Red ball", "big", "big red"]


@pytest.mark.parametrize("text, expected", [
    ("The answer is top", 0), ("the answer is TOP.", 0), ("The answer is: top-left", 1), ("top-left", 1),
    ("  Top-Left!  ", 1), ("The answer is red   ball", 2), ("Answer: the answer is Red Ball, because", 2),
    ("The answer is top-left because it is at the top", 1),  # "top" is not read inside "top-left"
    ("The answer is big red", 4), ("the answer is big.", 3),  # of two options that fit there, the longer
    ("The answer is top. No, the answer is big", None),  # two options named: ambiguous
    ("The answer is B", None), ("B", None), ("(A)", None),  # a letter is no option's text
    ("The answer is blue", None), ("red", None), ("", None), ("the answer is", None), ("topless", None),
    ("I think top", None),  # not stated, not the whole answer
])
def test_parse_text_answer(text, expected):
    assert parse_text_answer(text, OPTIONS) == expected
    assert read_answer(text, {"choices": OPTIONS, "num_choices": len(OPTIONS)}, "text") == expected


def test_text_answers_of_options_equal_as_text_are_ambiguous():
    assert parse_text_answer("The answer is red", ["red", "Red.", "blue"]) is None
    assert parse_text_answer("red", ["red", "RED", "blue"]) is None
    assert parse_text_answer("blue", ["red", "RED", "blue"]) == 2


def test_text_scores_read_the_options_and_need_them():
    references = [{"answer": 0, "num_choices": 2, "choices": ["red", "blue"], "image": True},
                  {"answer": 1, "num_choices": 3, "choices": ["small", "large", "tiny"], "image": False},
                  {"answer": 2, "num_choices": 3, "choices": ["one", "two", "three"], "image": True}]
    predictions = ["The answer is red", "small", "The answer is C"]  # right, wrong, unparseable (a letter)
    scores = multiple_choice_scores(predictions, references, "text")
    assert (scores["accuracy"], scores["accuracy_image"], scores["accuracy_text"]) == (1 / 3, 1 / 2, 0.0)
    assert scores["unparseable"] == 1
    assert multiple_choice_scores(predictions, references)["unparseable"] == 2  # read as letters: C is right
    with pytest.raises(VpgtransError, match="need 'choices'"):
        multiple_choice_scores(["red"], [{"answer": 0, "num_choices": 2, "image": True}], "text")
    assert option_histogram(predictions, references, "text") == {
        "by_position": {"A": 2, "unparseable": 1}, "by_value": {"red": 1, "small": 1, "unparseable": 1}}
    assert option_histogram(["B", "B", "x"], [{"num_choices": 2}] * 3) == {"by_position": {"B": 2, "unparseable": 1}}


def test_per_byte_divides_by_the_options_utf8_bytes():
    # "né" is 2 characters but 3 bytes: per byte "top" (3 bytes) wins, per character "né" would (-1.5 / 2)
    assert per_byte([-2.0, -1.5, -2.4], ["top", "né", "top-left"]) == [-2.0 / 3, -1.5 / 3, -2.4 / 8]
    assert per_byte([-1.0], ["ü"]) == [-0.5]


def test_scores_of_the_length_normalised_picks():
    references = [{"answer": 0, "num_choices": 2, "choices": ["top", "top-left"], "image": True},
                  {"answer": 1, "num_choices": 2, "choices": ["top", "top-left"], "image": True},
                  {"answer": 1, "num_choices": 3, "choices": ["red", "dark red", "blue"], "image": False}]
    predictions = ["The answer is top", "The answer is top", "The answer is red"]  # right, wrong, wrong
    predictions_norm = ["The answer is top-left", "The answer is top-left", "The answer is dark red"]
    scores = multiple_choice_scores(predictions, references, "text", predictions_norm)
    assert scores == {"accuracy": 1 / 3, "accuracy_image": 1 / 2, "accuracy_text": 0.0,
                      "accuracy_norm": 2 / 3, "accuracy_norm_image": 1 / 2, "accuracy_norm_text": 1.0,
                      "unparseable": 0, "unparseable_rate": 0.0, "samples": 3, "samples_image": 2, "samples_text": 1}
    assert "accuracy_norm" not in multiple_choice_scores(predictions, references, "text")  # generation: no second pick
    assert multiple_choice_scores(predictions[:2], references[:2], "text", predictions_norm[:2])["accuracy_norm_text"] \
        is None
    with pytest.raises(VpgtransError, match="2 length-normalised predictions for 3 references"):
        multiple_choice_scores(predictions, references, "text", predictions_norm[:2])


@pytest.fixture(scope="module")
def choices(tmp_path_factory):
    return make_choice_split(tmp_path_factory.mktemp("mc") / "split", 24, seed=0, text_fraction=0.4)


def test_split_loads_with_and_without_images(choices, tmp_path):
    from vpgtrans.data import load_rows

    rows = [json.loads(line) for line in (choices / "data.jsonl").read_text().splitlines()]
    assert make_choice_split(tmp_path / "again", 24, seed=0, text_fraction=0.4).joinpath("data.jsonl").read_text() == \
        (choices / "data.jsonl").read_text()  # deterministic
    with_image = [r for r in rows if "image" in r]
    assert 0 < len(with_image) < len(rows)
    assert all("context" in r for r in rows if "image" not in r)
    dataset, task, stats = load_rows(choices)
    assert task == "multiple-choice" and stats.rows == len(rows) == len(dataset)
    assert sum(r["image"] is None for r in dataset) == len(rows) - len(with_image)
    # Bad rows are skipped and counted; a row of another task still needs its image.
    bad = tmp_path / "bad"
    bad.mkdir()
    lines = [{"question": "q?", "choices": ["a"], "answer": 0}, {"question": "q?", "choices": ["a", "b"], "answer": 2},
             {"question": "q?", "choices": ["a", "b"], "answer": True}, {"question": "q?", "choices": ["a", ""], "answer": 0},
             {"question": "q?", "choices": ["a", "b"], "answer": 1, "context": 3},
             {"question": "q?", "choices": ["a", "b"], "answer": 1, "image": "missing.png"},
             {"question": "ok?", "choices": ["a", "b"], "answer": 1}]
    (bad / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    dataset, task, stats = load_rows(bad)
    assert task == "multiple-choice" and len(dataset) == 1 and dataset[0]["question"] == "ok?"
    assert stats.skipped_bad_row == 5 and stats.skipped_missing_image == 1
    text_only = strip_images(choices, tmp_path / "text")
    assert all(r["image"] is None for r in load_rows(text_only)[0])


def test_collator_gives_text_only_rows_no_slots(choices, tiny):
    from transformers import AutoTokenizer

    from vpgtrans.collate import Collator
    from vpgtrans.config import PromptTemplate
    from vpgtrans.data import load_rows
    from vpgtrans.images import build_image_processor
    from vpgtrans.model.vlm import IMAGE_TOKEN_ID
    from vpgtrans.prompting import NO_IMAGE

    dataset = load_rows(choices)[0]
    rows = [dataset[i] for i in range(8)]
    tokenizer = AutoTokenizer.from_pretrained(tiny["llama"])
    for mode in ("train", "generate"):
        batch = Collator(tokenizer, PromptTemplate(), "multiple-choice", 3, build_image_processor(32), False,
                         mode=mode)(rows)
        slots = (batch["input_ids"] == IMAGE_TOKEN_ID).sum(1).tolist()
        assert slots == [3 if r["image"] else 0 for r in rows]
        assert batch["pixel_values"].shape[0] == sum(r["image"] is not None for r in rows)
        no_image = tokenizer(NO_IMAGE, add_special_tokens=False)["input_ids"]
        text_row = next(i for i, r in enumerate(rows) if r["image"] is None)
        ids = batch["input_ids"][text_row].tolist()
        assert any(ids[i:i + len(no_image)] == no_image for i in range(len(ids)))
    references = batch["references"]
    assert references[text_row] == {"answer": rows[text_row]["answer"], "num_choices": len(rows[text_row]["choices"]),
                                    "choices": rows[text_row]["choices"], "image": False}
    text_rows = [r for r in rows if r["image"] is None]
    batch = Collator(tokenizer, PromptTemplate(), "multiple-choice", 3, build_image_processor(32), False)(text_rows)
    assert batch["pixel_values"] is None


def test_lavin_trains_and_evaluates_on_multiple_choice(choices, tiny, tmp_path):
    """A LaVIN transfer on mixed rows, then ``eval --task multiple-choice --json``; the printed accuracy is
    recomputed from the written predictions."""
    from vpgtrans.config import InheritConfig
    from vpgtrans.recipes import stage
    from vpgtrans.stages.transfer import transfer

    summary = transfer(tiny["source"], tiny["llama"], choices, tmp_path / "run",
                       inherit_config=InheritConfig(connector="lavin"),
                       finetune_config=stage("lavin", "finetune").config(max_steps=2, batch_size=6))
    final = tmp_path / "run" / "finetune"
    assert summary["final_bundle"] == str(final)
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["metrics"]["train"]["steps"] == 2
    assert manifest["config"]["train"]["lr"] == pytest.approx(9e-3 * 6 / 256)
    # Only the connector and the adapters trained: the LLM's own weights are frozen.
    assert manifest["metrics"]["train"]["trainable"] == manifest["metrics"]["train"]["llm_trainable"] + (32 * 128 + 128 + 128 * 40 + 40)
    for part in ("mma", "mma-vision"):  # the experts of both adapters left zero
        state = load_file(str(final / f"{part}.safetensors"))
        assert all(state[k].abs().sum() > 0 for k in state if k.endswith("up.0.weight"))
    out = tmp_path / "scores.json"
    result = CliRunner().invoke(app, ["eval", str(final), "--data", str(choices), "--task", "multiple-choice",
                                      "--max-new-tokens", "6", "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # (progress goes to stderr)
    assert report["task"] == "multiple-choice"
    scores = report["scores"]
    assert set(scores) >= {"accuracy", "accuracy_image", "accuracy_text", "unparseable"}
    samples = json.loads(out.read_text())["samples"]
    assert len(samples) == scores["samples"] == 24
    parsed = [parse_answer(s["prediction"], s["references"]["num_choices"]) for s in samples]
    assert scores["unparseable"] == sum(p is None for p in parsed)
    assert scores["accuracy"] == sum(p == s["references"]["answer"] for p, s in zip(parsed, samples)) / 24
    assert scores["samples_text"] == sum(not s["references"]["image"] for s in samples)


@pytest.mark.parametrize("target, choice_answer", [("llama", "letter"), ("t5", "letter"), ("llama", "text")])
def test_likelihood_scoring_ranks_options_by_the_models_own_loss(choices, tiny, tmp_path, target, choice_answer):
    """``--choice-scoring likelihood``: each option's score is the summed log-probability of its answer
    text in the ``choice_answer`` format (the scored tokens decode to it), checked against the LLM's own loss
    (mean over the target tokens) x the target-token count for that option alone; the prediction is the best
    option; a bad image is skipped and counted."""
    import torch

    from vpgtrans import load_model
    from vpgtrans.collate import Collator
    from vpgtrans.data import LoadStats, load_rows
    from vpgtrans.evaluate import answer_log_likelihoods, evaluate_model
    from vpgtrans.prompting import IGNORE_INDEX, target_ids
    from vpgtrans.stages.inherit import inherit

    bundle = inherit(tiny["source"], tiny[target], tmp_path / "bundle")
    model = load_model(bundle, device="cpu")
    rows = list(load_rows(choices)[0])[:6]
    collate = Collator(model.tokenizer, model.template, "multiple-choice", model.num_image_tokens,
                       model.image_processor, model.is_encoder_decoder, mode="train", choice_answer=choice_answer)
    expected = []
    with torch.no_grad():
        for row in rows:
            scores = []
            for option in range(len(row["choices"])):
                one = collate([{**row, "answer": option}])
                loss = model(one["input_ids"], one["pixel_values"], one["attention_mask"], labels=one["labels"]).loss
                labels = one["labels"] if model.is_encoder_decoder else one["labels"][:, 1:]
                scores.append(-float(loss) * int((labels != IGNORE_INDEX).sum()))
                # the tokens scored are the answer text's ("The answer is B" / "The answer is red", + suffix)
                said = "The answer is " + (row["choices"][option] if choice_answer == "text" else "ABCD"[option])
                assert labels[labels != IGNORE_INDEX].tolist() == target_ids(
                    model.tokenizer, model.template, "vqa", said, model.is_encoder_decoder)
            batch = collate([{**row, "answer": option} for option in range(len(row["choices"]))])
            ours = answer_log_likelihoods(model, batch).tolist()
            assert ours == pytest.approx(scores, abs=1e-4)
            expected.append(max(range(len(scores)), key=scores.__getitem__))
    broken = {**next(r for r in rows if r["image"] is not None), "image": str(tmp_path / "missing.png")}
    stats = LoadStats()
    result = evaluate_model(model, [*rows, broken], "multiple-choice", stats=stats, choice_scoring="likelihood",
                            choice_answer=choice_answer)
    assert result["predictions"] == [target_text(e, r["choices"], choice_answer) for e, r in zip(expected, rows)]
    assert stats.skipped_unreadable_image == 1 and result["scores"]["samples"] == len(rows)
    assert result["scores"]["unparseable"] == 0
    assert result["scores"]["accuracy"] == sum(e == r["answer"] for e, r in zip(expected, rows)) / len(rows)


# Options of very different lengths in bytes (one not ASCII), so that the summed and the per-byte picks differ.
LONG_AND_SHORT = [["red", "a big blue circle on the left", "né"], ["the top-left corner", "top", "a small square"],
                  ["big", "blé noir", "square"]]


@pytest.mark.parametrize("target, choice_answer", [("llama", "text"), ("t5", "text"), ("opt", "letter")])
def test_likelihood_scoring_also_picks_by_log_probability_per_byte(choices, tiny, tmp_path, target, choice_answer):
    """lm-evaluation-harness's ``acc_norm`` beside its ``acc``, from the same forward pass, checked against a
    plain forward of each option's sequence alone: ``summed`` is the log-softmax of the target tokens
    summed; ``per_byte`` sums only the tokens after ``The answer is`` (the option's words and the end of the
    answer) and divides by the option's length in UTF-8 bytes. The picks are the argmaxes of the two; on
    these options they differ on some rows (text answers), and never with one-letter answers."""
    import torch

    from vpgtrans import load_model
    from vpgtrans.collate import Collator
    from vpgtrans.data import load_rows
    from vpgtrans.evaluate import evaluate_model
    from vpgtrans.prompting import IGNORE_INDEX
    from vpgtrans.stages.inherit import inherit

    model = load_model(inherit(tiny["source"], tiny[target], tmp_path / "bundle"), device="cpu")
    rows = list(load_rows(choices)[0])[:6]
    if choice_answer == "text":  # (one-letter answers: the split's own options, short enough for OPT's 96 positions)
        rows = [{**row, "choices": LONG_AND_SHORT[i % 3], "answer": i % 3} for i, row in enumerate(rows)]
    collate = Collator(model.tokenizer, model.template, "multiple-choice", model.num_image_tokens,
                       model.image_processor, model.is_encoder_decoder, mode="train", choice_answer=choice_answer)
    stated = model.tokenizer(("" if model.is_encoder_decoder else " ") + "The answer is", add_special_tokens=False)
    stated = stated["input_ids"]
    summed, normalised = [[] for _ in rows], [[] for _ in rows]
    with torch.no_grad():
        for row, total, per in zip(rows, summed, normalised):
            for option, words in enumerate(row["choices"]):
                one = collate([{**row, "answer": option}])
                labels = one["labels"][0]
                logits = model(one["input_ids"], one["pixel_values"], one["attention_mask"], labels=one["labels"])
                logits = logits.logits[0]
                if not model.is_encoder_decoder:  # the logits at t are for the token at t + 1
                    logits, labels = logits[:-1], labels[1:]
                at = (labels != IGNORE_INDEX).nonzero().flatten()
                token_log_probs = torch.log_softmax(logits[at].double(), dim=-1)[torch.arange(len(at)), labels[at]]
                assert labels[at][:len(stated)].tolist() == stated
                said = words if choice_answer == "text" else "ABC"[option]
                total.append(float(token_log_probs.sum()))
                per.append(float(token_log_probs[len(stated):].sum()) / len(said.encode("utf-8")))
    result = evaluate_model(model, rows, "multiple-choice", choice_scoring="likelihood", choice_answer=choice_answer)
    for ours, total, per in zip(result["choice_scores"], summed, normalised):
        assert ours["summed"] == pytest.approx(total, abs=1e-4) and ours["per_byte"] == pytest.approx(per, abs=1e-4)
    best = [max(range(len(scores)), key=scores.__getitem__) for scores in summed]
    best_norm = [max(range(len(scores)), key=scores.__getitem__) for scores in normalised]
    assert result["predictions"] == [target_text(b, r["choices"], choice_answer) for b, r in zip(best, rows)]
    assert result["predictions_norm"] == [target_text(b, r["choices"], choice_answer) for b, r in zip(best_norm, rows)]
    if choice_answer == "text":
        assert best != best_norm  # the case acc_norm is for
    else:  # one byte per option, the same "The answer is" in each: the same pick
        assert best == best_norm
    scores = result["scores"]
    assert scores["accuracy"] == sum(b == r["answer"] for b, r in zip(best, rows)) / len(rows)
    assert scores["accuracy_norm"] == sum(b == r["answer"] for b, r in zip(best_norm, rows)) / len(rows)
    with_image = [r["image"] is not None for r in rows]
    assert scores["accuracy_norm_image"] == sum(b == r["answer"] for b, r, i in zip(best_norm, rows, with_image) if i) \
        / sum(with_image)


def test_eval_choice_scoring_on_the_cli(choices, inherited, tmp_path):
    """``eval --choice-scoring likelihood --json``: both accuracies in the report (the length-normalised one by
    question kind too), recomputed from the ``--out`` samples, whose picks are the argmaxes of their options'
    scores."""
    runner = CliRunner()
    out = tmp_path / "scores.json"
    result = runner.invoke(app, ["eval", str(inherited), "--data", str(choices), "--max-samples", "8", "--json",
                                 "--choice-scoring", "likelihood", "--choice-answer", "text", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    scores = report["scores"]
    assert report["choice_scoring"] == "likelihood" and scores["unparseable"] == 0
    assert scores["samples"] == 8 and 0 < scores["samples_image"] < 8
    samples = json.loads(out.read_text())["samples"]
    for key, pick, kind in (("accuracy", "prediction", None), ("accuracy_norm", "prediction_norm", None),
                            ("accuracy_norm_image", "prediction_norm", True),
                            ("accuracy_norm_text", "prediction_norm", False)):
        chosen = [s for s in samples if kind is None or s["references"]["image"] == kind]
        right = [parse_text_answer(s[pick], s["references"]["choices"]) == s["references"]["answer"] for s in chosen]
        assert scores[key] == sum(right) / len(chosen), key
    for sample in samples:
        for pick, by in (("prediction", "summed"), ("prediction_norm", "per_byte")):
            numbers = sample["choice_scores"][by]
            assert parse_text_answer(sample[pick], sample["references"]["choices"]) == numbers.index(max(numbers))
    result = runner.invoke(app, ["eval", str(inherited), "--data", str(choices), "--choice-scoring", "vote"])
    assert result.exit_code == 2 and "--choice-scoring must be one of generate, likelihood" in result.output


def test_choice_answer_from_the_cli_and_a_config_file_reaches_training_and_eval(choices, inherited, tmp_path,
                                                                               monkeypatch):
    """``--choice-answer text`` (flag or ``--config`` key) is the stage's config, recorded in the bundle and used by
    its eval points; ``eval`` reads the bundle's format unless told otherwise, and an untrained bundle's default
    is letter."""
    import yaml

    from vpgtrans.bundle import read_manifest
    from vpgtrans.stages import train as stages

    asked = []

    def evaluate_model(*args, **kwargs):
        asked.append((kwargs["choice_answer"], kwargs["choice_scoring"]))
        return original(*args, **kwargs)

    original = stages.evaluate_model
    monkeypatch.setattr(stages, "evaluate_model", evaluate_model)
    runner = CliRunner()
    train = ["warmup-projector", str(inherited), "--data", str(choices), "--max-steps", "1", "--batch-size", "4"]
    result = runner.invoke(app, [*train, "--out", str(tmp_path / "flag"), "--choice-answer", "text",
                                 "--eval-data", str(choices)])
    assert result.exit_code == 0, result.output
    assert asked == [("text", "generate")]  # the stage's (final) eval point read text answers
    monkeypatch.undo()
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"choice_answer": "text"}))
    result = runner.invoke(app, [*train, "--out", str(tmp_path / "file"), "--config", str(config)])
    assert result.exit_code == 0, result.output
    flag, file = (read_manifest(tmp_path / name)["config"]["train"] for name in ("flag", "file"))
    assert flag == file and flag["choice_answer"] == "text" and flag["choice_scoring"] == "generate"

    def evaluate(bundle, *options):
        result = runner.invoke(app, ["eval", str(bundle), "--data", str(choices), "--max-samples", "4",
                                     "--max-new-tokens", "3", "--json", *options])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert {"accuracy", "accuracy_image", "accuracy_text", "unparseable"} <= set(report["scores"])
        assert ("accuracy_norm" in report["scores"]) == ("likelihood" in options)  # generation has one pick
        return report["choice_answer"], report["choice_answer_from"]

    assert evaluate(tmp_path / "flag") == ("text", "bundle")
    assert evaluate(tmp_path / "flag", "--choice-answer", "letter") == ("letter", "option")
    assert evaluate(inherited) == ("letter", "default")
    assert evaluate(inherited, "--choice-answer", "text", "--choice-scoring", "likelihood") == ("text", "option")
    result = runner.invoke(app, ["eval", str(inherited), "--data", str(choices), "--choice-answer", "word"])
    assert result.exit_code == 2 and "--choice-answer must be one of letter, text" in result.output


def test_transfer_flag_and_stage_set_give_each_stage_its_answer_format():
    from vpgtrans.cli import _stage_configs, _stage_set, _train_config

    assert _train_config("finetune", None, 1, None, None, 4, 1, 0, None, 64, "lavin",
                         choice_answer="text").choice_answer == "text"
    configs = _stage_configs("infmllm", (), choice_answer="text")
    assert {c.choice_answer for c in configs.values()} == {"text"}
    assert _stage_set(configs, ["instruct.choice_answer=letter"], {})["instruct"].choice_answer == "letter"
    with pytest.raises(VpgtransError, match="choice_answer must be one of letter, text"):
        _stage_set(configs, ["instruct.choice_answer=words"], {})


@pytest.mark.parametrize("config, expected", [
    ({"task": "caption", "train": {"choice_answer": "letter"},  # a later caption stage: its default says nothing
      "parent_config": {"task": "multiple-choice", "train": {"choice_answer": "text"}, "parent_config": {}}}, "text"),
    ({"task": "multiple-choice", "train": {"lr": 1e-3}}, "letter"),  # trained before the option existed
    ({"inherit": {"connector": "lavin"}}, None),  # never trained on multiple choice
])
def test_the_trained_answer_format_is_the_latest_multiple_choice_stages(config, expected, monkeypatch, tmp_path):
    import vpgtrans.bundle
    from vpgtrans.evaluate import trained_choice_answer

    monkeypatch.setattr(vpgtrans.bundle, "read_manifest", lambda path: {"config": config})
    assert trained_choice_answer(tmp_path) == expected
    monkeypatch.setattr(vpgtrans.bundle, "read_manifest",
                        lambda path: {"config": {"task": "multiple-choice", "train": {"choice_answer": "words"}}})
    with pytest.raises(VpgtransError, match="'words', not one of letter, text; pass --choice-answer"):
        trained_choice_answer(tmp_path)
