"""The CUDA paths: training, 8/4-bit, evaluation, export, resume with the CUDA RNG state, and 2 GPUs.

Marked ``gpu`` and skipped where no CUDA device is visible; on a GPU machine ``scripts/gpu_check.sh`` (or
``python -m pytest -m gpu``) runs them, in a few minutes on one GPU. Nothing here forces a device: every
path must find the GPU by itself (accelerate's device), as a user's run does.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import StopHere, stop_at
from safetensors.torch import load_file

from vpgtrans.bundle import CONNECTOR_FILE, load_model
from vpgtrans.checkpoint import list_checkpoints
from vpgtrans.config import TrainConfig
from vpgtrans.stages import train as train_module
from vpgtrans.training import RunOptions

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# Dropout in the trained Q-Former (the CUDA RNG matters), 2 micro-batches a step, crossing an epoch.
FINETUNE = dict(max_steps=6, batch_size=4, grad_accum=2, log_every=1)


@pytest.fixture
def spy_model(monkeypatch):
    """The model a training stage loads (to see where it was put)."""
    captured = {}
    real = train_module.load_model

    def spy(*args, **kwargs):
        captured["model"] = real(*args, **kwargs)
        return captured["model"]

    monkeypatch.setattr(train_module, "load_model", spy)
    return captured


def _devices(module) -> set[str]:
    return {param.device.type for param in module.parameters()}


def test_a_training_stage_runs_on_the_gpu_by_itself(inherited, tiny, tmp_path, spy_model):
    out = train_module.warmup_projector(inherited, tiny["caption"], tmp_path / "w",
                                        TrainConfig.warmup(max_steps=2, batch_size=4))
    model = spy_model["model"]
    assert _devices(model.llm) == _devices(model.visual) == _devices(model.vision) == {"cuda"}
    before = load_file(str(inherited / CONNECTOR_FILE))["proj.weight"]
    after = load_file(str(out / CONNECTOR_FILE))["proj.weight"]
    assert after.device.type == "cpu" and not torch.allclose(before, after)  # trained, saved from the GPU


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantised_llm_is_placed_on_the_gpu_and_trains(inherited, tiny, tmp_path, spy_model, quantization):
    model = load_model(inherited, quantization=quantization)
    assert _devices(model.llm) == {"cuda"}
    options = RunOptions(load_in_8bit=quantization == "8bit", load_in_4bit=quantization == "4bit")
    out = train_module.warmup_projector(inherited, tiny["caption"], tmp_path / quantization,
                                        TrainConfig.warmup(max_steps=2, batch_size=4), options=options)
    assert _devices(spy_model["model"].llm) == {"cuda"}
    assert torch.isfinite(load_file(str(out / CONNECTOR_FILE))["proj.weight"]).all()


def test_eval_runs_on_the_gpu_without_being_told(inherited, tiny, tmp_path, monkeypatch):
    import vpgtrans.bundle
    from vpgtrans.evaluate import evaluate

    seen = {}
    real = vpgtrans.bundle.load_model

    def spy(*args, **kwargs):
        seen["model"] = real(*args, **kwargs)
        return seen["model"]

    monkeypatch.setattr(vpgtrans.bundle, "load_model", spy)
    report = evaluate(inherited, tiny["caption"], max_samples=4, out=tmp_path / "scores.json")
    assert _devices(seen["model"].llm) == _devices(seen["model"].visual) == {"cuda"}
    assert {"cider", "bleu4"} <= set(report["scores"])
    assert json.loads((tmp_path / "scores.json").read_text())["scores"] == report["scores"]


def test_export_of_a_gpu_trained_bundle_loads_in_transformers(inherited, tiny, tmp_path):
    from transformers import Blip2ForConditionalGeneration

    from vpgtrans.export import export_bundle

    out = train_module.warmup_projector(inherited, tiny["caption"], tmp_path / "w",
                                        TrainConfig.warmup(max_steps=2, batch_size=4))
    blip2 = Blip2ForConditionalGeneration.from_pretrained(export_bundle(out, tmp_path / "hf"))
    assert torch.equal(blip2.language_projection.weight, load_file(str(out / CONNECTOR_FILE))["proj.weight"])


def test_resume_restores_the_cuda_rng_state(inherited, tiny, tmp_path):
    config = TrainConfig.finetune(**FINETUNE)
    reference = train_module.finetune(inherited, tiny["caption"], tmp_path / "ref", config)

    with pytest.raises(StopHere):  # after step 5: checkpoints at steps 2 and 4
        train_module.finetune(inherited, tiny["caption"], tmp_path / "run", config, progress=stop_at(5),
                              options=RunOptions(save_every=2))
    (checkpoint,) = [c for c in list_checkpoints(tmp_path / "run") if c.name == "step-000004"]
    saved = json.loads((checkpoint / "state.json").read_text())["rng"][0]
    assert len(saved["cuda"]) == torch.cuda.device_count()  # every visible GPU's generator is kept
    result = train_module.finetune(inherited, tiny["caption"], tmp_path / "run", config,
                                   options=RunOptions(save_every=2, resume=True))
    # Dropout masks drawn from a wrong CUDA generator would move the weights far more than this (GPU kernels
    # are not bit-reproducible across runs without torch.use_deterministic_algorithms).
    for name in ("vpg.safetensors", CONNECTOR_FILE):
        ours, theirs = load_file(str(result / name)), load_file(str(reference / name))
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0, msg=f"{name}:{key}")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_torchrun_on_two_gpus_equals_one_gpu(inherited, tiny, tmp_path):
    from test_distributed import _assert_close_weights, _doc_command, _run

    paths = {"runs/inherit": inherited, "data/captions": tiny["caption"], "runs/warmup-2proc": tmp_path / "two"}
    argv = _doc_command("torchrun --nproc_per_node 2", paths)
    done = _run(argv)
    assert done.returncode == 0, done.stderr[-3000:]
    two = tmp_path / "two"
    config_record = json.loads((two / "manifest.json").read_text())["config"]
    assert config_record["num_processes"] == 2
    one = train_module.warmup_projector(inherited, tiny["caption"], tmp_path / "one",
                                        TrainConfig(**config_record["train"]))
    _assert_close_weights(one, two, atol=1e-5)
