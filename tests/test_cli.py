"""The command line: happy paths write the expected files; bad input is one line, exit code 2, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from vpgtrans.bundle import CONNECTOR_FILE, CONVERTER_FILE, MANIFEST, VPG_FILE, read_manifest
from vpgtrans.cli import app

BUNDLE = {MANIFEST, VPG_FILE, CONNECTOR_FILE}
TRAINED = BUNDLE | {"metrics.jsonl"}  # training stages also write their metrics log
TINY_BUDGET = ["--max-steps", "2", "--batch-size", "4"]


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


def _run(runner, *args):
    return runner.invoke(app, [str(a) for a in args])


def _ok(result):
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result


def _user_error(result, *fragments):
    """Exit code 2, exactly one line "error: ..." on stderr, no traceback anywhere."""
    assert result.exit_code == 2, f"{result.output}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _names(path):
    return {p.name for p in path.iterdir()}


def test_help_lists_the_commands(runner):
    result = _ok(_run(runner, "--help"))
    for name in ("inherit", "warmup-projector", "finetune", "transfer", "eval", "export", "inspect"):
        assert name in result.stdout


def test_help_does_not_import_torch():
    code = "import sys, vpgtrans.cli; print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- happy paths ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_bundles(runner, tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    results = {"inherit": _run(runner, "inherit", "--source", tiny["source"], "--target-llm", tiny["llama"],
                               "--out", root / "inherit")}
    results["warmup"] = _run(runner, "warmup-projector", root / "inherit", "--data", tiny["caption"],
                             "--out", root / "warmup", *TINY_BUDGET)
    results["finetune"] = _run(runner, "finetune", root / "warmup", "--data", tiny["vqa"], "--out", root / "finetune",
                               *TINY_BUDGET, "--grad-accum", "2", "--lr", "2e-4")
    return root, results


def test_inherit_command(cli_bundles):
    root, results = cli_bundles
    result = _ok(results["inherit"])
    assert _names(root / "inherit") == BUNDLE | {CONVERTER_FILE}
    assert "held-out cosine" in result.stdout
    assert f"bundle written to {root / 'inherit'}" in result.stdout
    assert read_manifest(root / "inherit")["stage"] == "inherit"


def test_warmup_projector_command(cli_bundles):
    root, results = cli_bundles
    result = _ok(results["warmup"])
    assert _names(root / "warmup") == TRAINED
    manifest = read_manifest(root / "warmup")
    assert manifest["stage"] == "warmup"
    assert manifest["metrics"]["train"]["steps"] == 2 and manifest["metrics"]["train"]["samples"] == 8
    train = manifest["config"]["train"]
    assert (train["lr"], train["min_lr"], train["trainable"]) == (5e-4, None, ["connector"])
    assert "warmup: 2 steps" in result.stdout and f"bundle written to {root / 'warmup'}" in result.stdout


def test_finetune_command(cli_bundles):
    root, results = cli_bundles
    _ok(results["finetune"])
    assert _names(root / "finetune") == TRAINED
    manifest = read_manifest(root / "finetune")
    assert manifest["stage"] == "finetune" and manifest["config"]["task"] == "vqa"
    train = manifest["config"]["train"]
    assert (train["lr"], train["min_lr"], train["grad_accum"], train["batch_size"]) == (2e-4, 1e-4, 2, 4)
    assert train["trainable"] == ["vpg", "connector"]
    assert manifest["parent"]["path"] == str((root / "warmup").resolve())


def test_finetune_from_scratch_command(runner, cli_bundles, tiny, tmp_path):
    root, _ = cli_bundles
    _ok(_run(runner, "finetune", root / "inherit", "--data", tiny["caption"], "--out", tmp_path / "s",
             "--from-scratch", "--max-steps", "1", "--batch-size", "4"))
    assert read_manifest(tmp_path / "s")["stage"] == "scratch"


def test_transfer_command(runner, tiny, tmp_path):
    out = tmp_path / "run"
    result = _ok(_run(runner, "transfer", "--source", tiny["source"], "--target-llm", tiny["opt"], "--data",
                      tiny["caption"], "--out", out, *TINY_BUDGET, "--finetune-max-steps", "1"))
    assert _names(out) == {"inherit", "warmup", "finetune", "transfer.json"}
    assert _names(out / "inherit") == BUNDLE | {CONVERTER_FILE}
    assert _names(out / "warmup") == _names(out / "finetune") == TRAINED
    summary = json.loads((out / "transfer.json").read_text())
    assert summary["metrics"]["warmup"]["train"]["steps"] == 2
    assert summary["metrics"]["finetune"]["train"]["steps"] == 1
    assert read_manifest(out / "finetune")["model"]["llm"]["model_type"] == "opt"
    assert f"summary written to {out / 'transfer.json'}" in result.stdout


def test_force_replaces_output_and_leaves_nothing_beside_it(runner, tiny, tmp_path):
    out = tmp_path / "bundle"
    args = ["inherit", "--source", tiny["source"], "--target-llm", tiny["llama"], "--out", out, "--converter", "none"]
    _ok(_run(runner, *args))
    (out / "stale.txt").write_text("from an older run")
    first = read_manifest(out)["created"]
    _user_error(_run(runner, *args), "already exists", "--force")
    assert "stale.txt" in _names(out)
    _ok(_run(runner, *args, "--force"))
    assert _names(out) == BUNDLE
    assert _names(tmp_path) == {"bundle"}
    assert read_manifest(out)["created"] >= first


# --- user errors: exit 2, one line, no traceback, nothing written -----------------------------------

def _inherit(runner, source, target, out):
    return _run(runner, "inherit", "--source", source, "--target-llm", target, "--out", out)


def test_missing_source(runner, tiny, tmp_path):
    _user_error(_inherit(runner, tmp_path / "nope", tiny["llama"], tmp_path / "out"), "no such file or directory")
    assert not (tmp_path / "out").exists()


def test_directory_that_is_no_model(runner, tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    _user_error(_inherit(runner, tmp_path / "empty", tiny["llama"], tmp_path / "out"), "not a model")
    assert _names(tmp_path) == {"empty"}


def test_pth_without_state_dict(runner, tiny, tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pth")
    _user_error(_inherit(runner, tmp_path / "list.pth", tiny["llama"], tmp_path / "out"), "list.pth")
    assert _names(tmp_path) == {"list.pth"}


def test_target_llm_that_is_a_blip2(runner, tiny, tmp_path):
    _user_error(_inherit(runner, tiny["source"], tiny["source"], tmp_path / "out"), "--target-llm", "hf-blip2")
    assert not (tmp_path / "out").exists()


def test_bogus_converter(runner, tiny, tmp_path):
    _user_error(_run(runner, "inherit", "--source", tiny["source"], "--target-llm", tiny["llama"],
                     "--out", tmp_path / "out", "--converter", "bogus"), "bogus")
    assert not (tmp_path / "out").exists()


def _data_dir(path, rows):
    path.mkdir()
    (path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("rows", [[], [{"image": f"images/{i}.png", "caption": "a red circle"} for i in range(5)]],
                         ids=["zero-rows", "all-images-missing"])
@pytest.mark.parametrize("command", ["warmup-projector", "finetune"])
def test_unusable_data(runner, inherited, tmp_path, rows, command):
    data = _data_dir(tmp_path / "data", rows)
    line = _user_error(_run(runner, command, inherited, "--data", data, "--out", tmp_path / "out", *TINY_BUDGET),
                       "no usable rows")
    if rows:
        assert "missing images: 5" in line
    assert _names(tmp_path) == {"data"}


def test_existing_out_without_force(runner, inherited, tiny, tmp_path):
    (tmp_path / "out").mkdir()
    _user_error(_run(runner, "warmup-projector", inherited, "--data", tiny["caption"], "--out", tmp_path / "out",
                     *TINY_BUDGET), "already exists")
    assert _names(tmp_path / "out") == set()
    _user_error(_inherit(runner, tiny["source"], tiny["llama"], tmp_path / "out"), "already exists")
    assert _names(tmp_path / "out") == set()


@pytest.mark.parametrize("command", ["warmup-projector", "finetune"])
def test_batch_not_divisible_by_grad_accum(runner, inherited, tiny, tmp_path, command):
    _user_error(_run(runner, command, inherited, "--data", tiny["caption"], "--out", tmp_path / "out",
                     "--batch-size", "6", "--grad-accum", "4"), "batch_size 6 must be divisible by grad_accum 4")
    assert not (tmp_path / "out").exists()


def test_transfer_with_bad_inputs_writes_nothing(runner, tiny, tmp_path):
    _user_error(_run(runner, "transfer", "--source", tiny["source"], "--target-llm", tiny["llama"],
                     "--data", tmp_path / "missing", "--out", tmp_path / "out", *TINY_BUDGET), "missing")
    assert not (tmp_path / "out").exists()
    _user_error(_run(runner, "transfer", "--source", tiny["source"], "--target-llm", tiny["llama"],
                     "--data", tiny["caption"], "--out", tmp_path / "out", "--batch-size", "6", "--grad-accum", "4"),
                "divisible")
    assert not (tmp_path / "out").exists()


def test_transfer_checks_models_before_creating_out(runner, tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    _user_error(_run(runner, "transfer", "--source", tmp_path / "empty", "--target-llm", tiny["llama"],
                     "--data", tiny["caption"], "--out", tmp_path / "out", *TINY_BUDGET), "not a model")
    assert not (tmp_path / "out").exists()
    _user_error(_run(runner, "transfer", "--source", tiny["source"], "--target-llm", tiny["source"],
                     "--data", tiny["caption"], "--out", tmp_path / "out", *TINY_BUDGET), "--target-llm")
    assert not (tmp_path / "out").exists()


def test_stage_on_a_non_bundle(runner, tiny, tmp_path):
    _user_error(_run(runner, "warmup-projector", tiny["llama"], "--data", tiny["caption"], "--out", tmp_path / "out",
                     *TINY_BUDGET), "not a vpgtrans bundle")
    assert not (tmp_path / "out").exists()


def test_eval_bogus_task(runner, inherited, tiny, tmp_path):
    _user_error(_run(runner, "eval", inherited, "--data", tiny["caption"], "--task", "bogus",
                     "--out", tmp_path / "scores.json"), "--task", "bogus")
    assert not (tmp_path / "scores.json").exists()


def test_eval_command_writes_scores_outside_the_bundle(runner, inherited, tiny, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in inherited.iterdir()}
    out = tmp_path / "scores.json"
    result = _ok(_run(runner, "eval", inherited, "--data", tiny["vqa"], "--max-samples", "4", "--max-new-tokens", "2",
                      "--out", out))
    report = json.loads(out.read_text())
    assert report["task"] == "vqa" and len(report["samples"]) == 4
    assert report["bundle"] == str(inherited.resolve())
    assert result.stdout.startswith("vqa: ")
    assert {p.name: p.stat().st_mtime_ns for p in inherited.iterdir()} == before
    _user_error(_run(runner, "eval", inherited, "--data", tiny["vqa"], "--out", out), "already exists")
