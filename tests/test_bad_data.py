"""Bad data has one defined outcome each: converted, truncated, or skipped and counted (an error with
strict=True / --strict); a dataset with nothing usable fails before training."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import assert_one_line_error
from vpgtrans import data_sources
from vpgtrans.bundle import read_manifest
from vpgtrans.cli import app
from vpgtrans.config import PromptTemplate
from vpgtrans.data import MAX_TEXT_CHARS, DataDir, LoadStats, load_rows
from vpgtrans.images import MAX_IMAGE_PIXELS, ImageTooLarge, build_image_processor, open_image
from vpgtrans.collate import Collator
from vpgtrans.errors import VpgtransError

# --- image files made byte by byte ---------------------------------------------------------------


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, rows: list[bytes] | None = None) -> bytes:
    """A PNG with the given header; ``rows`` are raw scanlines (filter byte added), or a few zero bytes
    only (a header that promises far more than the file holds)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    raw = b"".join(b"\x00" + row for row in rows) if rows is not None else b"\x00" * 16
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def _gray16(value: int, size: int = 4) -> bytes:
    return png_bytes(size, size, 16, 0, [struct.pack(">H", value) * size] * size)


def _rgb16(rgb: tuple[int, int, int], size: int = 4) -> bytes:
    return png_bytes(size, size, 16, 2, [struct.pack(">HHH", *rgb) * size] * size)


def _save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


# --- image modes: every one becomes 8-bit RGB -------------------------------------------------------


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    """PIL's own convert("RGB") clips 16-bit values at 255: mid-grey 32896 would come out white."""
    for value, expected in ((0, 0), (32896, 128), (65535, 255), (257 * 40, 40)):
        path = tmp_path / f"g{value}.png"
        path.write_bytes(_gray16(value))
        assert Image.open(path).mode == "I;16"
        image = open_image(str(path))
        assert image.mode == "RGB" and image.getpixel((1, 1)) == (expected,) * 3


def test_16_bit_rgb_becomes_8_bit(tmp_path):
    path = tmp_path / "rgb16.png"
    path.write_bytes(_rgb16((65535, 32896, 0)))
    assert open_image(str(path)).getpixel((0, 0)) == (255, 128, 0)


@pytest.mark.parametrize("make, expected", [
    (lambda p: _save(Image.new("L", (4, 4), 77), p / "gray.png"), (77, 77, 77)),
    (lambda p: _save(Image.new("1", (4, 4), 1), p / "bits.png"), (255, 255, 255)),
    (lambda p: _save(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), p / "cmyk.jpg", quality=100), (255, 0, 0)),
    (lambda p: _save(Image.new("RGBA", (4, 4), (10, 200, 30, 255)), p / "opaque.png"), (10, 200, 30)),
    # fully transparent pixels are composited over white (as transformers' convert_to_rgb does)
    (lambda p: _save(Image.new("RGBA", (4, 4), (10, 200, 30, 0)), p / "clear.png"), (255, 255, 255)),
    (lambda p: _save(Image.new("LA", (4, 4), (0, 0)), p / "clear-gray.png"), (255, 255, 255)),
])
def test_modes_convert_to_rgb(make, expected, tmp_path):
    image = open_image(str(make(tmp_path)))
    assert image.mode == "RGB"
    assert all(abs(a - b) <= 2 for a, b in zip(image.getpixel((2, 2)), expected)), image.getpixel((2, 2))


