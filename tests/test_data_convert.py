"""``vpgtrans data convert`` (issue 14) on tiny files in the official layouts — COCO captions
(``captions_train2014.json``: info / images / annotations), Karpathy's ``dataset_coco.json`` (images with
split, filepath, sentences), VQAv2 (``v2_OpenEnded_mscoco_*_questions.json`` + ``v2_mscoco_*_annotations.json``),
RefCOCO (``refs(unc).p``, a pickle, + ``instances.json``) — then read back by vpgtrans' loader, trained on and
evaluated: converted output -> rows -> a training step / an eval."""

from __future__ import annotations

import json
import os
import pickle

import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import assert_one_line_error
from vpgtrans.cli import app
from vpgtrans.data import load_rows
from vpgtrans.errors import VpgtransError

SIZES = {1: (64, 48), 2: (40, 40), 3: (32, 64)}  # image_id -> (width, height)


def _coco_images(root, subtype="train2014"):
    """COCO's image folder layout: ROOT/train2014/COCO_train2014_000000000001.jpg ..."""
    (root / subtype).mkdir(parents=True, exist_ok=True)
    for image_id, size in SIZES.items():
        Image.new("RGB", size, (40 * image_id, 90, 160)).save(root / subtype / f"COCO_{subtype}_{image_id:012d}.jpg")
    return root


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def _rows(out):
    return [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]


# --- COCO captions ------------------------------------------------------------------------------------

CAPTIONS = {1: ["A red bus on a street.", "a bus parked "], 2: ["Two dogs play."], 3: ["A tall tower.", "tower",
                                                                                       "a tower at night"]}


def _official_captions(root):
    """captions_train2014.json as cocodataset.org ships it (images with coco_url, annotations with captions)."""
    images = [{"license": 1, "file_name": f"COCO_train2014_{i:012d}.jpg", "height": h, "width": w, "id": i,
               "coco_url": f"http://images.cocodataset.org/train2014/COCO_train2014_{i:012d}.jpg",
               "date_captured": "2013-11-14 16:28:13", "flickr_url": "http://farm.example/x.jpg"}
              for i, (w, h) in SIZES.items()]
    annotations = [{"image_id": i, "id": 100 * i + k, "caption": caption}
                   for i, captions in CAPTIONS.items() for k, caption in enumerate(captions)]
    path = root / "annotations" / "captions_train2014.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"info": {"year": 2014, "version": "1.0"}, "images": images, "licenses": [],
                                "annotations": annotations}))
    return path


def test_coco_captions_official_file(tmp_path):
    coco = _coco_images(tmp_path / "coco")
    src = _official_captions(coco)
    out = tmp_path / "coco_train"
    result = _ok(_cli("data", "convert", "coco-captions", src, "--image-root", coco, "--out", out))
    assert "coco-captions: 6 rows" in result.stdout
    rows = _rows(out)
    assert [(row["image_id"], row["caption"]) for row in rows] == [(i, c.strip()) for i, cs in CAPTIONS.items() for c in cs]
    assert rows[0]["image"] == str(coco / "train2014" / "COCO_train2014_000000000001.jpg")
    dataset, task, stats = load_rows(out)  # every row loads: images found, captions kept
    assert task == "caption" and (stats.lines, stats.rows) == (6, 6)
    info = json.loads((out / "vpgtrans_data.json").read_text())
    assert (info["kind"], info["format"], info["rows"], info["images_missing"]) == ("coco-captions", "coco", 6, 0)

    # per image for evaluation; a root that is the image folder itself resolves the same files
    per_image = tmp_path / "coco_eval"
    _ok(_cli("data", "convert", "coco-captions", src, "--image-root", coco / "train2014", "--out", per_image,
             "--rows", "image"))
    assert [(row["image"], row["caption"]) for row in _rows(per_image)] == \
        [(rows[0]["image"], [c.strip() for c in CAPTIONS[1]]),
         (str(coco / "train2014" / "COCO_train2014_000000000002.jpg"), CAPTIONS[2]),
         (str(coco / "train2014" / "COCO_train2014_000000000003.jpg"), CAPTIONS[3])]

    # --force semantics: refuse an existing --out, replace a converted one, never another directory
    assert_one_line_error(_cli("data", "convert", "coco-captions", src, "--image-root", coco, "--out", out), "already exists")
    _ok(_cli("data", "convert", "coco-captions", src, "--image-root", coco, "--out", out, "--rows", "image", "--force"))
    assert len(_rows(out)) == 3
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert_one_line_error(_cli("data", "convert", "coco-captions", src, "--image-root", coco, "--out", tmp_path / "mine",
                         "--force"), "not a vpgtrans output")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporaries left


