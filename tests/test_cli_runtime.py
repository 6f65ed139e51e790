"""What a batch job's log shows (plain progress lines when stderr is not a terminal), --version, eval --device."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from typer.testing import CliRunner

from test_cli import TINY_BUDGET, _ok, _run, _user_error
from vpgtrans.cli_runtime import plain_progress

# (The first line of a run knows no rate yet: its step is where the clock starts.)
LINE = re.compile(r"^warmup: step (\d+)/(\d+) \(\d+%\) loss \d+\.\d{4} lr \d\.\d\de-\d\d( [\d.]+ samples/s)? "
                  r"elapsed \d+:\d\d:\d\d eta (\d+:\d\d:\d\d|\?)$")


def test_plain_progress_writes_the_first_and_last_step_and_one_line_per_interval():
    lines, now = [], [100.0]
    update = plain_progress("warmup", batch_size=8, every_seconds=10, write=lines.append, clock=lambda: now[0])
    for step in range(1, 11):
        now[0] += 3.0  # 3 s a step
        update(step, 10, 2.5 - step / 10, 5e-4)
    steps = [int(LINE.match(line).group(1)) for line in lines]
    assert steps == [1, 5, 9, 10]  # step 1, then whenever 10 s have passed since the last line, then the end
    # 8 samples a step, 3 s a step -> 2.7 samples/s; after step 5 (12 s for 4 steps) 5 steps are left: 15 s
    assert "2.7 samples/s" in lines[1] and "eta 0:00:15" in lines[1] and "loss 2.0000" in lines[1]


def test_a_training_command_logs_plain_lines_when_stderr_is_not_a_terminal(inherited, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("VPGTRANS_PROGRESS_SECONDS", "0")
    result = _ok(_run(CliRunner(), "warmup-projector", inherited, "--data", tiny["caption"], "--out", tmp_path / "w",
                      *TINY_BUDGET))
    lines = [line for line in result.stderr.splitlines() if line.startswith("warmup: step")]
    assert [LINE.match(line).group(1, 2) for line in lines] == [("1", "2"), ("2", "2")], result.stderr
    assert "\x1b[" not in result.stderr  # no terminal control codes in a log file


def test_version_is_the_package_version():
    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    result = _ok(_run(CliRunner(), "--version"))
    assert result.stdout.strip() == f"vpgtrans {pyproject['project']['version']}"


def test_eval_device_is_checked_before_anything_loads(inherited, tiny, tmp_path):
    runner = CliRunner()
    _user_error(_run(runner, "eval", inherited, "--data", tiny["caption"], "--device", "gpu0"), "--device 'gpu0'",
                "is not a device")
    _user_error(_run(runner, "eval", inherited, "--data", tiny["caption"], "--device", "cuda:99"),
                "--device cuda:99: no such CUDA device")


def test_eval_records_the_caption_tokenizer(inherited, tiny, tmp_path):
    import json
    import shutil

    import pytest

    if shutil.which("java") is None:
        pytest.skip("COCO's PTB tokenizer needs java")
    runner = CliRunner()
    for name in ("regex", "ptb"):
        _ok(_run(runner, "eval", inherited, "--data", tiny["caption"], "--max-samples", "3", "--max-new-tokens", "3",
                 "--tokenizer", name, "--out", tmp_path / f"{name}.json"))
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert report["tokenizer"] == name and {"cider", "bleu4"} <= set(report["scores"])
    _user_error(_run(runner, "eval", inherited, "--data", tiny["caption"], "--tokenizer", "nltk"),
                "--tokenizer must be one of regex, ptb (got 'nltk')")


def test_template_by_name_or_file_on_the_cli(tiny, tmp_path):
    import json

    from vpgtrans.bundle import read_manifest
    from vpgtrans.config import TEMPLATES, PromptTemplate, to_dict

    runner = CliRunner()
    common = ["inherit", "--source", tiny["source"], "--target-llm", tiny["llama"]]
    _ok(_run(runner, *common, "--out", tmp_path / "chat", "--template", "vl-vicuna"))
    assert read_manifest(tmp_path / "chat")["template"] == to_dict(PromptTemplate(**TEMPLATES["vl-vicuna"]))
    # The chat template trains and evaluates: the image slots sit inside the human turn.
    _ok(_run(runner, "warmup-projector", tmp_path / "chat", "--data", tiny["caption"], "--out", tmp_path / "w",
             "--max-steps", "1", "--batch-size", "4"))
    _ok(_run(runner, "eval", tmp_path / "w", "--data", tiny["vqa"], "--max-samples", "2", "--max-new-tokens", "2"))
    mine = {"caption": "<img>{image}</img>{bos}", "vqa": "<img>{image}</img>{bos}Q: {question} A:"}
    (tmp_path / "t.json").write_text(json.dumps(mine))
    _ok(_run(runner, *common, "--out", tmp_path / "file", "--template", tmp_path / "t.json"))
    assert read_manifest(tmp_path / "file")["template"]["vqa"] == mine["vqa"]
    _user_error(_run(runner, *common, "--out", tmp_path / "x", "--template", "alpaca"),
                "--template 'alpaca': neither a template name")
    (tmp_path / "bad.json").write_text(json.dumps({"caption": "no image slot"}))
    _user_error(_run(runner, *common, "--out", tmp_path / "x", "--template", tmp_path / "bad.json"),
                "must contain {image} exactly once")
    assert not (tmp_path / "x").exists()