def test_palette_with_transparency(tmp_path):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    palette.putpixel((0, 0), 0)
    path = _save(palette, tmp_path / "p.png", transparency=0)
    image = open_image(str(path))
    assert image.getpixel((0, 0)) == (255, 255, 255) and image.getpixel((3, 3)) == (200, 10, 10)


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    """A 100000 x 100000 PNG of a few bytes (PIL's own bomb error), and one just over our limit that PIL
    would decode: both refused before any pixel is decoded."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bytes(100_000, 100_000, 8, 0))
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 1
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes(side, side, 8, 0))
    assert bomb.stat().st_size < 200 and big.stat().st_size < 200
    for path in (bomb, big):
        with pytest.raises(ImageTooLarge):
            open_image(str(path))


# --- rows: load-time rules ---------------------------------------------------------------------------


def _image(path, colour=(200, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path)


def _write_jsonl(root, lines: list[bytes | str | dict], images=("a.png", "b.png")):
    root.mkdir(parents=True, exist_ok=True)
    for name in images:
        _image(root / name)
    encoded = [json.dumps(x).encode() if isinstance(x, dict) else x.encode() if isinstance(x, str) else x
               for x in lines]
    (root / "data.jsonl").write_bytes(b"\n".join(encoded) + b"\n")
    return root


LONG = "word " * 400  # 2000 characters


CAPTION_LINES = [
    {"image": "a.png", "caption": "a red square"},                      # 1 kept
    {"image": "b.png", "caption": ["", "  ", "a red thing"]},           # 2 kept, empty items dropped
    {"image": "a.png", "caption": LONG},                                # 3 kept, truncated
    "",                                                                 # blank: not a row
    "{not json",                                                        # 5 bad row
    b'{"image": "a.png", "caption": "caf\xe9"}',                        # 6 bad row: latin-1 byte
    "[1, 2, 3]",                                                        # 7 bad row: not an object
    {"image": "a.png"},                                                 # 8 missing key
    {"caption": "no image"},                                            # 9 missing key
    {"image": "a.png", "caption": None},                                # 10 missing key
    {"image": "a.png", "caption": "   "},                               # 11 empty text
    {"image": "a.png", "caption": []},                                  # 12 empty text
    {"image": "a.png", "caption": 5},                                   # 13 bad row: wrong type
    {"image": 7, "caption": "x"},                                       # 14 bad row: image not a path
    {"image": "gone.png", "caption": "x"},                              # 15 missing image
    "[" * 100_000,                                                      # 16 bad row: absurd nesting
]


def test_each_bad_caption_row_has_its_outcome(tmp_path):
    root = _write_jsonl(tmp_path / "d", CAPTION_LINES)
    dataset, task, stats = load_rows(root)
    assert task == "caption" and len(dataset) == 3
    counts = stats.to_dict()
    assert counts["source"] == {"form": "jsonl", "location": str(root)}
    assert {k: v for k, v in counts.items() if k not in ("problems", "source")} == {
        "lines": 15, "rows": 3, "skipped_bad_row": 6, "skipped_missing_key": 3, "skipped_empty_text": 2,
        "skipped_missing_image": 1, "truncated_text": 1, "skipped_unreadable_image": 0, "skipped_large_image": 0}
    assert stats.rows + stats.skipped_at_load == stats.lines
    assert dataset[1]["caption"] == ["a red thing"]
    assert dataset[2]["caption"] == [LONG.strip()[:MAX_TEXT_CHARS]]
    problems = "\n".join(stats.problems)
    for fragment in ("data.jsonl:5: not valid JSON", "data.jsonl:6: not valid UTF-8", "data.jsonl:7: not a JSON object",
                     "data.jsonl:8: no 'caption'", "data.jsonl:9: no 'image'", "data.jsonl:11: 'caption' has no non-empty",
                     "data.jsonl:13: 'caption' must be a string", "data.jsonl:15: image 'gone.png' not found",
                     "data.jsonl:16: not valid JSON"):
        assert fragment in problems, fragment
    assert json.loads(json.dumps(counts)) == counts  # the manifest can hold it


def test_each_bad_vqa_row_has_its_outcome(tmp_path):
    root = _write_jsonl(tmp_path / "d", [
        {"image": "a.png", "question": "what colour?", "answers": ["red", "", "red"]},
        {"image": "a.png", "question": "what colour?", "answers": "red"},   # a single answer string
        {"image": "a.png", "question": "", "answers": ["red"]},
        {"image": "a.png", "question": "what?", "answers": ["", " "]},
        {"image": "a.png", "question": ["what?"], "answers": ["red"]},
        {"image": "a.png", "question": "what?"},
        {"image": "b.png", "caption": "a caption row in VQA data"},
    ])
    dataset, task, stats = load_rows(root)
    assert task == "vqa" and len(dataset) == 2
    assert dataset[0]["answers"] == ["red", "red"] and dataset[1]["answers"] == ["red"]
    assert (stats.skipped_empty_text, stats.skipped_bad_row, stats.skipped_missing_key) == (2, 1, 2)
    assert stats.rows + stats.skipped_at_load == stats.lines == 7


def test_over_long_line_is_a_bad_row_never_parsed(tmp_path, monkeypatch):
    monkeypatch.setattr(data_sources, "MAX_LINE_BYTES", 100)
    root = _write_jsonl(tmp_path / "d", [{"image": "a.png", "caption": "x" * 200}, {"image": "a.png", "caption": "ok"}])
    dataset, _, stats = load_rows(root)
    assert len(dataset) == 1 and stats.skipped_bad_row == 1 and "longer than 100 bytes" in stats.problems[0]


def test_strict_turns_the_first_skip_into_an_error_naming_the_row(tmp_path):
    root = _write_jsonl(tmp_path / "d", [{"image": "a.png", "caption": "ok"}, "{oops", {"image": "a.png"}])
    for call in (lambda: load_rows(root, strict=True), lambda: load_rows(DataDir(root, strict=True))):
        with pytest.raises(VpgtransError) as err:
            call()
        message = str(err.value)
        assert message.startswith("data.jsonl:2: not valid JSON") and "--strict" in message and "\n" not in message
    assert load_rows(DataDir(root))[2].skipped_bad_row == 1  # not strict: skipped and counted


@pytest.mark.parametrize("lines, fragment", [
    ([], "no usable rows of 0"),
    (["{bad", "", "[]"], "no usable rows of 2 (missing images: 0, bad rows: 2"),
    ([{"image": "a.png", "caption": ""}] * 3, "empty text: 3"),
    ([{"image": "gone.png", "caption": "x"}] * 2, "missing images: 2"),
    ([{"image": "a.png", "text": "x"}] * 2, "no row has 'caption'"),
])
def test_dataset_with_nothing_usable_fails_at_load(tmp_path, lines, fragment):
    root = _write_jsonl(tmp_path / "d", lines)
    with pytest.raises(VpgtransError) as err:
        load_rows(root)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_task_mismatch_and_unknown_task(tmp_path):
    root = _write_jsonl(tmp_path / "d", [{"image": "a.png", "caption": "x"}])
    with pytest.raises(VpgtransError, match="holds caption data, but task 'vqa' was asked for"):
        load_rows(root, "vqa")
    with pytest.raises(VpgtransError, match="unknown task 'bogus'"):
        load_rows(root, "bogus")


def test_datasets_directory_rows_follow_the_same_rules(tmp_path):
    import datasets

    images = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(4)]
    dataset = datasets.Dataset.from_dict({"image": images, "question": ["what?", "", None, "where?"],
                                          "answers": [["red", ""], ["red"], ["red"], []]})
    dataset.save_to_disk(str(tmp_path / "ds"))
    loaded, task, stats = load_rows(tmp_path / "ds")
    assert task == "vqa" and len(loaded) == 1
    assert (loaded[0]["question"], loaded[0]["answers"]) == ("what?", ["red"])
    assert open_image(loaded[0]["image"]).getpixel((0, 0)) == (0, 0, 0)
    assert (stats.lines, stats.skipped_empty_text, stats.skipped_missing_key) == (4, 2, 1)
    assert stats.rows + stats.skipped_at_load == stats.lines


# --- batch time: unreadable and huge images -----------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny["llama"])


def _collator(tokenizer, stats, task="caption", mode="train"):
    return Collator(tokenizer, PromptTemplate(), task, 4, build_image_processor(32), False, mode=mode, stats=stats)


def _image_rows(tmp_path):
    """Six caption rows: two good images, one truncated PNG, one garbage file, one bomb, a good one again."""
    root = tmp_path / "imgs"
    _image(root / "good.png")
    data = (root / "good.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "garbage.png").write_bytes(b"this is not an image at all")
    (root / "bomb.png").write_bytes(png_bytes(100_000, 100_000, 8, 0))
    gray = root / "gray16.png"
    gray.write_bytes(_gray16(30000))
    names = ["good.png", "truncated.png", "garbage.png", "bomb.png", "gray16.png", "good.png"]
    return [{"image": str(root / n), "caption": ["a thing"]} for n in names]


def test_unusable_images_are_skipped_and_counted_once(tokenizer, tmp_path):
    rows = _image_rows(tmp_path)
    stats = LoadStats(rows=len(rows))
    collate = _collator(tokenizer, stats)
    for _ in range(2):  # the same bad images seen again (a second epoch) are not counted again
        batch = collate(rows)
        assert batch["pixel_values"].shape[0] == 3 and batch["input_ids"].shape[0] == 3
    assert (stats.skipped_unreadable_image, stats.skipped_large_image) == (2, 1)
    assert any("bomb.png: image too large" in p for p in stats.problems)
    assert any("garbage.png: unreadable image" in p for p in stats.problems)


def test_strict_unreadable_image_is_an_error_naming_it(tokenizer, tmp_path):
    rows = _image_rows(tmp_path)
    with pytest.raises(VpgtransError, match=r"truncated\.png: unreadable image .*--strict"):
        _collator(tokenizer, LoadStats(rows=6, strict=True))(rows)


def test_all_images_unreadable_stops_at_the_first_batches(tokenizer, tmp_path):
    (tmp_path / "x.png").write_bytes(b"nope")
    rows = [{"image": str(tmp_path / "x.png"), "caption": ["a"]}] * 5
    with pytest.raises(VpgtransError, match="none of the first 5 images could be used"):
        _collator(tokenizer, LoadStats(rows=5))(rows)


# --- the CLI: counts in the manifest, --strict, all-bad data ------------------------------------------


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_training_records_the_counts_and_strict_refuses(inherited, tmp_path):
    root = _write_jsonl(tmp_path / "d", CAPTION_LINES[:12])
    (root / "broken.png").write_bytes(b"broken")
    with open(root / "data.jsonl", "a") as fh:
        fh.write(json.dumps({"image": "broken.png", "caption": "x"}) + "\n")
    result = _cli("warmup-projector", inherited, "--data", root, "--out", tmp_path / "w", "--max-steps", "1",
                  "--batch-size", "4")
    assert result.exit_code == 0, result.output
    recorded = read_manifest(tmp_path / "w")["data"]
    assert (recorded["lines"], recorded["rows"], recorded["skipped_bad_row"], recorded["skipped_missing_key"],
            recorded["skipped_empty_text"], recorded["truncated_text"]) == (12, 4, 3, 3, 2, 1)
    # the one step drew all four rows (batch 4 of 4), so the broken image was met once
    assert recorded["skipped_unreadable_image"] == 1
    assert any("broken.png" in p for p in recorded["problems"])

    assert_one_line_error(_cli("warmup-projector", inherited, "--data", root, "--out", tmp_path / "s", "--max-steps", "1",
                         "--batch-size", "4", "--strict"), "data.jsonl:5: not valid JSON", "--strict")
    assert not (tmp_path / "s").exists()


def test_eval_strict_and_all_bad_data_on_the_cli(inherited, tmp_path):
    bad = _write_jsonl(tmp_path / "bad", ["{", {"image": "a.png", "caption": ""}])
    assert_one_line_error(_cli("eval", inherited, "--data", bad), "no usable rows of 2")
    assert_one_line_error(_cli("eval", inherited, "--data", bad, "--strict"), "data.jsonl:1: not valid JSON")
    unreadable = _write_jsonl(tmp_path / "unreadable", [{"image": f"x{i}.png", "caption": "a"} for i in range(3)],
                              images=())
    for i in range(3):
        (unreadable / f"x{i}.png").write_bytes(b"not a png")
    assert_one_line_error(_cli("eval", inherited, "--data", unreadable), "none of the first 3 images could be used")


def test_transfer_strict_checks_every_data_directory_before_any_stage(tiny, tmp_path):
    good = tiny["caption"]
    bad = _write_jsonl(tmp_path / "bad", [{"image": "a.png", "caption": "ok"}, {"image": "a.png"}])
    common = ["transfer", "--source", tiny["source"], "--target-llm", tiny["llama"], "--out", tmp_path / "run",
              "--converter", "none", "--max-steps", "1", "--batch-size", "4", "--strict"]
    for extra in (["--data", bad], ["--data", good, "--finetune-data", bad], ["--data", good, "--eval-data", bad]):
        assert_one_line_error(_cli(*common, *extra), "data.jsonl:2: no 'caption'", "--strict")
        assert not (tmp_path / "run").exists()
    result = _cli(*common[:-1], "--data", bad, "--skip-warmup", "--finetune-max-steps", "1")  # not strict: runs
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "run" / "finetune")["data"]["skipped_missing_key"] == 1