def _karpathy(root):
    """dataset_coco.json: images with filepath, filename, split (train / restval / val / test), sentences."""
    splits = {1: "train", 2: "restval", 3: "val"}
    images = [{"filepath": "train2014", "sentids": list(range(len(CAPTIONS[i]))), "filename": f"COCO_train2014_{i:012d}.jpg",
               "imgid": i - 1, "split": splits[i], "cocoid": i,
               "sentences": [{"tokens": c.lower().split(), "raw": c, "imgid": i - 1, "sentid": 10 * i + k}
                             for k, c in enumerate(CAPTIONS[i])]}
              for i in SIZES]
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def test_karpathy_splits_then_train_and_eval(inherited, tmp_path):
    coco = _coco_images(tmp_path / "coco")
    src = _karpathy(tmp_path)
    assert_one_line_error(_cli("data", "convert", "coco-captions", src, "--image-root", coco, "--out", tmp_path / "x"),
                    "holds several splits: restval (1), train (1), val (1); choose with --split")
    assert_one_line_error(_cli("data", "convert", "coco-captions", src, "--image-root", coco, "--out", tmp_path / "x",
                         "--split", "test"), "has no split test")
    train = tmp_path / "karpathy_train"
    _ok(_cli("data", "convert", "coco-captions", src, "--image-root", coco, "--out", train, "--split", "train,restval"))
    assert [(row["image_id"], row["caption"]) for row in _rows(train)] == \
        [(1, "A red bus on a street."), (1, "a bus parked"), (2, "Two dogs play.")]
    val = tmp_path / "karpathy_val"
    _ok(_cli("data", "convert", "coco-captions", src, "--image-root", coco, "--out", val, "--split", "val"))
    assert _rows(val) == [{"image": str(coco / "train2014" / "COCO_train2014_000000000003.jpg"), "caption": CAPTIONS[3],
                           "image_id": 3}]

    warm = tmp_path / "warm"
    _ok(_cli("warmup-projector", inherited, "--data", train, "--out", warm, "--max-steps", "1", "--batch-size", "3"))
    report = json.loads(_ok(_cli("eval", warm, "--data", val, "--json", "--max-new-tokens", "3")).stdout)
    assert report["task"] == "caption" and report["scores"]["n"] == 1 and report["data_stats"]["rows"] == 1


# --- VQAv2 --------------------------------------------------------------------------------------------

ANSWERS = {11: ["red"] * 7 + ["dark red", "maroon", "red"], 12: ["2", "two", "2", "2", "2", "2", "3", "2", "2", "2"]}


def _vqa(root, subtype="val2014"):
    """v2_OpenEnded_mscoco_<subtype>_questions.json and v2_mscoco_<subtype>_annotations.json as visualqa.org
    ships them (data_subtype names the image folder and file names)."""
    root.mkdir(parents=True, exist_ok=True)
    questions = [{"image_id": 1, "question": "What color is the bus?", "question_id": 11},
                 {"image_id": 2, "question": "How many dogs?", "question_id": 12},
                 {"image_id": 3, "question": "Unanswered?", "question_id": 13}]
    annotations = [{"question_type": "what color is the", "multiple_choice_answer": "red", "image_id": 1,
                    "answer_type": "other", "question_id": 11,
                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                for k, a in enumerate(ANSWERS[11])]},
                   {"question_type": "how many", "multiple_choice_answer": "2", "image_id": 2, "answer_type": "number",
                    "question_id": 12, "answers": [{"answer": a, "answer_confidence": "maybe", "answer_id": k + 1}
                                                   for k, a in enumerate(ANSWERS[12])]}]
    common = {"info": {"version": "2.0"}, "license": {"name": "CC BY 4.0"}, "data_type": "mscoco", "data_subtype": subtype}
    src = root / f"v2_OpenEnded_mscoco_{subtype}_questions.json"
    src.write_text(json.dumps({**common, "task_type": "Open-Ended", "questions": questions}))
    (root / f"v2_mscoco_{subtype}_annotations.json").write_text(json.dumps({**common, "annotations": annotations}))
    return src


