"""``inspect_path`` describes models, checkpoints and bundles from configs and headers alone: its
numbers equal the configs and independent counts over the loaded HF models, and it never builds one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from rich.console import Console

from vpgtrans.errors import VpgtransError
from vpgtrans.inspect import inspect_path, render


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture
def no_model_loading(monkeypatch):
    """Building any HF model (from_pretrained, from_config, even on the meta device) raises."""
    import transformers
    from transformers import PreTrainedModel

    def refuse(*args, **kwargs):
        raise AssertionError("inspect must not build a model")

    for name in ("Blip2ForConditionalGeneration", "AutoModelForCausalLM", "AutoModelForSeq2SeqLM"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", refuse)
    monkeypatch.setattr(PreTrainedModel, "__init__", refuse)


@pytest.fixture(scope="module")
def lavis_pth(tiny, tmp_path_factory):
    """The tiny source's VPG + projector as LAVIS .pth files: without and with the ViT."""
    from vpgtrans.formats import lavis
    from vpgtrans.formats.hf import read_tensors

    state = read_tensors(tiny["source"])
    for name, bias in state.items():
        if name.endswith("self_attn.qkv.bias"):  # EVA has no key bias: zero it (inert in attention) to export
            bias[bias.shape[0] // 3: 2 * bias.shape[0] // 3] = 0
    root = tmp_path_factory.mktemp("pth")
    paths = {}
    for include_vision in (False, True):
        lavis_state = lavis.hf_to_lavis(state, projection_prefix="opt_proj", include_vision=include_vision)
        if not include_vision:  # a buffer real LAVIS checkpoints carry; inspect reports it as dropped
            lavis_state["Qformer.bert.embeddings.position_ids"] = torch.arange(32)[None]
        paths[include_vision] = lavis.save_pth(lavis_state, root / f"vpg-vision{int(include_vision)}.pth")
    return paths


def test_blip2_dir_matches_config_and_loaded_model(tiny, monkeypatch):
    from transformers import Blip2ForConditionalGeneration

    model = Blip2ForConditionalGeneration.from_pretrained(tiny["source"])
    config = model.config
    ln_vision = numel(model.vision_model.post_layernorm)
    expected = {
        "vision": numel(model.vision_model) - ln_vision,  # the ViT without post_layernorm (= ln_vision)
        "qformer": numel(model.qformer),
        "vpg": numel(model.qformer) + model.query_tokens.numel() + ln_vision,  # what vpg.safetensors holds
        "projector": numel(model.language_projection),
        "llm": numel(model.language_model),  # parameters() counts the tied lm_head once
        "total": numel(model),
    }
    del model

    with monkeypatch.context() as patch:
        patch.setattr(Blip2ForConditionalGeneration, "from_pretrained",
                      lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded a model")))
        info = inspect_path(tiny["source"])

    assert info["format"] == "hf-blip2"
    vpg = info["vpg"]
    assert vpg["vision"] == {"width": config.vision_config.hidden_size, "layers": config.vision_config.num_hidden_layers,
                             "image_size": config.vision_config.image_size,
                             "patch_size": config.vision_config.patch_size, "params": expected["vision"]}
    assert vpg["qformer"] == {"width": config.qformer_config.hidden_size,
                              "layers": config.qformer_config.num_hidden_layers,
                              "cross_attention_frequency": config.qformer_config.cross_attention_frequency,
                              "params": expected["qformer"]}
    assert vpg["num_query_tokens"] == config.num_query_tokens
    assert vpg["params"] == expected["vpg"] and vpg["dtype"] == "float32"
    assert info["projector"] == {"in": config.qformer_config.hidden_size, "out": config.text_config.hidden_size,
                                 "params": expected["projector"]}
    llm = info["llm"]
    assert (llm["model_type"], llm["hidden_size"], llm["vocab_size"], llm["num_layers"]) == (
        "opt", config.text_config.hidden_size, config.text_config.vocab_size, config.text_config.num_hidden_layers)
    assert llm["params"] == expected["llm"] and not llm["is_encoder_decoder"]
    assert info["params"] == expected["total"]


@pytest.mark.parametrize("name", ["llama", "opt", "t5"])  # untied, tied lm_head, tied shared encoder-decoder
def test_llm_dir_matches_loaded_model(tiny, name, no_model_loading):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny[name])
    info = inspect_path(tiny[name])
    assert info["format"] == "hf-llm"
    llm = info["llm"]
    assert llm["model_type"] == config.model_type
    assert llm["architectures"] == config.architectures
    assert (llm["hidden_size"], llm["vocab_size"], llm["num_layers"]) == (
        config.hidden_size, config.vocab_size, config.num_hidden_layers)
    assert llm["is_encoder_decoder"] == (name == "t5") and llm["dtype"] == "float32"


@pytest.mark.parametrize("name", ["llama", "opt", "t5"])
def test_llm_params_equal_model_parameters(tiny, name):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if name == "t5" else AutoModelForCausalLM
    assert inspect_path(tiny[name])["llm"]["params"] == numel(auto.from_pretrained(tiny[name]))


def test_tied_weight_saved_twice_is_counted_once(tiny, tmp_path):
    """Old checkpoints store a tied lm_head next to the embeddings; the model holds one tensor."""
    from safetensors.torch import load_file, save_file

    opt = tmp_path / "opt"
    shutil.copytree(tiny["opt"], opt)
    state = load_file(opt / "model.safetensors")
    state["lm_head.weight"] = state["model.decoder.embed_tokens.weight"].clone()
    save_file(state, opt / "model.safetensors", metadata={"format": "pt"})
    assert inspect_path(opt)["llm"]["params"] == inspect_path(tiny["opt"])["llm"]["params"]


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory):
    """A standalone tiny ``Blip2VisionModel`` directory, and its parameter count."""
    from transformers import Blip2VisionConfig, Blip2VisionModel

    from conftest import VISION

    model = Blip2VisionModel(Blip2VisionConfig(**VISION))
    path = tmp_path_factory.mktemp("vision") / "vit"
    model.save_pretrained(path)
    return path, numel(model) - numel(model.post_layernorm), numel(model.post_layernorm)


