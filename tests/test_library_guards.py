"""The library (not only the CLI) keeps the promises: grounding eval during training, --force limits
in run_stage / transfer, and the remote-code refusal in read_target_llm."""

from __future__ import annotations

import json

import pytest

from vpgtrans.config import TrainConfig
from vpgtrans.errors import VpgtransError
from vpgtrans.grounding import grounding_accuracy
from vpgtrans.stages.train import warmup_projector
from vpgtrans.stages.transfer import transfer

from test_grounding import GOOD, _grounding_data
from test_security import _custom_code_llm

TINY = dict(max_steps=2, batch_size=3, eval_every=1)


def test_training_on_grounding_records_a_grounding_curve(inherited, tmp_path):
    data = _grounding_data(tmp_path / "g", GOOD)
    out = warmup_projector(inherited, data, tmp_path / "warm", TrainConfig.warmup(**TINY, max_new_tokens=3),
                           eval_data=data)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [p["step"] for p in manifest["curve"]] == [0, 1, 2]
    assert set(manifest["curve"][-1]) == {"step", "samples", "acc_iou50", "mean_iou", "parsed", "unparseable"}
    assert 0.0 <= manifest["metrics"]["eval"]["mean_iou"] <= 1.0


def test_run_stage_force_never_replaces_user_files(inherited, tiny, tmp_path):
    user = tmp_path / "thesis"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    (user / "metrics.jsonl").write_text("my own measurements\n")  # a name a training run also writes
    with pytest.raises(VpgtransError, match="is not a vpgtrans output"):
        warmup_projector(inherited, tiny["caption"], user, TrainConfig.warmup(max_steps=1, batch_size=2), force=True)
    assert sorted(p.name for p in user.iterdir()) == ["metrics.jsonl", "thesis.tex"]
    assert (user / "metrics.jsonl").read_text() == "my own measurements\n"
    with pytest.raises(VpgtransError, match="is inside an input"):
        warmup_projector(inherited, tiny["caption"], inherited / "nested", TrainConfig.warmup(max_steps=1), force=True)
    assert not (inherited / "nested").exists()


def test_transfer_force_never_replaces_user_files(tiny, tmp_path):
    user = tmp_path / "results"
    user.mkdir()
    (user / "notes.md").write_text("keep me")
    with pytest.raises(VpgtransError, match="is not a vpgtrans output"):
        transfer(tiny["source"], tiny["llama"], tiny["caption"], user, force=True)
    assert [p.name for p in user.iterdir()] == ["notes.md"]


def test_read_target_llm_refuses_custom_code_naming_the_flag(tiny, tmp_path):
    from vpgtrans.stages.inherit import read_target_llm

    marker = tmp_path / "PWNED"
    llm = _custom_code_llm(tmp_path / "custom", marker, "vpgtrans_custom", tiny["llama"])
    with pytest.raises(VpgtransError, match="trust_remote_code=True"):
        read_target_llm(llm)
    assert not marker.exists()


def test_grounding_scores_match_the_metric(tmp_path):
    # the training curve uses the same scorer as `vpgtrans eval`
    from vpgtrans.evaluate import score

    boxes = [row["box"] for row in GOOD]
    predictions = ["0,0.125,0.375,0.625", "nonsense", "0.25,0.125,0.625,0.625"]
    assert score("grounding", predictions, boxes) == grounding_accuracy(predictions, boxes)


@pytest.mark.parametrize("env, flags, message", [
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, [], "DeepSpeed launches are not supported"),
    ({"ACCELERATE_USE_FSDP": "true"}, [], "FSDP needs fsdp_version: 2"),  # accelerate's default is version 1
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, [], "FSDP needs fsdp_version: 2"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, ["--load-in-8bit"], "--load-in-8bit cannot be combined with FSDP"),
])
def test_unsupported_engines_are_refused_before_anything_is_written(inherited, tiny, tmp_path, monkeypatch, env, flags,
                                                                     message):
    # accelerate launch sets these from its config. FSDP version 1 flattens frozen and trained weights into
    # one tensor; ZeRO-3 would save one process's shard; bitsandbytes weights are not sharded by FSDP.
    from typer.testing import CliRunner

    from vpgtrans.cli import app

    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    out = tmp_path / "warm"
    result = CliRunner().invoke(app, ["warmup-projector", str(inherited), "--data", str(tiny["caption"]),
                                      "--out", str(out), "--max-steps", "1", "--batch-size", "2", *flags])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1, result.stderr
    assert not out.exists()


def test_fsdp_asked_where_accelerate_does_not_shard_runs_unsharded_and_says_so(inherited, tiny, tmp_path, monkeypatch,
                                                                                  caplog):
    # accelerate sets FSDP up only for several GPU-like processes; on one CPU process it is a plain run,
    # and the bundle must not claim otherwise.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    out = warmup_projector(inherited, tiny["caption"], tmp_path / "warm", TrainConfig.warmup(max_steps=1, batch_size=2))
    assert "FSDP was asked for" in caplog.text and "1-process run is not sharded" in caplog.text
    assert json.loads((out / "manifest.json").read_text())["config"]["run"]["engine"] == "ddp"


def _eval(*args):
    from typer.testing import CliRunner

    from vpgtrans.cli import app

    return CliRunner().invoke(app, ["eval", *map(str, args)])


def test_eval_with_a_device_map_or_quantised_llm(inherited, tiny, monkeypatch):
    # device_map spreads an LLM too large for one device (accelerate's big-model loading); on this CPU
    # "auto" places everything on the CPU, so the scores must equal a plain load's exactly.
    from transformers import AutoModelForCausalLM

    asked = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        asked.append(kwargs.get("device_map"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    common = [inherited, "--data", tiny["vqa"], "--task", "vqa", "--max-samples", "6", "--max-new-tokens", "3", "--json"]
    plain = _eval(*common)
    assert plain.exit_code == 0, plain.output
    mapped = _eval(*common, "--device-map", "auto")
    assert mapped.exit_code == 0, mapped.output
    assert json.loads(mapped.stdout)["scores"] == json.loads(plain.stdout)["scores"]
    assert asked == [None, "auto"]  # the map reached transformers' loader
    quantised = _eval(*common, "--load-in-8bit")
    assert quantised.exit_code == 0, quantised.output
    assert json.loads(quantised.stdout)["scores"]["n"] == 6


def test_eval_runs_the_llm_in_the_asked_dtype(inherited, tiny, monkeypatch):
    import torch

    import vpgtrans.bundle as bundle

    seen = {}
    real = bundle.load_model

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        seen["llm"] = next(model.llm.parameters()).dtype
        return model

    monkeypatch.setattr(bundle, "load_model", spy)
    result = _eval(inherited, "--data", tiny["caption"], "--max-samples", "2", "--max-new-tokens", "2", "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    assert seen["llm"] == torch.bfloat16
    bad = _eval(inherited, "--data", tiny["caption"], "--dtype", "int3")
    assert bad.exit_code == 2 and "--dtype must be one of fp32, bf16, fp16" in bad.stderr