def test_vqav2_keeps_all_answers_ids_and_types_then_trains_and_evaluates(inherited, tmp_path):
    coco = _coco_images(tmp_path / "coco", "val2014")
    src = _vqa(tmp_path / "vqa")
    out = tmp_path / "vqa_val"
    result = _ok(_cli("data", "convert", "vqav2", src, "--image-root", coco, "--out", out))
    assert "vqav2: 2 rows" in result.stdout
    rows = _rows(out)
    assert [(r["question_id"], r["answer_type"], r["answers"]) for r in rows] == \
        [(11, "other", ANSWERS[11]), (12, "number", ANSWERS[12])]
    assert rows[1]["image"] == str(coco / "val2014" / "COCO_val2014_000000000002.jpg")
    info = json.loads((out / "vpgtrans_data.json").read_text())
    assert (info["questions_without_annotation"], info["data_subtype"]) == (1, "val2014")
    dataset, task, _ = load_rows(out)
    assert task == "vqa" and dataset["answers"] == [ANSWERS[11], ANSWERS[12]]

    warm = tmp_path / "warm"
    _ok(_cli("warmup-projector", inherited, "--data", out, "--out", warm, "--max-steps", "1", "--batch-size", "2"))
    report = json.loads(_ok(_cli("eval", warm, "--data", out, "--json", "--max-new-tokens", "2")).stdout)
    assert report["task"] == "vqa" and report["scores"]["n"] == 2

    (tmp_path / "vqa" / "v2_mscoco_val2014_annotations.json").unlink()
    assert_one_line_error(_cli("data", "convert", "vqav2", src, "--image-root", coco, "--out", tmp_path / "y"),
                    "v2_mscoco_val2014_annotations.json: not found", "--annotations")
    assert not (tmp_path / "y").exists()


# --- RefCOCO ------------------------------------------------------------------------------------------

def _refcoco(root, protocol=2):
    """refs(unc).p (a pickle of a list of ref dicts, as lichengunc/refer ships it) + instances.json."""
    root.mkdir(parents=True, exist_ok=True)
    refs = [{"sent_ids": [0, 1], "file_name": "COCO_train2014_000000000001_5.jpg", "ann_id": 5, "ref_id": 0,
             "image_id": 1, "split": "train", "category_id": 6,
             "sentences": [{"tokens": ["left", "bus"], "raw": "Left bus!", "sent_id": 0, "sent": "left bus"},
                           {"tokens": ["red", "one"], "raw": "red one", "sent_id": 1, "sent": "red one"}]},
            {"sent_ids": [2], "file_name": "COCO_train2014_000000000001_6.jpg", "ann_id": 6, "ref_id": 1,
             "image_id": 1, "split": "testA", "category_id": 1,
             "sentences": [{"tokens": ["man"], "raw": "man", "sent_id": 2, "sent": "man"}]},
            {"sent_ids": [3], "file_name": "COCO_train2014_000000000003_9.jpg", "ann_id": 9, "ref_id": 2,
             "image_id": 3, "split": "testA", "category_id": 1,
             "sentences": [{"tokens": ["top"], "raw": "Top", "sent_id": 3, "sent": "top"}]}]
    with open(root / "refs(unc).p", "wb") as fh:
        pickle.dump(refs, fh, protocol=protocol)
    images = [{"file_name": f"COCO_train2014_{i:012d}.jpg", "height": h, "width": w, "id": i}
              for i, (w, h) in SIZES.items()]
    annotations = [{"segmentation": [[0, 0, 1, 1]], "area": 1, "iscrowd": 0, "image_id": 1, "bbox": [4, 6, 20, 30],
                    "category_id": 6, "id": 5},
                   {"segmentation": [], "area": 1, "iscrowd": 0, "image_id": 1, "bbox": [30.5, 0, 33.5, 48],
                    "category_id": 1, "id": 6},
                   {"segmentation": [], "area": 1, "iscrowd": 0, "image_id": 3, "bbox": [0, 0, 32, 16],
                    "category_id": 1, "id": 9}]
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                     "categories": [{"id": 1, "name": "person"}]}))
    return root / "refs(unc).p"


