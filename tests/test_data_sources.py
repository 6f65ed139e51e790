"""Every form --data takes (issue 14): a .jsonl file, a LAVIS annotation JSON, an HF imagefolder, a datasets name
from a local HF cache built here (no network) — each gives the rows a plain data directory gives, keeps the
counted skips, and has a fingerprint that follows its content and reading options."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import assert_one_line_error
from vpgtrans.bundle import fingerprint_files, read_manifest
from vpgtrans.cli import app
from vpgtrans.data import DataDir, data_fingerprint, load_rows
from vpgtrans.errors import VpgtransError

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def _images(root, names):
    root.mkdir(parents=True, exist_ok=True)
    for name, colour in zip(names, list(COLOURS.values()) * 4):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), colour).save(root / name)


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


CAPTIONS = [{"image": f"train2014/{i}.png", "caption": f"a {colour} square"} for i, colour in enumerate(COLOURS)]


@pytest.fixture
def plain(tmp_path):
    """The reference: a data directory with one data.jsonl."""
    root = tmp_path / "plain"
    _images(root, [row["image"] for row in CAPTIONS])
    _jsonl(root / "data.jsonl", CAPTIONS)
    return root


def test_jsonl_file_lavis_json_and_imagefolder_give_the_plain_rows(plain, tmp_path):
    expected = load_rows(plain)[0].to_list()
    assert [row["caption"] for row in expected] == [[row["caption"]] for row in CAPTIONS]

    rows, task, _ = load_rows(plain / "data.jsonl")  # (a) the file itself
    assert task == "caption" and rows.to_list() == expected

    # (b) LAVIS: coco/annotations/*.json beside coco/images/ (LAVIS's storage layout), or --image-root
    lavis = tmp_path / "coco" / "annotations" / "coco_karpathy_train.json"
    lavis.parent.mkdir(parents=True)
    lavis.write_text(json.dumps([{**row, "image_id": f"coco_{i}"} for i, row in enumerate(CAPTIONS)]))
    shutil.copytree(plain / "train2014", tmp_path / "coco" / "images" / "train2014")
    got = load_rows(lavis)[0].to_list()
    assert [r["caption"] for r in got] == [r["caption"] for r in expected]
    assert [r["image"] for r in got] == [str((tmp_path / "coco/images" / row["image"]).resolve()) for row in CAPTIONS]
    assert load_rows(DataDir(lavis, image_root=plain))[0].to_list() == expected

    # (c) an HF imagefolder: metadata.jsonl with file_name, at the top or in split directories
    folder = tmp_path / "folder"
    shutil.copytree(plain / "train2014", folder / "train2014")
    _jsonl(folder / "metadata.jsonl", [{"file_name": row["image"], "caption": row["caption"]} for row in CAPTIONS])
    assert [r["caption"] for r in load_rows(folder)[0]] == [r["caption"] for r in expected]
    splits = tmp_path / "splits"
    for split, rows in (("train", CAPTIONS), ("validation", CAPTIONS[:1])):
        shutil.copytree(plain / "train2014", splits / split / "train2014")
        _jsonl(splits / split / "metadata.jsonl", [{"file_name": r["image"], "caption": r["caption"]} for r in rows])
    assert len(load_rows(splits)[0]) == 3
    assert load_rows(DataDir(splits, split="validation"))[0]["caption"] == [[CAPTIONS[0]["caption"]]]
    with pytest.raises(VpgtransError, match="without a 'test' split .it has train, validation"):
        load_rows(DataDir(splits, split="test"))


def test_lavis_vqa_answer_list_and_counted_skips(tmp_path):
    root = tmp_path / "vqa"
    _images(root / "images", ["train2014/a.png"])
    good = {"question": "what colour?", "answer": ["red", "red", "dark red"], "image": "train2014/a.png",
            "question_id": 7}
    annotation = root / "annotations" / "vqa_train.json"
    annotation.parent.mkdir(parents=True)
    annotation.write_text(json.dumps([good, "not a row", {**good, "image": "train2014/missing.png"},
                                      {**good, "answer": []}, {"question": "no image", "answer": "x"},
                                      {**good, "question": "GQA style", "answer": "red"}]))
    dataset, task, stats = load_rows(annotation)
    assert task == "vqa"
    assert dataset["answers"] == [["red", "red", "dark red"], ["red"]]
    assert (stats.lines, stats.rows, stats.skipped_bad_row, stats.skipped_missing_image, stats.skipped_empty_text,
            stats.skipped_missing_key) == (6, 2, 1, 1, 1, 1)
    assert "vqa_train.json[1]: not a JSON object" in stats.problems[0]
    with pytest.raises(VpgtransError, match=r"vqa_train.json\[1\]: not a JSON object"):
        load_rows(DataDir(annotation, strict=True))


def test_imagefolder_bad_lines_are_counted_like_jsonl(tmp_path):
    folder = tmp_path / "folder"
    _images(folder, ["a.png"])
    _jsonl(folder / "metadata.jsonl", [{"file_name": "a.png", "caption": "ok"}, "{", {"file_name": "b.png",
                                                                                     "caption": "gone"}])
    _, _, stats = load_rows(folder)
    assert (stats.lines, stats.rows, stats.skipped_bad_row, stats.skipped_missing_image) == (3, 1, 1, 1)
    assert stats.problems[0].startswith("metadata.jsonl:2: not valid JSON")


def test_columns_map_the_sources_keys(plain, tmp_path):
    renamed = _jsonl(tmp_path / "r" / "rows.jsonl", [{"img": row["image"], "text": row["caption"]} for row in CAPTIONS])
    with pytest.raises(VpgtransError, match="no row has 'caption'"):
        load_rows(DataDir(renamed, image_root=plain))
    got = load_rows(DataDir(renamed, image_root=plain, columns="caption=text,image=img"))[0].to_list()
    assert got == load_rows(plain)[0].to_list()
    for bad in ("caption", "caption=", "=text", "caption=text,image=text"):
        with pytest.raises(VpgtransError, match="--data-columns"):
            DataDir(renamed, columns=bad)


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p / "nowhere" / "data", "no such data directory or file"),
    (lambda p: (p / "notes.txt").write_text("x") and p / "notes.txt", "not a data file"),
    (lambda p: (p / "captions.json").write_text(json.dumps({"images": [], "annotations": []})) and p / "captions.json",
     "an official COCO/VQA annotation file.*data convert coco-captions"),
    (lambda p: (p / "obj.json").write_text(json.dumps({"a": 1})) and p / "obj.json", "not a LAVIS annotation file"),
    (lambda p: (p / "broken.json").write_text("[{") and p / "broken.json", "not valid JSON"),
    (lambda p: "nobody/no-such-dataset", "nor a dataset in the local HF datasets cache"),
])
def test_what_is_no_data_is_one_line(make, fragment, tmp_path, hf_cache):
    with pytest.raises(VpgtransError, match=fragment) as info:
        load_rows(make(tmp_path))
    assert "\n" not in str(info.value)


# --- datasets names from a local HF cache --------------------------------------------------------------


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty HF datasets cache for this test (the loader reads only it: HF_DATASETS_OFFLINE=1)."""
    import datasets

    cache = tmp_path / "hf-datasets"
    cache.mkdir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    assert datasets.config.HF_HUB_OFFLINE
    return cache