def test_vision_dir(vision_dir, no_model_loading):
    from conftest import VISION

    path, vit_params, ln_params = vision_dir
    info = inspect_path(path)
    assert info["format"] == "hf-vision"
    assert info["vision"] == {"width": VISION["hidden_size"], "layers": VISION["num_hidden_layers"],
                              "image_size": VISION["image_size"], "patch_size": VISION["patch_size"],
                              "params": vit_params, "post_layernorm_params": ln_params, "dtype": "float32"}
    assert info["params"] == vit_params + ln_params


def test_bundle(inherited, tiny, no_model_loading):
    from safetensors.torch import load_file

    info = inspect_path(inherited)
    assert info["format"] == "bundle" and info["stage"] == "inherit" and info["valid"] is True
    assert info["parent"] is None and info["vpgtrans_version"] and info["created"]
    source, llama = inspect_path(tiny["source"]), inspect_path(tiny["llama"])
    vision = {k: v for k, v in source["vpg"]["vision"].items() if k != "params"}
    assert info["vpg"]["vision"] == vision
    assert info["vpg"]["qformer"] == {k: v for k, v in source["vpg"]["qformer"].items() if k != "params"}
    assert info["vpg"]["num_query_tokens"] == source["vpg"]["num_query_tokens"]
    assert info["vpg"]["params"] == source["vpg"]["params"]
    assert info["connector"] == {"type": "linear", "in": source["projector"]["in"],
                                 "out": llama["llm"]["hidden_size"], "params": numel_state(load_file(
                                     inherited / "connector.safetensors"))}
    assert info["llm"] == {"model_type": "llama", "hidden_size": llama["llm"]["hidden_size"],
                           "vocab_size": llama["llm"]["vocab_size"], "is_encoder_decoder": False}
    assert info["trainable_params"] == (numel_state(load_file(inherited / "vpg.safetensors"))
                                        + numel_state(load_file(inherited / "connector.safetensors")))
    assert info["files"]["converter.safetensors"]["params"] == numel_state(load_file(inherited / "converter.safetensors"))
    converter = info["metrics"]["converter"]
    assert converter["pairs"] > 0 and -1 <= converter["heldout_cosine"] <= 1
    assert info["curve_length"] == 0
    refs = info["references"]
    assert refs["llm"]["path"] == str(tiny["llama"].resolve()) and refs["llm"]["exists"]
    assert refs["vision"]["exists"] and refs["source"]["exists"]
    assert all(ref["fingerprint"].startswith("sha256:") for ref in refs.values() if "fingerprint" in ref)


