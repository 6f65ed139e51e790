"""Grounding: box text parsed back, IoU against hand-computed values, accuracy at IoU >= 0.5, the
loader's grounding rows, and ``vpgtrans eval --task grounding`` end to end."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from vpgtrans.cli import app
from vpgtrans.config import PromptTemplate
from vpgtrans.data import load_rows
from vpgtrans.images import build_image_processor
from vpgtrans.collate import Collator
from vpgtrans.errors import VpgtransError
from vpgtrans.grounding import box_iou, format_box, grounding_accuracy, parse_box
from vpgtrans.model.vlm import IMAGE_TOKEN_ID
from vpgtrans.prompting import IGNORE_INDEX


@pytest.mark.parametrize("text, box", [
    ("0.1,0.2,0.5,0.9", (0.1, 0.2, 0.5, 0.9)),
    (" [0.1, 0.2, 0.5, 0.9] ", (0.1, 0.2, 0.5, 0.9)),
    ("(0.1 0.2 0.5 0.9).", (0.1, 0.2, 0.5, 0.9)),
    ("{0,0,1,1}", (0.0, 0.0, 1.0, 1.0)),
    ("<.25,.25,.75,1.>", (0.25, 0.25, 0.75, 1.0)),
    ("1e-1,2E-1,0.5,0.9", (0.1, 0.2, 0.5, 0.9)),
    ("0.1,0.2,0.5,0.9\nanything after the stop", (0.1, 0.2, 0.5, 0.9)),
    ("0.3,0.3,0.3,0.6", (0.3, 0.3, 0.3, 0.6)),  # zero width: a (poor) box, IoU 0
])
def test_parse_box_accepts(text, box):
    assert parse_box(text, stop="\n") == box


@pytest.mark.parametrize("text", [
    "", "box", "0.1,0.2,0.5", "0.1,0.2,0.5,0.9,0.3", "0.5,0.2,0.1,0.9", "0.1,0.9,0.5,0.2", "1.5,0,1,1",
    "-0.1,0,1,1", "nan,0,1,1", "0.1,0.2,inf,0.9", "1e999,0,1,1", "the box is 0.1,0.2,0.5,0.9", "0.1;0.2;0.5;0.9",
    "[0.1,,0.2,0.5,0.9]", "0.1,0.2,0.5,0.9 " * 20, None, 3.5, ["0.1", "0.2", "0.5", "0.9"],
])
def test_parse_box_rejects(text):
    assert parse_box(text) is None


def test_format_box_round_trips():
    assert format_box((0.1, 0.25, 0.5, 1)) == "0.100,0.250,0.500,1.000"
    assert parse_box(format_box((0.1234, 0.5, 0.6789, 0.9))) == (0.123, 0.5, 0.679, 0.9)


@pytest.mark.parametrize("a, b, iou", [
    ((0, 0, 0.5, 0.5), (0, 0, 0.5, 0.5), 1.0),
    ((0, 0, 0.5, 0.5), (0.25, 0.25, 0.75, 0.75), 0.0625 / (0.25 + 0.25 - 0.0625)),  # = 1/7
    ((0, 0, 1, 1), (0.25, 0.25, 0.75, 0.75), 0.25),  # one inside the other: area ratio
    ((0, 0, 0.5, 1), (0.5, 0, 1, 1), 0.0),  # touching edges
    ((0, 0, 0.2, 0.2), (0.5, 0.5, 1, 1), 0.0),  # apart
    ((0.1, 0.1, 0.5, 0.3), (0.3, 0.2, 0.7, 0.6), 0.02 / (0.08 + 0.16 - 0.02)),  # overlap 0.2 x 0.1
    ((0.3, 0.3, 0.3, 0.6), (0.3, 0.3, 0.3, 0.6), 0.0),  # zero area: no union
])
def test_box_iou_hand_computed(a, b, iou):
    assert box_iou(a, b) == pytest.approx(iou, abs=1e-12)
    assert box_iou(b, a) == pytest.approx(iou, abs=1e-12)


def test_grounding_accuracy():
    boxes = [[0, 0, 0.5, 0.5], [0, 0, 1, 1], [0.1, 0.1, 0.5, 0.3], [0, 0, 0.5, 0.5]]
    predictions = ["0,0,0.5,0.5",            # IoU 1
                   "[0.25,0.25,0.75,0.75]",  # IoU 0.25: a miss
                   "0.3,0.2,0.7,0.6",        # IoU 1/11
                   "not a box"]              # unparsed: IoU 0
    scores = grounding_accuracy(predictions, boxes)
    assert scores == pytest.approx({"acc_iou50": 0.25, "mean_iou": (1 + 0.25 + 1 / 11) / 4, "parsed": 0.75,
                                    "unparseable": 1, "n": 4})
    assert grounding_accuracy(predictions, boxes, threshold=0.25)["acc_iou50"] == 0.5
    # exactly at the threshold counts (IoU >= 0.5)
    assert grounding_accuracy(["0,0,0.5,1"], [[0, 0, 1, 1]])["acc_iou50"] == 1.0


@pytest.mark.parametrize("predictions, boxes, fragment", [
    ([], [], "empty"),
    (["0,0,1,1"], [], "1 predictions but 0 boxes"),
    (["0,0,1,1"], [[0, 0, 2, 1]], "reference box(es) 0 are not valid"),
    (["0,0,1,1"], [[0.5, 0, 0.5, 1]], "x1 < x2"),
])
def test_grounding_accuracy_refuses(predictions, boxes, fragment):
    with pytest.raises(VpgtransError) as err:
        grounding_accuracy(predictions, boxes)
    assert fragment in str(err.value)


def _grounding_data(root, rows):
    root.mkdir()
    for i in range(3):
        image = Image.new("RGB", (32, 32), (0, 0, 0))
        image.paste((220, 30, 30), (4 * i, 4, 4 * i + 12, 20))
        image.save(root / f"{i}.png")
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


GOOD = [{"image": f"{i}.png", "question": "the red square", "box": [0.125 * i, 0.125, 0.125 * i + 0.375, 0.625]}
        for i in range(3)]


def test_loader_checks_boxes(tmp_path):
    root = _grounding_data(tmp_path / "g", GOOD + [
        {"image": "0.png", "question": "x", "box": [0.5, 0.1, 0.2, 0.9]},
        {"image": "0.png", "question": "x", "box": [0.1, 0.1, 1.2, 0.9]},
        {"image": "0.png", "question": "x", "box": [0.1, 0.1, 0.2]},
        {"image": "0.png", "question": "x", "box": ["0.1", 0.1, 0.2, 0.3]},
        {"image": "0.png", "question": "x", "box": [0, 0, 1, 1], "caption": "ignored"},
        {"image": "0.png", "question": "", "box": [0, 0, 1, 1]},
    ])
    dataset, task, stats = load_rows(root)
    assert task == "grounding" and len(dataset) == 4
    assert dataset[3]["box"] == [0.0, 0.0, 1.0, 1.0]
    assert set(dataset.column_names) == {"image", "question", "box", "objects"} and dataset[3]["objects"] == []
    assert (stats.skipped_bad_row, stats.skipped_empty_text) == (4, 1)
    problems = " | ".join(stats.problems)
    assert "x1 < x2" in problems and "normalised to [0, 1]" in problems and "four numbers" in problems


def test_collator_prompts_through_the_grounding_template(tiny, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny["opt"])  # byte-level: spells digits
    dataset, _, stats = load_rows(_grounding_data(tmp_path / "g", GOOD))
    rows = list(dataset)
    template = PromptTemplate()
    make = lambda mode: Collator(tokenizer, template, "grounding", 4, build_image_processor(32), False, mode=mode,
                                 stats=stats)
    batch = make("generate")(rows)
    assert batch["references"] == [row["box"] for row in rows]
    text = tokenizer.decode([i for i in batch["input_ids"][0].tolist() if i not in (IMAGE_TOKEN_ID, tokenizer.pad_token_id)],
                            skip_special_tokens=True)
    assert text.endswith("Where is the red square? Box:")
    train = make("train")(rows[:1])
    target = [t for t, label in zip(train["input_ids"][0].tolist(), train["labels"][0].tolist()) if label != IGNORE_INDEX]
    assert tokenizer.decode(target).strip() == "0.000,0.125,0.375,0.625"


def test_eval_task_grounding_on_the_cli(inherited, tmp_path):
    data = _grounding_data(tmp_path / "g", GOOD)
    out = tmp_path / "scores.json"
    result = CliRunner().invoke(app, ["eval", str(inherited), "--data", str(data), "--task", "grounding",
                                      "--max-new-tokens", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["task"] == "grounding"
    assert set(report["scores"]) == {"acc_iou50", "mean_iou", "parsed", "unparseable", "n"}
    assert report["scores"]["n"] == 3
    predictions = [s["prediction"] for s in report["samples"]]
    assert report["scores"] == grounding_accuracy(predictions, [s["references"] for s in report["samples"]])
    assert result.stdout.startswith("grounding: acc_iou50 ")
    assert "baseline centre_box: acc_iou50 " in result.stdout
    # Three rows of three images, one known object each: no largest-object baseline to score.
    assert report["baselines"]["largest_object"] == {"acc_iou50": None, "mean_iou": None, "n": 0}
    assert report["baselines"]["centre_box"]["n"] == 3


def _refexp_data(root, rows, size=(64, 48)):
    """RefCOCO-style rows (pixel boxes) over two 64x48 images."""
    root.mkdir()
    for i in range(2):
        Image.new("RGB", size, (0, 0, 0)).save(root / f"{i}.png")
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


REFEXP = [{"image": "0.png", "expression": "the left square", "bbox": [8, 12, 24, 36]},
          {"image": "0.png", "expression": "the big one", "bbox": [32, 0, 64, 48]},
          {"image": "1.png", "expression": "the tiny dot", "bbox": [60, 44, 70, 50]}]  # overhangs: clamped


def test_refcoco_rows_in_pixels_become_normalised_grounding_rows(tmp_path):
    from vpgtrans.data import DataDir

    root = _refexp_data(tmp_path / "r", REFEXP + [
        {"image": "0.png", "expression": "inverted", "bbox": [24, 12, 8, 36]},
        {"image": "0.png", "expression": "outside", "bbox": [70, 50, 80, 60]},
        {"image": "0.png", "expression": "words", "bbox": ["8", 12, 24, 36]},
        {"image": "9.png", "expression": "no image", "bbox": [0, 0, 4, 4]},
        {"image": "0.png", "expression": ["two", "sentences"], "bbox": [0, 0, 4, 4]},
    ])
    dataset, task, stats = load_rows(root)
    assert task == "grounding" and len(dataset) == 3
    assert dataset[0]["question"] == "the left square"
    assert dataset[0]["box"] == pytest.approx([8 / 64, 12 / 48, 24 / 64, 36 / 48])
    assert dataset[1]["box"] == pytest.approx([0.5, 0.0, 1.0, 1.0])
    assert dataset[2]["box"] == pytest.approx([60 / 64, 44 / 48, 1.0, 1.0])
    assert (stats.skipped_bad_row, stats.skipped_missing_image, stats.lines) == (4, 1, 8)
    problems = " | ".join(stats.problems)
    assert "needs x1 < x2" in problems and "outside the 64x48 image" in problems and "one expression per row" in problems

    # RefCOCO's own [x, y, w, h]
    xywh = _refexp_data(tmp_path / "w", [{"image": "0.png", "expression": "a", "bbox": [8, 12, 16, 24],
                                          "objects": [[32, 0, 32, 48]]},
                                         {"image": "1.png", "expression": "b", "bbox": [8, 12, 0, 24]}])
    dataset, _, stats = load_rows(DataDir(xywh, bbox_format="xywh"))
    assert len(dataset) == 1 and dataset[0]["box"] == pytest.approx([8 / 64, 12 / 48, 24 / 64, 36 / 48])
    assert dataset[0]["objects"] == [pytest.approx([0.5, 0.0, 1.0, 1.0])]
    assert "needs w > 0 and h > 0" in stats.problems[0]
    with pytest.raises(VpgtransError, match="--bbox-format must be one of xyxy, xywh"):
        load_rows(DataDir(xywh, bbox_format="yxyx"))


def test_baselines_by_hand():
    from vpgtrans.grounding import grounding_baselines

    rows = [{"image": "a", "box": [0.0, 0.0, 0.5, 0.5], "objects": []},
            {"image": "a", "box": [0.5, 0.0, 1.0, 1.0], "objects": []},  # the largest of image a
            {"image": "b", "box": [0.25, 0.25, 0.75, 0.75], "objects": [[0.0, 0.0, 0.1, 0.1]]},
            {"image": "c", "box": [0.0, 0.0, 0.2, 0.2], "objects": []}]  # one known object: not scored
    baselines = grounding_baselines(rows)
    # centre box (0.25, 0.25, 0.75, 0.75): IoU 1/7 with a's first box, 0.125/0.625 with the second, 1 with b's,
    # 0 with c's.
    assert baselines["centre_box"] == pytest.approx({"acc_iou50": 0.25, "mean_iou": (1 / 7 + 0.2 + 1) / 4, "n": 4})
    # largest object: a -> the second box (IoU 0 with the first row's box, which it only touches; a hit for the
    # second row), b -> its own box.
    assert baselines["largest_object"] == pytest.approx({"acc_iou50": 2 / 3, "mean_iou": 2 / 3, "n": 3})


def test_train_and_eval_on_refcoco_rows_on_the_cli(inherited, tmp_path):
    data = _refexp_data(tmp_path / "r", [{**row, "bbox": [row["bbox"][0], row["bbox"][1], row["bbox"][2] - row["bbox"][0],
                                                           row["bbox"][3] - row["bbox"][1]]} for row in REFEXP[:2]])
    runner = CliRunner()
    out = tmp_path / "warm"
    result = runner.invoke(app, ["warmup-projector", str(inherited), "--data", str(data), "--out", str(out),
                                 "--bbox-format", "xywh", "--max-steps", "2", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["task"] == "grounding" and manifest["data"]["rows"] == 2
    # xyxy (the default) reads the second row's [32, 0, 32, 48] as a zero-width box: skipped and counted
    result = runner.invoke(app, ["eval", str(out), "--data", str(data), "--task", "grounding", "--json",
                                 "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["data_stats"]["skipped_bad_row"] == 1
    result = runner.invoke(app, ["eval", str(out), "--data", str(data), "--task", "grounding", "--json",
                                 "--bbox-format", "xywh", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert 0.0 <= report["scores"]["acc_iou50"] <= 1.0 and report["scores"]["n"] == 2
    assert report["scores"]["unparseable"] == round((1 - report["scores"]["parsed"]) * 2)
    assert report["baselines"]["largest_object"]["n"] == 2  # both rows are of image 0