def cache_dataset(cache, name: str, splits: dict, fingerprint: str = "0123abcd"):
    """Put ``splits`` ({split: datasets.Dataset}) into ``cache`` as ``load_dataset(name)`` leaves a Hub dataset
    there (owner___name/default/0.0.0/<hash>/, prepared by datasets' own parquet builder)."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    owner, short = name.split("/")
    src = cache.parent / f"parquet-{short}"
    src.mkdir(exist_ok=True)
    files = {}
    for split, dataset in splits.items():
        dataset.to_parquet(str(src / f"{split}.parquet"))
        files[split] = str(src / f"{split}.parquet")
    builder = Parquet(dataset_name=short, data_files=files, cache_dir=str(cache))
    builder.download_and_prepare(output_dir=str(cache / f"{owner}___{short}" / "default" / "0.0.0" / fingerprint))


def _hub_like(n: int, offset: int = 0):
    """A Hub-style captioning table: embedded images (an Image column named 'img') and a 'text' column."""
    import datasets

    colours = list(COLOURS.items())
    rows = [colours[(i + offset) % len(colours)] for i in range(n)]
    return datasets.Dataset.from_dict(
        {"img": [Image.new("RGB", (32, 32), rgb) for _, rgb in rows], "text": [f"a {name} square" for name, _ in rows]},
        features=datasets.Features({"img": datasets.Image(), "text": datasets.Value("string")}))


def test_datasets_name_from_the_local_cache(hf_cache):
    cache_dataset(hf_cache, "tester/tiny-coco", {"train": _hub_like(4), "validation": _hub_like(2, offset=1)})
    data = DataDir("tester/tiny-coco", columns="image=img,caption=text")
    dataset, task, stats = load_rows(data)
    assert task == "caption" and (stats.lines, stats.rows) == (4, 4)
    assert dataset["caption"] == [["a red square"], ["a green square"], ["a blue square"], ["a red square"]]
    first = dataset[1]["image"]  # decoded by datasets as a PIL image, pixels as stored
    assert isinstance(first, Image.Image) and np.asarray(first)[0, 0].tolist() == list(COLOURS["green"])

    val = load_rows(DataDir("tester/tiny-coco:validation", columns="image=img,caption=text"))[0]
    assert val["caption"] == [["a green square"], ["a blue square"]]
    assert load_rows(DataDir("tester/tiny-coco", split="validation", columns="image=img,caption=text"))[0]["caption"] \
        == val["caption"]
    with pytest.raises(VpgtransError, match="no 'image' column .*--data-columns image="):
        load_rows("tester/tiny-coco")
    with pytest.raises(VpgtransError, match="cannot read split 'test'"):
        load_rows(DataDir("tester/tiny-coco:test", columns="image=img,caption=text"))


def test_fingerprints_follow_content_and_options(plain, tmp_path, hf_cache):
    files = sorted(p for p in plain.iterdir() if p.is_file())
    assert data_fingerprint(plain) == fingerprint_files(files)  # a plain directory: as before other forms existed
    single = data_fingerprint(plain / "data.jsonl")
    assert single == fingerprint_files([plain / "data.jsonl"])
    assert data_fingerprint(DataDir(plain / "data.jsonl", columns="caption=text")) != single
    lavis = tmp_path / "a.json"
    lavis.write_text(json.dumps(CAPTIONS))
    before = data_fingerprint(lavis)
    lavis.write_text(json.dumps(CAPTIONS[::-1]))
    assert data_fingerprint(lavis) != before

    cache_dataset(hf_cache, "tester/fp", {"train": _hub_like(3), "validation": _hub_like(2)})
    train = data_fingerprint(DataDir("tester/fp"))
    assert train == data_fingerprint("tester/fp:train") != data_fingerprint("tester/fp:validation")
    shutil.rmtree(hf_cache / "tester___fp")  # the cache rebuilt with other rows: another fingerprint
    cache_dataset(hf_cache, "tester/fp", {"train": _hub_like(3, offset=1), "validation": _hub_like(2)})
    assert data_fingerprint("tester/fp") != train


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_train_and_eval_on_a_datasets_name_and_a_lavis_file_on_the_cli(inherited, hf_cache, plain, tmp_path):
    cache_dataset(hf_cache, "tester/tiny-coco", {"train": _hub_like(4), "validation": _hub_like(2, offset=1)})
    out = tmp_path / "warm"
    result = _cli("warmup-projector", inherited, "--data", "tester/tiny-coco", "--data-columns", "image=img,caption=text",
                  "--out", out, "--max-steps", "1", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest["data"]["rows"] == 4 and manifest["config"]["task"] == "caption"
    assert manifest["data"]["source"] == {"form": "datasets-name", "location": "tester/tiny-coco", "split": "train",
                                          "columns": {"caption": "text", "image": "img"}}
    result = _cli("eval", out, "--data", "tester/tiny-coco:validation", "--data-columns", "image=img,caption=text",
                  "--json", "--max-new-tokens", "3")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["scores"]["n"] == 2 and report["data"] == "tester/tiny-coco:validation"

    lavis = tmp_path / "ann.json"
    lavis.write_text(json.dumps([{"image": row["image"], "caption": [row["caption"]]} for row in CAPTIONS]))
    result = _cli("eval", out, "--data", lavis, "--image-root", plain, "--json", "--max-new-tokens", "3")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["data_stats"]["rows"] == 3

    for args, fragment in (((tmp_path / "nothing",), "no such data directory or file"),
                           (("nobody/nothing",), "nor a dataset in the local HF datasets cache"),
                           ((lavis, "--image-root", tmp_path / "none"), "--image-root"),
                           ((lavis, "--data-columns", "caption"), "--data-columns takes OURS=THEIRS")):
        assert_one_line_error(_cli("eval", out, "--data", *args), fragment)


def test_transfer_takes_datasets_names_with_splits(tiny, hf_cache, tmp_path):
    cache_dataset(hf_cache, "tester/tiny-coco", {"train": _hub_like(4), "validation": _hub_like(2, offset=1)})
    common = ["transfer", "--source", tiny["source"], "--target-llm", tiny["llama"], "--converter", "none",
              "--data", "tester/tiny-coco", "--data-columns", "image=img,caption=text", "--max-steps", "1",
              "--batch-size", "2"]
    assert_one_line_error(_cli(*common, "--eval-data", "tester/tiny-coco:test", "--out", tmp_path / "bad"),
                          "cannot read split 'test'")
    assert not (tmp_path / "bad").exists()  # refused before any stage ran
    out = tmp_path / "run"
    result = _cli(*common, "--eval-data", "tester/tiny-coco:validation", "--out", out)
    assert result.exit_code == 0, result.output
    finetune = read_manifest(out / "finetune")
    assert finetune["data"]["rows"] == 4 and "cider" in finetune["metrics"]["eval"]
