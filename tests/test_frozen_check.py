"""The frozen models are checked from their safetensors headers alone (issue 16, item 1), and NaN / Inf in a
bundle's trained parts is refused when it is loaded (item 2).

Each broken model is made from a good one with safetensors / transformers, the library that owns the
format; every command must end in one line naming the problem, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import make_llama
from test_cli import _ok, _run, _user_error
from vpgtrans.errors import VpgtransError
from vpgtrans.formats.frozen import check_llm, header_summary, stored_shapes

LAYER_1_UP = "model.layers.1.mlp.up_proj.weight"


def _edit_weights(model_dir, edit):
    """Rewrite a model directory's single safetensors file with ``edit(state)`` applied."""
    (weights,) = model_dir.glob("*.safetensors")
    state = load_file(str(weights))
    edit(state)
    save_file(state, str(weights), metadata={"format": "pt"})


def _copy(tiny, name, tmp_path):
    out = tmp_path / name
    shutil.copytree(tiny[name], out)
    return out


def _inherit(source, llm, out, *extra):
    return _run(CliRunner(), "inherit", "--source", source, "--target-llm", llm, "--out", out, *extra)


# ------------------------------------------------------------------------------------------ at inherit


def test_a_target_llm_lacking_a_tensor_is_refused_by_name(tiny, tmp_path):
    llm = _copy(tiny, "llama", tmp_path)
    _edit_weights(llm, lambda state: state.pop(LAYER_1_UP))
    _user_error(_inherit(tiny["source"], llm, tmp_path / "out"), "missing", LAYER_1_UP)
    assert not (tmp_path / "out").exists()


def test_a_config_that_disagrees_with_the_weights_is_refused(tiny, tmp_path):
    llm = _copy(tiny, "llama", tmp_path)
    config = json.loads((llm / "config.json").read_text())
    config["hidden_size"] = 48  # the weights are 40 wide
    (llm / "config.json").write_text(json.dumps(config))
    line = _user_error(_inherit(tiny["source"], llm, tmp_path / "out"), "shapes differ",
                       "model.embed_tokens.weight")
    assert f"({config['vocab_size']}, 40) stored, ({config['vocab_size']}, 48) from the config" in line


def test_a_shard_the_index_names_that_is_missing_is_one_line(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    llm = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny["llama"]).save_pretrained(llm, max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny["llama"] / name).exists():
            shutil.copy(tiny["llama"] / name, llm / name)
    shards = sorted(llm.glob("model-*.safetensors"))
    assert len(shards) >= 2
    shards[-1].unlink()
    _user_error(_inherit(tiny["source"], llm, tmp_path / "out"), "missing", shards[-1].name)


def test_unexpected_and_wrong_dtype_tensors_are_named(tiny, tmp_path):
    llm = _copy(tiny, "llama", tmp_path)

    def edit(state):
        state["model.layers.7.self_attn.q_proj.weight"] = torch.zeros(4, 4)
        state["model.norm.weight"] = state["model.norm.weight"].to(torch.int8)

    _edit_weights(llm, edit)
    line = _user_error(_inherit(tiny["source"], llm, tmp_path / "out"), "unexpected",
                       "model.layers.7.self_attn.q_proj.weight", "wrong dtype", "model.norm.weight is I8")
    assert "missing" not in line


