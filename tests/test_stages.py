"""Training stages: what each one trains, what it leaves alone, what it records, the schedule and budgets."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from vpgtrans.bundle import CONNECTOR_FILE, MANIFEST, VPG_FILE, file_sha256, read_manifest
from vpgtrans.config import TrainConfig, to_dict
from vpgtrans.errors import VpgtransError
from vpgtrans.stages import train as train_module
from vpgtrans.training import lr_lambda, set_trainable, total_steps

STEPS, BATCH = 3, 4


def _hashes(bundle):
    return {p.name: file_sha256(p) for p in sorted(bundle.iterdir())}


def _run(stage, bundle, data, out, config, **kwargs):
    """Run a stage, capturing the model it trained and the lr of every optimizer step."""
    captured, lrs = {}, []
    real_load, real_adamw = train_module.load_model, torch.optim.AdamW

    def load_and_capture(*args, **kw):
        captured["model"] = real_load(*args, **kw)
        return captured["model"]

    class RecordingAdamW(real_adamw):
        def step(self, closure=None):
            lrs.append(self.param_groups[0]["lr"])
            return super().step(closure)

    before = _hashes(bundle)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "load_model", load_and_capture)
        mp.setattr(torch.optim, "AdamW", RecordingAdamW)
        result = stage(bundle, data, out, config, **kwargs)
    return {"out": result, "model": captured["model"], "lrs": lrs, "input_before": before, "input_after": _hashes(bundle),
            "input": bundle, "config": config}


@pytest.fixture(scope="module")
def warmed(inherited, tiny, tmp_path_factory):
    config = TrainConfig.warmup(max_steps=STEPS, batch_size=BATCH)
    return _run(train_module.warmup_projector, inherited, tiny["caption"], tmp_path_factory.mktemp("stages") / "warmup",
                config)


@pytest.fixture(scope="module")
def finetuned(warmed, tiny, tmp_path_factory):
    config = TrainConfig.finetune(max_steps=STEPS, batch_size=BATCH, grad_accum=2)
    return _run(train_module.finetune, warmed["out"], tiny["caption"], tmp_path_factory.mktemp("stages") / "finetune",
                config)


def _tensors(bundle, name):
    return load_file(str(bundle / name))


def test_warmup_changes_only_the_connector(warmed):
    before, after = _tensors(warmed["input"], VPG_FILE), _tensors(warmed["out"], VPG_FILE)
    assert set(before) == set(after)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    old, new = _tensors(warmed["input"], CONNECTOR_FILE), _tensors(warmed["out"], CONNECTOR_FILE)
    assert set(old) == set(new) == {"proj.weight", "proj.bias"}
    assert not torch.equal(old["proj.weight"], new["proj.weight"])
    assert not torch.equal(old["proj.bias"], new["proj.bias"])


def test_finetune_changes_vpg_and_connector(finetuned):
    before, after = _tensors(finetuned["input"], VPG_FILE), _tensors(finetuned["out"], VPG_FILE)
    assert set(before) == set(after)
    for name in ("query_tokens", "ln_vision.weight", "qformer.layernorm.weight",
                 "qformer.encoder.layer.0.crossattention.attention.query.weight",
                 "qformer.encoder.layer.1.output_query.dense.weight"):
        assert not torch.equal(before[name], after[name]), name
    old, new = _tensors(finetuned["input"], CONNECTOR_FILE), _tensors(finetuned["out"], CONNECTOR_FILE)
    assert not torch.equal(old["proj.weight"], new["proj.weight"])


@pytest.mark.parametrize("run_name", ["warmed", "finetuned"])
def test_vit_and_llm_stay_frozen_and_unchanged(run_name, request, tiny):
    run = request.getfixturevalue(run_name)
    model = run["model"]
    assert not any(p.requires_grad for p in model.llm.parameters())
    assert not any(p.requires_grad for p in model.vision.parameters())
    for name, tensor in load_file(str(tiny["llama"] / "model.safetensors")).items():
        assert torch.equal(model.llm.state_dict()[name], tensor), name
    vision = model.vision.state_dict()
    for name, tensor in load_file(str(tiny["source"] / "model.safetensors")).items():
        if name.startswith("vision_model.") and "post_layernorm" not in name:
            assert torch.equal(vision[name[len("vision_model."):]], tensor), name
    train = read_manifest(run["out"])["metrics"]["train"]
    connector = sum(p.numel() for p in model.visual.connector.parameters())
    vpg = sum(p.numel() for p in model.visual.vpg.parameters())
    assert train["llm_trainable"] == 0
    assert train["trainable"] == (connector if run_name == "warmed" else connector + vpg)
    assert train["trainable"] + train["frozen"] == sum(p.numel() for p in model.parameters())


def test_set_trainable_counts(inherited):
    from vpgtrans.bundle import load_model

    model = load_model(inherited)
    llm = sum(p.numel() for p in model.llm.parameters())
    vision = sum(p.numel() for p in model.vision.parameters())
    vpg = sum(p.numel() for p in model.visual.vpg.parameters())
    connector = sum(p.numel() for p in model.visual.connector.parameters())
    assert set_trainable(model, ["connector"]) == {"trainable": connector, "frozen": llm + vision + vpg,
                                                    "llm_trainable": 0}
    assert not any(p.requires_grad for p in model.visual.vpg.parameters())
    assert set_trainable(model, ["vpg", "connector"]) == {"trainable": vpg + connector, "frozen": llm + vision,
                                                           "llm_trainable": 0}


@pytest.mark.parametrize("run_name", ["warmed", "finetuned"])
def test_input_bundle_is_never_modified(run_name, request):
    run = request.getfixturevalue(run_name)
    assert run["input_after"] == run["input_before"]


@pytest.mark.parametrize("run_name, stage", [("warmed", "warmup"), ("finetuned", "finetune")])
def test_output_manifest_records_lineage_and_budget(run_name, stage, request, tiny):
    run = request.getfixturevalue(run_name)
    out, parent = run["out"], run["input"]
    assert {p.name for p in out.iterdir()} == {MANIFEST, VPG_FILE, CONNECTOR_FILE, "metrics.jsonl"}
    manifest, parent_manifest = read_manifest(out), read_manifest(parent)
    assert manifest["stage"] == stage
    assert manifest["parent"] == {"path": str(parent.resolve()), "manifest_sha256": file_sha256(parent / MANIFEST)}
    assert manifest["references"] == parent_manifest["references"]
    assert manifest["model"] == parent_manifest["model"]
    assert manifest["template"] == parent_manifest["template"]
    assert manifest["config"]["train"] == to_dict(run["config"])
    assert manifest["config"]["parent_config"] == parent_manifest["config"]
    assert manifest["config"]["task"] == "caption"
    train = manifest["metrics"]["train"]
    assert train["steps"] == STEPS and len(run["lrs"]) == STEPS
    assert train["samples"] == STEPS * BATCH
    assert train["epochs"] == pytest.approx(STEPS * BATCH / 24)
    assert math.isfinite(train["final_loss"])
    assert manifest["data"]["rows"] == 24 and manifest["data"]["skipped_missing_image"] == 0
    assert manifest["curve"] == []


def test_lr_actually_used_per_step(warmed, finetuned):
    assert warmed["lrs"] == pytest.approx([5e-4] * STEPS)  # constant, no warm-up
    lrs = finetuned["lrs"]
    assert lrs[0] == pytest.approx(1e-4)
    assert lrs[-1] == pytest.approx(5e-5)
    assert lrs[0] > lrs[1] > lrs[2]


def test_lr_lambda_matches_the_formula():
    warmup = TrainConfig.warmup()
    assert [lr_lambda(warmup, 10)(s) for s in range(12)] == [1.0] * 12
    finetune = TrainConfig.finetune()
    total = 11
    f = lr_lambda(finetune, total)
    for step in range(total):
        expected = 5e-5 + (1e-4 - 5e-5) * 0.5 * (1 + math.cos(math.pi * step / (total - 1)))
        assert finetune.lr * f(step) == pytest.approx(expected, rel=1e-12)
    assert finetune.lr * f(total - 1) == pytest.approx(5e-5)  # the last optimizer step runs at min_lr
    assert finetune.lr * f(total + 5) == pytest.approx(5e-5)  # never below the floor
    assert lr_lambda(finetune, 1)(0) == 1.0  # a one-step run uses the peak lr
    warm = TrainConfig.finetune(warmup_steps=4)
    g = lr_lambda(warm, 14)
    assert [g(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert g(4) == pytest.approx(1.0) and g(13) == pytest.approx(0.5)


def test_total_steps_budgets():
    assert total_steps(TrainConfig(max_steps=7, max_samples=1000, batch_size=4), 24) == 7
    assert total_steps(TrainConfig(max_samples=10, batch_size=4), 24) == 3  # ceil(10 / 4)
    assert total_steps(TrainConfig(max_samples=12, batch_size=4, grad_accum=2), 24) == 3  # samples, not micro-batches
    assert total_steps(TrainConfig(epochs=1.0, batch_size=8), 24) == 3
    assert total_steps(TrainConfig(epochs=2.5, batch_size=8), 24) == 8  # ceil(60 / 8)
    assert total_steps(TrainConfig(epochs=0.01, batch_size=8), 24) == 1


@pytest.fixture(scope="module")
def equal_length_data(tiny, tmp_path_factory):
    """The caption images, all captioned "a red circle": every sample has the same number of target tokens."""
    data = tmp_path_factory.mktemp("equal") / "data"
    shutil.copytree(tiny["caption"], data)
    rows = [json.loads(line) for line in (data / "data.jsonl").read_text().splitlines()]
    (data / "data.jsonl").write_text("".join(json.dumps({**r, "caption": "a red circle"}) + "\n" for r in rows))
    return data


def test_grad_accum_gives_the_same_update(inherited, equal_length_data, tmp_path):
    outs = {}
    for accum in (1, 2, 4):
        config = TrainConfig.warmup(max_steps=2, batch_size=4, grad_accum=accum)
        outs[accum] = train_module.warmup_projector(inherited, equal_length_data, tmp_path / f"accum{accum}", config)
    start = _tensors(inherited, CONNECTOR_FILE)["proj.weight"]
    reference = _tensors(outs[1], CONNECTOR_FILE)
    assert not torch.equal(reference["proj.weight"], start)
    for accum in (2, 4):
        other = _tensors(outs[accum], CONNECTOR_FILE)
        for name in reference:
            torch.testing.assert_close(other[name], reference[name], atol=2e-6, rtol=1e-4)
        assert read_manifest(outs[accum])["metrics"]["train"]["samples"] == 8


def test_train_from_scratch_reinitialises(inherited, tiny, tmp_path):
    config = TrainConfig.finetune(max_steps=1, batch_size=4)
    out = train_module.train_from_scratch(inherited, tiny["caption"], tmp_path / "scratch", config)
    manifest = read_manifest(out)
    assert manifest["stage"] == "scratch" and manifest["config"]["fresh_init"] is True
    source, fresh = _tensors(inherited, VPG_FILE), _tensors(out, VPG_FILE)
    query = fresh["query_tokens"]
    assert query.std() > 1e-3  # not HF's zeros, not the 1e-10 initializer_range
    assert not torch.allclose(query, source["query_tokens"], atol=1e-3)
    for name in source:
        if name.endswith("weight") and source[name].ndim == 2:
            assert not torch.allclose(fresh[name], source[name], atol=1e-3), name
    connector = _tensors(out, CONNECTOR_FILE)["proj.weight"]
    assert not torch.allclose(connector, _tensors(inherited, CONNECTOR_FILE)["proj.weight"], atol=1e-3)
    assert 0.005 < connector.std() < 0.05  # N(0, 0.02) after one small step


def test_stage_refuses_bad_outputs(inherited, tiny, tmp_path):
    config = TrainConfig.warmup(max_steps=1, batch_size=4)
    with pytest.raises(VpgtransError, match="must differ from the input bundle"):
        train_module.warmup_projector(inherited, tiny["caption"], inherited, config)
    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(VpgtransError, match="already exists"):
        train_module.warmup_projector(inherited, tiny["caption"], existing, config)
    with pytest.raises(VpgtransError, match="not a vpgtrans bundle"):
        train_module.warmup_projector(tiny["llama"], tiny["caption"], tmp_path / "x", config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


# --- evaluation during training (needs vpgtrans.metrics) ---------------------------------------------

def _eval_config(make, **kw):
    return make(max_steps=2, batch_size=4, eval_every=1, eval_max_samples=4, max_new_tokens=2, **kw)


def test_eval_every_records_a_curve(inherited, tiny, tmp_path):
    out = train_module.warmup_projector(inherited, tiny["vqa"], tmp_path / "w", _eval_config(TrainConfig.warmup),
                                        eval_data=tiny["vqa"])
    manifest = read_manifest(out)
    curve = manifest["curve"]
    assert [(p["step"], p["samples"]) for p in curve] == [(0, 0), (1, 4), (2, 8)]
    metric_keys = set(curve[0]) - {"step", "samples"}
    assert metric_keys, "eval points carry scores"
    for point in curve:
        assert set(point) - {"step", "samples"} == metric_keys
        for key in metric_keys:
            assert isinstance(point[key], (int, float)) and math.isfinite(point[key])
    assert manifest["metrics"]["eval"] == {k: curve[-1][k] for k in metric_keys}
    assert manifest["config"]["eval_data"] == str(tiny["vqa"].resolve())
    # The training wall time at each point (evaluations left out): from 0, growing, within the stage's total.
    train = manifest["metrics"]["train"]
    times = train["curve_seconds"]
    assert len(times) == len(curve) and times[0] < 0.5 and times == sorted(times)
    assert times[-1] <= train["train_seconds"] + 0.01 and train["train_seconds"] <= train["seconds"]


def test_transfer_writes_every_stage_and_a_cumulative_curve(tiny, tmp_path):
    from vpgtrans.stages.transfer import transfer

    out = tmp_path / "run"
    summary = transfer(tiny["source"], tiny["llama"], tiny["caption"], out,
                       warmup_config=_eval_config(TrainConfig.warmup),
                       finetune_config=_eval_config(TrainConfig.finetune), eval_data=tiny["caption"])
    assert {p.name for p in out.iterdir()} == {"inherit", "warmup", "finetune", "transfer.json"}
    assert read_manifest(out / "inherit")["stage"] == "inherit"
    assert read_manifest(out / "warmup")["parent"]["path"] == str((out / "inherit").resolve())
    assert read_manifest(out / "finetune")["parent"]["path"] == str((out / "warmup").resolve())
    saved = json.loads((out / "transfer.json").read_text())
    assert saved["stages"] == {"inherit": str(out / "inherit"), "warmup": str(out / "warmup"),
                               "finetune": str(out / "finetune")}
    assert saved["final_bundle"] == str(out / "finetune")
    curve = saved["curve"]
    assert [(p["stage"], p["step"], p["samples"]) for p in curve] == [
        ("warmup", 0, 0), ("warmup", 1, 4), ("warmup", 2, 8), ("finetune", 3, 12), ("finetune", 4, 16)]
    finetune_curve = read_manifest(out / "finetune")["curve"]
    assert {k: v for k, v in curve[-1].items() if k not in ("stage", "step", "samples")} == \
        {k: v for k, v in finetune_curve[-1].items() if k not in ("step", "samples")}
    assert saved["metrics"]["warmup"]["train"]["steps"] == 2 and saved["metrics"]["finetune"]["train"]["steps"] == 2
    assert summary["curve"] == curve
    # Training seconds on the same cumulative axis: the fine-tune's own, offset by the whole warm-up's.
    warmup, finetune = (saved["metrics"][name]["train"] for name in ("warmup", "finetune"))
    assert saved["curve_seconds"] == warmup["curve_seconds"] + [
        round(t + warmup["train_seconds"], 3) for t in finetune["curve_seconds"][1:]]


def test_transfer_without_eval_and_from_scratch(tiny, tmp_path):
    from vpgtrans.stages.transfer import transfer

    config = TrainConfig.finetune(max_steps=1, batch_size=4)
    out = tmp_path / "scratch-run"
    summary = transfer(tiny["source"], tiny["llama"], tiny["caption"], out, finetune_config=config, from_scratch=True)
    assert {p.name for p in out.iterdir()} == {"inherit", "scratch", "transfer.json"}
    assert summary["arm"] == "scratch" and summary["curve"] == []
    assert summary["config"]["inherit"]["converter"] == "none"  # the weights are re-initialised anyway
    assert read_manifest(out / "scratch")["stage"] == "scratch"
    with pytest.raises(VpgtransError, match="already exists"):
        transfer(tiny["source"], tiny["llama"], tiny["caption"], out, finetune_config=config, from_scratch=True)