@pytest.mark.parametrize("protocol", [0, 2])  # 0: what Python 2 wrote, 2: its binary protocol
def test_refcoco_boxes_in_pixels_become_the_loaders_normalised_boxes(tmp_path, protocol):
    coco = _coco_images(tmp_path / "coco")
    src = _refcoco(tmp_path / "refcoco", protocol)
    assert_one_line_error(_cli("data", "convert", "refcoco", src, "--image-root", coco, "--out", tmp_path / "x"),
                    "holds several splits: testA (2), train (1)")
    out = tmp_path / "testA"
    _ok(_cli("data", "convert", "refcoco", src, "--image-root", coco, "--out", out, "--split", "testA"))
    rows = _rows(out)
    assert [(r["expression"], r["bbox"], r["objects"], r["ref_id"], r["sent_id"]) for r in rows] == \
        [("man", [30.5, 0, 64.0, 48], [[4, 6, 24, 36]], 1, 2), ("top", [0, 0, 32, 16], [], 2, 3)]
    dataset, task, stats = load_rows(out)  # the default --bbox-format xyxy reads what convert wrote
    assert task == "grounding" and stats.rows == 2
    # normalised by hand: x / width, y / height of images 1 (64x48) and 3 (32x64)
    assert dataset["box"] == [pytest.approx([30.5 / 64, 0.0, 1.0, 1.0]), pytest.approx([0.0, 0.0, 1.0, 0.25])]
    assert dataset["question"] == ["man", "top"]
    train = tmp_path / "train"
    _ok(_cli("data", "convert", "refcoco", src, "--image-root", coco, "--out", train, "--split", "train"))
    assert [r["expression"] for r in _rows(train)] == ["left bus", "red one"]
    assert load_rows(train)[0]["box"][0] == pytest.approx([4 / 64, 6 / 48, 24 / 64, 36 / 48])


class _Payload:
    """A pickle that would create a directory when unpickled with pickle.load."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (self.target,)


def test_refcoco_pickle_with_any_global_is_refused_and_never_run(tmp_path):
    coco = _coco_images(tmp_path / "coco")
    src = _refcoco(tmp_path / "refcoco")
    target = tmp_path / "pwned"
    src.write_bytes(pickle.dumps([{"ann_id": 5, "payload": _Payload(str(target))}], protocol=2))
    assert_one_line_error(_cli("data", "convert", "refcoco", src, "--image-root", coco, "--out", tmp_path / "o",
                         "--split", "train"), "refused: not a pickle of plain lists and dicts", "posix.mkdir")
    assert not target.exists() and not (tmp_path / "o").exists()
    src.write_bytes(b"\x80\x02]q\x00(")  # truncated
    assert_one_line_error(_cli("data", "convert", "refcoco", src, "--image-root", coco, "--out", tmp_path / "o",
                         "--split", "train"), "not a readable pickle")


def test_bad_sources_are_one_line(tmp_path):
    coco = _coco_images(tmp_path / "coco")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"questions": []}))
    for args, fragment in ((("coco-captions", tmp_path / "none.json"), "no such file"),
                           (("coco-captions", wrong), "no 'images' list"),
                           (("vqav2", wrong), "give its annotations file with --annotations"),
                           (("vqav2", wrong, "--annotations", wrong), "no 'annotations' list"),
                           (("coco-captions", _karpathy(tmp_path), "--rows", "sentence", "--split", "val"),
                            "--rows must be one of caption, image")):
        assert_one_line_error(_cli("data", "convert", *args, "--image-root", coco, "--out", tmp_path / "o"), fragment)
    assert_one_line_error(_cli("data", "convert", "coco-captions", wrong, "--image-root", tmp_path / "nope", "--out",
                         tmp_path / "o"), "--image-root")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind, edit", [
    ("coco-captions", lambda d: d["images"][0].update(sentences=7)),
    ("coco-captions", lambda d: d["images"][0].update(filepath=["train2014"])),
    ("vqav2", lambda d: d["annotations"][0].update(answers=5)),
    ("refcoco", lambda d: d["annotations"][0].update(bbox="4 6 20 30")),
])
def test_fields_of_another_type_are_one_line(kind, edit, tmp_path):
    coco = _coco_images(tmp_path / "coco", "val2014" if kind == "vqav2" else "train2014")
    if kind == "coco-captions":
        src = _karpathy(tmp_path)
        target, extra = src, ["--split", "train"]
    elif kind == "vqav2":
        src = _vqa(tmp_path / "vqa")
        target, extra = tmp_path / "vqa" / "v2_mscoco_val2014_annotations.json", []
    else:
        src = _refcoco(tmp_path / "refcoco")
        target, extra = tmp_path / "refcoco" / "instances.json", ["--split", "train"]
    value = json.loads(target.read_text())
    edit(value)
    target.write_text(json.dumps(value))
    result = _cli("data", "convert", kind, src, "--image-root", coco, "--out", tmp_path / "o", *extra)
    if kind == "refcoco":  # a malformed box is written as is; the loader skips its rows (both sentences of ref 0)
        _ok(result)
        with pytest.raises(VpgtransError, match=r"no usable rows of 2 .*data.jsonl:1: 'bbox' must be four finite"):
            load_rows(tmp_path / "o")
    else:
        assert_one_line_error(result, f"not in the official {kind} layout")
        assert not (tmp_path / "o").exists()
