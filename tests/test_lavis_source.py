"""A LAVIS / VPGTrans ``.pth`` source end to end on the CLI: inspect, inherit, transfer, eval, export —
and the bundle it gives is the one the equivalent HF BLIP-2 directory gives, tensor for tensor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from vpgtrans.bundle import CONNECTOR_FILE, CONVERTER_FILE, MANIFEST, VPG_FILE, read_manifest
from vpgtrans.cli import app

BUDGET = ["--max-steps", "2", "--batch-size", "4"]


@pytest.fixture(scope="module")
def lavis_source(tiny, tmp_path_factory):
    """The tiny HF BLIP-2 split as a LAVIS user has it: a ``.pth`` with only the VPG and ``opt_proj``
    (as LAVIS saves a stage-2 model), the source OPT as its own HF directory, the ViT in the BLIP-2 dir."""
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    from vpgtrans.formats import lavis
    from vpgtrans.formats.hf import read_config, read_tensors

    root = tmp_path_factory.mktemp("lavis-source")
    state = read_tensors(tiny["source"])
    vpg = {k: v for k, v in state.items() if not k.startswith(("language_model.", "vision_model."))}
    vpg.update({k: v for k, v in state.items() if k.startswith("vision_model.post_layernorm.")})
    pth = lavis.save_pth(lavis.hf_to_lavis(vpg, projection_prefix="opt_proj"), root / "blip2 opt stage2.pth")

    llm = OPTForCausalLM(OPTConfig(**read_config(tiny["source"])["text_config"]))
    result = llm.load_state_dict({k.removeprefix("language_model."): v for k, v in state.items()
                                  if k.startswith("language_model.")}, strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys  # OPT ties lm_head
    llm.tie_weights()
    llm.save_pretrained(root / "source-opt")
    AutoTokenizer.from_pretrained(tiny["source"]).save_pretrained(root / "source-opt")
    return {"pth": pth, "source_llm": root / "source-opt", "vision": tiny["source"]}


def _ok(runner, *args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result


def test_inspect_pth_reads_the_vpg(tiny, lavis_source):
    info = json.loads(_ok(CliRunner(), "inspect", lavis_source["pth"], "--json").stdout)
    assert info["format"] == "lavis-pth"
    assert info["vpg"]["num_query_tokens"] == 4
    assert info["projector"]["in"] == 64 and info["projector"]["out"] == 48


def test_pth_source_inherits_the_same_bundle_as_the_hf_source(tiny, lavis_source, tmp_path):
    runner = CliRunner()
    _ok(runner, "inherit", "--source", tiny["source"], "--target-llm", tiny["llama"], "--out", tmp_path / "from-hf")
    _ok(runner, "inherit", "--source", lavis_source["pth"], "--vision", lavis_source["vision"],
        "--source-llm", lavis_source["source_llm"], "--target-llm", tiny["llama"], "--out", tmp_path / "from-pth")
    for name in (VPG_FILE, CONNECTOR_FILE, CONVERTER_FILE):
        from_hf, from_pth = load_file(tmp_path / "from-hf" / name), load_file(tmp_path / "from-pth" / name)
        assert from_hf.keys() == from_pth.keys(), name
        for key in from_hf:
            # LAVIS ln_vision and HF post_layernorm are the same tensors; everything must survive the trip.
            assert torch.equal(from_hf[key], from_pth[key]), f"{name}:{key}"
    manifest = read_manifest(tmp_path / "from-pth")
    assert manifest["references"]["vision"]["path"] == str(lavis_source["vision"].resolve())
    assert manifest["model"]["visual"]["vpg"]["qformer_config"]["num_hidden_layers"] == 2


def test_pth_without_source_llm_needs_converter_none(tiny, lavis_source, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["inherit", "--source", str(lavis_source["pth"]), "--vision", str(lavis_source["vision"]),
                                 "--target-llm", str(tiny["llama"]), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "--source-llm" in result.stderr
    assert not (tmp_path / "out").exists()
    _ok(runner, "inherit", "--source", lavis_source["pth"], "--vision", lavis_source["vision"], "--converter", "none",
        "--target-llm", tiny["llama"], "--out", tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {MANIFEST, VPG_FILE, CONNECTOR_FILE}


def test_pth_source_transfer_eval_and_both_exports(tiny, lavis_source, tmp_path):
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    from vpgtrans.formats.lavis import load_pth

    runner = CliRunner()
    _ok(runner, "transfer", "--source", lavis_source["pth"], "--vision", lavis_source["vision"],
        "--source-llm", lavis_source["source_llm"], "--target-llm", tiny["opt"], "--data", tiny["caption"],
        "--out", tmp_path / "run", *BUDGET)
    final = tmp_path / "run" / "finetune"
    assert read_manifest(final)["stage"] == "finetune"
    scores = json.loads(_ok(runner, "eval", final, "--data", tiny["caption"], "--task", "caption", "--json").stdout)
    assert 0.0 <= scores["scores"]["bleu4"] <= 1.0

    _ok(runner, "export", final, "--format", "hf", "--out", tmp_path / "hf")
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    model = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "hf")
    trained = load_file(final / CONNECTOR_FILE)
    assert torch.equal(model.language_projection.weight, trained["proj.weight"])
    from PIL import Image
    inputs = processor(images=Image.new("RGB", (32, 32), "red"), text="a", return_tensors="pt")
    assert model.generate(**inputs, max_new_tokens=3).shape[1] >= inputs["input_ids"].shape[1]

    _ok(runner, "export", final, "--format", "lavis", "--out", tmp_path / "vl-opt.pth")
    state = load_pth(tmp_path / "vl-opt.pth")
    assert torch.equal(state["opt_proj.weight"], trained["proj.weight"])
    assert torch.equal(state["query_tokens"], load_file(final / VPG_FILE)["query_tokens"])