def numel_state(state: dict) -> int:
    return sum(t.numel() for t in state.values())


def test_damaged_bundle_is_described(inherited, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(inherited, damaged)
    (damaged / "vpg.safetensors").write_bytes(b"not a safetensors file")
    manifest = json.loads((damaged / "manifest.json").read_text())
    manifest["references"]["llm"]["path"] = str(tmp_path / "gone-llm")
    manifest["references"]["llm"]["relative_path"] = "../gone-llm"  # not beside the bundle either
    (damaged / "manifest.json").write_text(json.dumps(manifest))

    info = inspect_path(damaged)
    assert info["stage"] == "inherit"
    assert "vpg.safetensors does not match its manifest hash" in info["valid"]
    assert "referenced llm not found" in info["valid"]
    assert "error" in info["files"]["vpg.safetensors"] and info["vpg"]["params"] is None
    assert info["references"]["llm"]["exists"] is False and info["references"]["vision"]["exists"] is True
    assert info["trainable_params"] is None and info["connector"]["params"] > 0
    assert "vpg.safetensors" in _text(info)


def test_lavis_pth(lavis_pth, tiny, no_model_loading):
    source = inspect_path(tiny["source"])
    info = inspect_path(lavis_pth[False])
    assert info["format"] == "lavis-pth" and info["kind"] == "blip2"
    assert "vision" not in info["vpg"]
    assert info["vpg"]["qformer"] == source["vpg"]["qformer"]
    for key in ("num_query_tokens", "params", "dtype"):
        assert info["vpg"][key] == source["vpg"][key]
    assert info["projector"] == source["projector"]
    assert info["llm"] is None and "no LLM" in info["notes"][0]
    assert info["checkpoint"]["projection_prefix"] == "opt_proj"
    assert info["checkpoint"]["dropped_keys"] == 1
    assert info["checkpoint"]["dropped_examples"] == ["Qformer.bert.embeddings.position_ids"]
    assert info["params"] == source["vpg"]["params"] + source["projector"]["params"]

    with_vision = inspect_path(lavis_pth[True])
    assert with_vision["vpg"]["vision"] == source["vpg"]["vision"]
    assert with_vision["params"] == info["params"] + source["vpg"]["vision"]["params"]


def test_json_round_trip_and_render(tiny, inherited, lavis_pth):
    for path in (tiny["source"], tiny["t5"], inherited, lavis_pth[True]):
        info = inspect_path(path)
        assert json.loads(json.dumps(info)) == info
        text = _text(info)
        assert info["format"] in text and "params" in text


def _text(info: dict) -> str:
    console = Console(record=True, width=200, file=open("/dev/null", "w"))
    console.print(render(info))
    return console.export_text()


def test_bad_paths_raise(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{not json")
    (tmp_path / "badbundle").mkdir()
    (tmp_path / "badbundle" / "manifest.json").write_text("{not json")
    (tmp_path / "garbage.pth").write_bytes(b"\x00not a pickle")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    (tmp_path / "notes.txt").write_text("hi")
    for name in ("missing", "empty", "badjson", "badbundle", "garbage.pth", "list.pth", "notes.txt"):
        with pytest.raises(VpgtransError) as excinfo:
            inspect_path(tmp_path / name)
        assert "\n" not in str(excinfo.value) and name in str(excinfo.value)
