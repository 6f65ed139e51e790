"""VQAv2 answer types and the test-server submission file (``eval --task vqa --submission FILE``)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from test_cli import _user_error  # exit 2, one "error: ..." line, no traceback
from vpgtrans.cli import app
from vpgtrans.data import load_rows
from vpgtrans.metrics import vqa_scores


def _ten(hits: int, answer: str, other: str) -> list[str]:
    """Ten annotators: ``hits`` gave ``answer``, the rest ``other``."""
    return [answer] * hits + [other] * (10 - hits)


def test_scores_by_answer_type_against_a_hand_computation():
    # VQAv2 accuracy with k of 10 annotators agreeing: mean over the 10 leave-one-out subsets of
    # min(1, matches / 3): k=0 -> 0; k=1 -> 9 * (1/3) / 10 = 0.3; k=2 -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6;
    # k=3 -> (3 * 2/3 + 7 * 1) / 10 = 0.9; k>=4 -> 1.
    predictions = ["Yes", "no", "2", "two", "red", "blue", "cat"]
    answers = [_ten(10, "yes", "no"), _ten(2, "no", "yes"),  # yes/no: 1.0 (exact), 0.6
               _ten(3, "2", "3"), _ten(1, "2", "3"),  # number: 0.9, 0.3 ("two" is "2" once normalised)
               _ten(0, "red", "green"), _ten(6, "blue", "red"),  # other: 0.0, 1.0 (exact)
               _ten(10, "cat", "dog")]  # no type: 1.0 (exact), in the overall score only
    types = ["yes/no", "yes/no", "number", "number", "other", "other", None]
    scores = vqa_scores(predictions, answers, types)
    assert scores["vqa_accuracy"] == pytest.approx((1.0 + 0.6 + 0.9 + 0.3 + 0.0 + 1.0 + 1.0) / 7)
    assert scores["exact_match"] == pytest.approx(3 / 7) and scores["n"] == 7
    assert scores["by_answer_type"] == {
        "yes/no": {"vqa_accuracy": pytest.approx(0.8), "exact_match": 0.5, "n": 2},
        "number": {"vqa_accuracy": pytest.approx(0.6), "exact_match": 0.0, "n": 2},
        "other": {"vqa_accuracy": pytest.approx(0.5), "exact_match": 0.5, "n": 2}}
    assert "by_answer_type" not in vqa_scores(predictions, answers)  # no types: the scores as before
    assert "by_answer_type" not in vqa_scores(predictions, answers, [None] * 7)


def _vqa_rows(tiny) -> list[dict]:
    return [json.loads(line) for line in (tiny["vqa"] / "data.jsonl").read_text().splitlines()]


def _write(root, rows, images_from):
    """A VQA data directory with ``rows`` whose images are copied from ``images_from``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for row in rows:
        source = images_from / row["image"]
        if source.exists():
            (root / row["image"]).write_bytes(source.read_bytes())
    (root / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def _eval(*args):
    return CliRunner().invoke(app, ["eval", *[str(a) for a in args]])


TYPES = ["yes/no", "number", "other"]


@pytest.fixture(scope="module")
def vqa_types(inherited, tiny, tmp_path_factory):
    """12 VQA rows with VQAv2 ids and types (one with an unreadable image), and the tiny model's predictions."""
    root = tmp_path_factory.mktemp("vqa-types")
    rows = [{**row, "question_id": 1000 + i, "answer_type": TYPES[i % 3]} for i, row in enumerate(_vqa_rows(tiny)[:12])]
    data = _write(root / "data", rows, tiny["vqa"])
    (data / rows[4]["image"]).write_bytes(b"not an image")  # row 4 cannot be answered
    out = root / "first.json"
    result = _eval(inherited, "--data", data, "--max-new-tokens", "3", "--out", out, "--batch-size", "5")
    assert result.exit_code == 0, result.output
    predictions = {s["question_id"]: s["prediction"] for s in json.loads(out.read_text())["samples"]}
    assert sorted(predictions) == [1000 + i for i in range(12) if i != 4]
    return {"rows": rows, "predictions": predictions, "root": root}


def test_eval_scores_each_answer_type_and_writes_the_submission(inherited, tiny, vqa_types, tmp_path):
    """Answers built from the model's own predictions make the scores known in advance: every yes/no
    question has 10 of 10 annotators agreeing with the model (1.0), every number question 2 of 10 (0.6),
    every other question none (0.0)."""
    predictions = vqa_types["predictions"]
    assert all(p.strip() for p in predictions.values()), predictions  # (an empty answer would be dropped)
    rows = []
    for row in vqa_types["rows"]:
        guess = predictions.get(row["question_id"], "unanswered")
        hits = {"yes/no": 10, "number": 2, "other": 0}[row["answer_type"]]
        rows.append({**row, "answers": _ten(hits, guess, "zzz-never-said")})
    data = _write(tmp_path / "data", rows, vqa_types["root"] / "data")
    out, submission = tmp_path / "eval.json", tmp_path / "answers.json"
    result = _eval(inherited, "--data", data, "--task", "vqa", "--max-new-tokens", "3", "--batch-size", "5",
                   "--out", out, "--submission", submission, "--num-workers", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    by_type = report["scores"]["by_answer_type"]
    answered = {kind: sum(1 for r in rows if r["answer_type"] == kind and r["question_id"] in predictions)
                for kind in TYPES}
    assert answered == {"yes/no": 4, "number": 3, "other": 4}  # row 4 (a number question) was unreadable
    assert by_type == {"yes/no": {"vqa_accuracy": pytest.approx(1.0), "exact_match": 1.0, "n": 4},
                       "number": {"vqa_accuracy": pytest.approx(0.6), "exact_match": 0.0, "n": 3},
                       "other": {"vqa_accuracy": 0.0, "exact_match": 0.0, "n": 4}}
    assert report["scores"]["vqa_accuracy"] == pytest.approx((4 * 1.0 + 3 * 0.6) / 11)
    assert report["data_stats"]["skipped_unreadable_image"] == 1
    # The submission: VQAv2's result format, one entry per answered question, the answer as generated.
    entries = json.loads(submission.read_text())
    assert entries == [{"question_id": qid, "answer": answer} for qid, answer in predictions.items()]
    assert all(type(e["question_id"]) is int and set(e) == {"question_id", "answer"} for e in entries)
    assert report["submission"] == {"file": str(submission.resolve()), "answers": 11}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.json", "data", "eval.json"]  # no temp files
    samples = json.loads(out.read_text())["samples"]
    assert [(s["question_id"], s["answer_type"]) for s in samples] == [
        (r["question_id"], r["answer_type"]) for r in rows if r["question_id"] in predictions]
    plain = _eval(inherited, "--data", data, "--max-new-tokens", "3")  # the text report: one line per type
    assert plain.exit_code == 0, plain.output
    assert "  yes/no: vqa_accuracy 1.0000, exact_match 1.0000, n 4" in plain.stdout.splitlines()


def test_submission_needs_a_question_id_on_every_row(inherited, tiny, tmp_path):
    rows = [{**row, "question_id": i} for i, row in enumerate(_vqa_rows(tiny)[:6])]
    del rows[3]["question_id"]
    submission = tmp_path / "answers.json"
    _user_error(_eval(inherited, "--data", _write(tmp_path / "missing", rows, tiny["vqa"]), "--submission",
                      submission), "1 of 6 rows have no 'question_id'", "row 3")
    rows[3]["question_id"] = 1
    _user_error(_eval(inherited, "--data", _write(tmp_path / "twice", rows, tiny["vqa"]), "--submission", submission),
                "question_id 1 is on more than one row")
    _user_error(_eval(inherited, "--data", tiny["caption"], "--submission", submission),
                "--submission writes VQAv2 answers; this data holds caption rows")
    same = tmp_path / "same.json"
    _user_error(_eval(inherited, "--data", tiny["vqa"], "--out", same, "--submission", same), "must be two files")
    assert not submission.exists() and not same.exists()
    submission.write_text("[]")  # an existing file is replaced only with --force
    _user_error(_eval(inherited, "--data", tiny["vqa"], "--submission", submission), "exists")
    assert submission.read_text() == "[]"


def test_vqa_ids_and_types_are_kept_and_checked_at_load(tiny, tmp_path):
    rows = _vqa_rows(tiny)[:4]
    rows[0].update(question_id=7, answer_type="number")
    rows[1].update(question_id="7")  # an id must be an integer, as in VQAv2's files
    rows[2].update(answer_type=3)
    dataset, task, stats = load_rows(_write(tmp_path / "jsonl", rows, tiny["vqa"]))
    assert task == "vqa" and stats.skipped_bad_row == 2
    assert [(r["question_id"], r["answer_type"]) for r in dataset] == [(7, "number"), (None, None)]
    assert any("'question_id' must be an integer (got str)" in p for p in stats.problems)

    import datasets  # a datasets directory keeps the columns too

    kept = [dict(r, image=str(tiny["vqa"] / r["image"])) for r in (rows[0], rows[3])]
    kept[1].update(question_id=8, answer_type="yes/no")
    datasets.Dataset.from_list(kept).save_to_disk(str(tmp_path / "hf"))
    dataset, task, _ = load_rows(tmp_path / "hf")
    assert [(r["question_id"], r["answer_type"]) for r in dataset] == [(7, "number"), (8, "yes/no")]