def test_a_vision_encoder_lacking_a_tensor_is_refused(tiny, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(tiny["source"], source)
    name = "vision_model.encoder.layers.1.mlp.fc2.weight"
    _edit_weights(source, lambda state: state.pop(name))
    _user_error(_inherit(source, tiny["llama"], tmp_path / "out"), "vision encoder", "missing",
                "encoder.layers.1.mlp.fc2.weight")


# ---------------------------------------------- what transformers itself accepts passes (its own rules)


def test_tied_embeddings_and_ignored_buffers_pass(tmp_path):
    """A tied lm_head is not stored (tie_word_embeddings); an old checkpoint's per-layer rotary inv_freq is
    ignored by transformers, so by the check too; a checkpoint saved without the base-model prefix loads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=50, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))
    assert "lm_head.weight" not in state
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(state, str(weights), metadata={"format": "pt"})
    assert check_llm(tmp_path)["tensors"] == len(state)
    save_file({k.removeprefix("model."): v for k, v in state.items()}, str(weights), metadata={"format": "pt"})
    assert check_llm(tmp_path)["tensors"] == len(state)
    # transformers agrees: nothing missing, nothing unexpected but what it ignores
    _, info = LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]


def test_moe_experts_are_matched_through_transformers_conversions(tmp_path):
    """transformers 5 stores Mixtral experts one tensor each and fuses them on load: the check follows the
    same conversion, and a missing expert tensor names the fused tensor it belongs to."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=2, vocab_size=50, num_local_experts=3)
    MixtralForCausalLM(config).save_pretrained(tmp_path)
    stored = set(stored_shapes(tmp_path))
    assert check_llm(tmp_path)["tensors"] == len(stored)
    for expert in sorted(name for name in stored if ".experts.1." in name):
        model_dir = tmp_path / expert
        shutil.copytree(tmp_path, model_dir, ignore=lambda _dir, names: [n for n in names if n.startswith("model.")
                                                                           and n.count(".") > 2])
        _edit_weights(model_dir, lambda state: state.pop(expert))
        with pytest.raises(VpgtransError) as error:
            check_llm(model_dir)
        message = str(error.value)  # the fused tensor is one expert short, or cannot be built at all
        assert "model.layers.0.mlp.experts." in message and len(message.splitlines()) == 1
        assert "(2, " in message or "cannot be assembled" in message


def test_the_header_summary_is_an_independent_digest_of_names_shapes_dtypes(tiny):
    import hashlib

    from safetensors import safe_open

    (weights,) = tiny["llama"].glob("*.safetensors")
    lines = []
    with safe_open(str(weights), framework="pt") as fh:
        for name in sorted(fh.keys()):
            piece = fh.get_slice(name)
            lines.append(f"{name}\t{piece.get_dtype()}\t{','.join(map(str, piece.get_shape()))}\n")
    summary = check_llm(tiny["llama"])
    assert summary["digest"] == "sha256:" + hashlib.sha256("".join(lines).encode()).hexdigest()
    assert summary["parameters"] == sum(t.numel() for t in load_file(str(weights)).values())
    assert header_summary({"a": ((2, 3), "F32")}) != header_summary({"a": ((3, 2), "F32")})


# ------------------------------------------------------------------- a bundle's references, later on


@pytest.fixture
def own_bundle(tiny, tmp_path):
    """An inherit bundle whose target LLM is a private copy (so the test may replace it)."""
    llm = _copy(tiny, "llama", tmp_path)
    bundle = tmp_path / "bundle"
    _ok(_inherit(tiny["source"], llm, bundle, "--converter", "none"))
    return bundle, llm


def test_the_bundle_records_the_header_summaries(own_bundle):
    bundle, llm = own_bundle
    refs = json.loads((bundle / "manifest.json").read_text())["references"]
    assert refs["llm"]["header"] == check_llm(llm)
    assert refs["vision"]["header"]["tensors"] == len(
        [n for n in stored_shapes(refs["vision"]["path"]) if n.startswith("vision_model.")
         and not n.startswith("vision_model.post_layernorm.")])


@pytest.mark.parametrize("command", ["warmup-projector", "eval", "export", "inspect"])
def test_an_llm_replaced_by_one_of_another_width_is_refused_everywhere(own_bundle, tiny, tmp_path, command):
    bundle, llm = own_bundle
    shutil.rmtree(llm)
    make_llama(llm, hidden=48)
    out = tmp_path / "out"
    args = {"warmup-projector": ["--data", tiny["caption"], "--out", out, "--max-steps", "1"],
            "eval": ["--data", tiny["caption"], "--max-samples", "2"],
            "export": ["--out", out], "inspect": []}[command]
    if command == "inspect":  # the bundle is described, and its validity says why it is not valid
        result = _run(CliRunner(), "inspect", bundle)
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert "hidden_size 40 -> 48" in result.stderr.strip().splitlines()[-1]
        return
    _user_error(_run(CliRunner(), command, bundle, *args), "not the LLM this bundle was made for",
                "hidden_size 40 -> 48")
    assert not out.exists()


def test_same_width_other_shapes_is_named_by_the_header_digest(own_bundle, tmp_path):
    """A consistent LLM of the same width and vocabulary but another depth passes its own check; the
    recorded header summary tells it is not the one the bundle was made with."""
    bundle, llm = own_bundle
    config = json.loads((llm / "config.json").read_text())
    from transformers import AutoConfig, AutoModelForCausalLM

    deeper = AutoConfig.from_pretrained(llm)
    deeper.num_hidden_layers = 3
    AutoModelForCausalLM.from_config(deeper).save_pretrained(llm)
    assert json.loads((llm / "config.json").read_text())["hidden_size"] == config["hidden_size"]
    _user_error(_run(CliRunner(), "export", bundle, "--out", tmp_path / "out"), "tensors changed since the bundle",
                "21 tensors", "30 tensors")


def test_a_bundle_without_header_summaries_still_loads_silently(own_bundle, caplog):
    from vpgtrans.bundle import load_model

    bundle, _ = own_bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    for role in ("vision", "llm"):
        del manifest["references"][role]["header"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level("WARNING"):
        model = load_model(bundle, device="cpu")
    assert model.llm.config.hidden_size == 40
    assert not [r for r in caplog.records if r.name.startswith("vpgtrans")]


# ------------------------------------------------------------------------- NaN / Inf in trained parts


@pytest.mark.parametrize("command", ["warmup-projector", "eval", "export"])
def test_nan_in_a_bundle_part_is_refused_naming_file_and_tensor(inherited, tiny, tmp_path, command):
    from vpgtrans.bundle import file_sha256

    bundle = tmp_path / "bundle"
    shutil.copytree(inherited, bundle)
    connector = bundle / "connector.safetensors"
    state = load_file(str(connector))
    state["proj.bias"][0] = float("nan")
    save_file(state, str(connector), metadata={"format": "pt"})
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["connector.safetensors"] = file_sha256(connector)  # the hash recomputed: only values tell
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "out"
    args = {"warmup-projector": ["--data", tiny["caption"], "--out", out, "--max-steps", "1"],
            "eval": ["--data", tiny["caption"], "--out", out], "export": ["--out", out]}[command]
    _user_error(_run(CliRunner(), command, bundle, *args), "connector.safetensors", "NaN or Inf", "proj.bias")
    assert not out.exists()
