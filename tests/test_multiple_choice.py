"""Multiple-choice data (rows with and without an image), answer parsing, scores, and ``eval --task
multiple-choice``."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from vpgtrans.cli import app
from vpgtrans.demo.choices import make_choice_split, strip_images
from vpgtrans.multiple_choice import format_question, multiple_choice_scores, parse_answer, target_text


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
    assert target_text(1) == "The answer is B"


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
                                    "image": False}
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


@pytest.mark.parametrize("target", ["llama", "t5"])
def test_likelihood_scoring_ranks_options_by_the_models_own_loss(choices, tiny, tmp_path, target):
    """``--choice-scoring likelihood``: each option's score is the summed log-probability of its answer
    text, checked against the LLM's own loss (mean over the target tokens) x the target-token count for
    that option alone; the prediction is the best option; a bad image is skipped and counted."""
    import torch

    from vpgtrans import load_model
    from vpgtrans.collate import Collator
    from vpgtrans.data import LoadStats, load_rows
    from vpgtrans.evaluate import answer_log_likelihoods, evaluate_model
    from vpgtrans.prompting import IGNORE_INDEX
    from vpgtrans.stages.inherit import inherit

    bundle = inherit(tiny["source"], tiny[target], tmp_path / "bundle")
    model = load_model(bundle, device="cpu")
    rows = list(load_rows(choices)[0])[:6]
    collate = Collator(model.tokenizer, model.template, "multiple-choice", model.num_image_tokens,
                       model.image_processor, model.is_encoder_decoder, mode="train")
    expected = []
    with torch.no_grad():
        for row in rows:
            scores = []
            for option in range(len(row["choices"])):
                one = collate([{**row, "answer": option}])
                loss = model(one["input_ids"], one["pixel_values"], one["attention_mask"], labels=one["labels"]).loss
                labels = one["labels"] if model.is_encoder_decoder else one["labels"][:, 1:]
                scores.append(-float(loss) * int((labels != IGNORE_INDEX).sum()))
            batch = collate([{**row, "answer": option} for option in range(len(row["choices"]))])
            ours = answer_log_likelihoods(model, batch).tolist()
            assert ours == pytest.approx(scores, abs=1e-4)
            expected.append(max(range(len(scores)), key=scores.__getitem__))
    broken = {**next(r for r in rows if r["image"] is not None), "image": str(tmp_path / "missing.png")}
    stats = LoadStats()
    result = evaluate_model(model, [*rows, broken], "multiple-choice", stats=stats, choice_scoring="likelihood")
    assert [parse_answer(p, 4) for p in result["predictions"]] == expected
    assert stats.skipped_unreadable_image == 1 and result["scores"]["samples"] == len(rows)
    assert result["scores"]["unparseable"] == 0
    assert result["scores"]["accuracy"] == sum(e == r["answer"] for e, r in zip(expected, rows)) / len(rows)


def test_eval_choice_scoring_on_the_cli(choices, inherited):
    runner = CliRunner()
    result = runner.invoke(app, ["eval", str(inherited), "--data", str(choices), "--max-samples", "4",
                                 "--choice-scoring", "likelihood", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["choice_scoring"] == "likelihood" and report["scores"]["unparseable"] == 0
    assert report["scores"]["samples"] == 4
    result = runner.invoke(app, ["eval", str(inherited), "--data", str(choices), "--choice-scoring", "vote"])
    assert result.exit_code == 2 and "--choice-scoring must be one of generate, likelihood" in result.output
