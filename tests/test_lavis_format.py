"""LAVIS / VPGTrans ``.pth`` format: HF -> LAVIS -> .pth -> LAVIS -> HF is exact for tiny random BLIP-2 and
InstructBLIP models; unknown keys are reported by name; pickled code is refused and never run."""

from __future__ import annotations

import os
import pathlib
import shlex

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vpgtrans.errors import VpgtransError
from vpgtrans.formats.lavis import PROJECTION_PREFIXES, hf_to_lavis, lavis_to_hf, load_pth, save_pth

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)
QFORMER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
               encoder_hidden_size=32, cross_attention_frequency=2, vocab_size=50, max_position_embeddings=40)


def _random_model(kind: str):
    """A tiny BLIP-2 / InstructBLIP (OPT) with every parameter random — HF inits query_tokens to zeros and
    the ViT with std 1e-10 — except the qkv key bias, which EVA does not have (zero, as in real models)."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, InstructBlipConfig,
                              InstructBlipForConditionalGeneration, OPTConfig)

    text = OPTConfig(hidden_size=24, ffn_dim=48, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                     max_position_embeddings=32, word_embed_proj_dim=24).to_dict()
    if kind == "blip2":
        model = Blip2ForConditionalGeneration(Blip2Config(vision_config=VISION, qformer_config=QFORMER,
                                                          text_config=text, num_query_tokens=4))
    else:
        model = InstructBlipForConditionalGeneration(InstructBlipConfig(vision_config=VISION, qformer_config=QFORMER,
                                                                        text_config=text, num_query_tokens=4))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_()
            if name.endswith("self_attn.qkv.bias"):
                param[VISION["hidden_size"]:2 * VISION["hidden_size"]] = 0  # (3D,): q | k = 0 | v
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


@pytest.fixture(scope="module")
def blip2_state():
    return _random_model("blip2")


@pytest.fixture(scope="module")
def instructblip_state():
    return _random_model("instructblip")


def _vpg_part(state: dict) -> dict:
    return {name: tensor for name, tensor in state.items() if not name.startswith("language_model.")}


def _assert_same(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].shape == tensor.shape, name
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


# ------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("kind", ["blip2", "instructblip"])
def test_round_trip_through_pth_is_exact(kind, blip2_state, instructblip_state, tmp_path):
    state = blip2_state if kind == "blip2" else instructblip_state
    prefix = "opt_proj" if kind == "blip2" else "llm_proj"

    lavis = hf_to_lavis(state, projection_prefix=prefix, include_vision=True)
    assert not any(name.startswith(("language_model.", "opt_model.", "llm_model.")) for name in lavis)
    assert f"{prefix}.weight" in lavis and "ln_vision.weight" in lavis
    assert "visual_encoder.blocks.1.attn.q_bias" in lavis and "visual_encoder.blocks.1.attn.v_bias" in lavis
    if kind == "instructblip":
        assert "Qformer.bert.embeddings.word_embeddings.weight" in lavis
        assert "Qformer.bert.encoder.layer.0.intermediate.dense.weight" in lavis
    # cross-attention on every 2nd layer, starting at layer 0 (HF: layer_idx % frequency == 0)
    assert "Qformer.bert.encoder.layer.0.crossattention.self.key.weight" in lavis
    assert not any(name.startswith("Qformer.bert.encoder.layer.1.crossattention") for name in lavis)

    path = save_pth(lavis, tmp_path / "vpg.pth", config={"arch": "blip2_opt", "dims": [1, 2]})
    assert sorted(os.listdir(tmp_path)) == ["vpg.pth"]  # no temp file left behind
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model", "config", "iters"} and raw["config"] == {"arch": "blip2_opt", "dims": [1, 2]}

    back, dropped = lavis_to_hf(load_pth(path), keep_qformer_embeddings=kind == "instructblip")
    assert dropped == []
    _assert_same(back, _vpg_part(state))


def test_vpg_only_export_skips_vision(blip2_state):
    lavis = hf_to_lavis(blip2_state, projection_prefix="llama_proj")
    assert not any(name.startswith("visual_encoder.") for name in lavis)
    back, _ = lavis_to_hf(lavis)
    expected = {n: t for n, t in _vpg_part(blip2_state).items() if not n.startswith(("vision_model.embeddings",
                                                                                     "vision_model.encoder"))}
    _assert_same(back, expected)


def test_instructblip_read_as_blip2_drops_text_path(instructblip_state):
    """Without keep_qformer_embeddings the Q-Former text path is dropped with a report and the embeddings
    LayerNorm lands where HF BLIP-2 has it."""
    lavis = hf_to_lavis(instructblip_state, projection_prefix="llm_proj")
    hf, dropped = lavis_to_hf(lavis)
    assert "Qformer.bert.embeddings.word_embeddings.weight" in dropped
    assert "Qformer.bert.embeddings.position_embeddings.weight" in dropped
    assert "Qformer.bert.encoder.layer.2.output.LayerNorm.bias" in dropped
    assert "Qformer.bert.encoder.layer.2.output_query.LayerNorm.bias" not in dropped
    assert torch.equal(hf["qformer.layernorm.weight"], instructblip_state["qformer.embeddings.layernorm.weight"])
    assert not any(name.startswith("qformer.embeddings.") for name in hf)


def test_stage1_and_llm_keys_are_dropped_by_name(blip2_state):
    lavis = hf_to_lavis(blip2_state)
    extra = {
        "Qformer.bert.embeddings.position_ids": torch.arange(40)[None],
        "Qformer.bert.embeddings.word_embeddings.weight": torch.ones(50, 32),
        "Qformer.bert.encoder.layer.0.intermediate.dense.weight": torch.ones(48, 32),
        "Qformer.bert.encoder.layer.0.output.LayerNorm.weight": torch.ones(32),
        "Qformer.cls.predictions.transform.dense.weight": torch.ones(32, 32),
        "Qformer.cls.predictions.bias": torch.ones(50),
        "vision_proj.weight": torch.ones(8, 32),
        "text_proj.bias": torch.ones(8),
        "itm_head.weight": torch.ones(2, 32),
        "temp": torch.tensor(0.07),
        "opt_model.model.decoder.embed_tokens.weight": torch.ones(4, 4),
        "llm_model.lm_head.weight": torch.ones(4, 4),
    }
    hf, dropped = lavis_to_hf({**lavis, **extra})
    assert dropped == sorted(extra)
    _assert_same(hf, {n: t for n, t in _vpg_part(blip2_state).items() if not n.startswith("vision_model.e")})


@pytest.mark.parametrize("prefix", PROJECTION_PREFIXES)
def test_every_projection_prefix_maps_to_language_projection(prefix, blip2_state):
    lavis = hf_to_lavis(blip2_state, projection_prefix=prefix)
    assert {n for n in lavis if n.endswith("_proj.weight")} == {f"{prefix}.weight"}
    hf, _ = lavis_to_hf(lavis)
    assert torch.equal(hf["language_projection.weight"], blip2_state["language_projection.weight"])


# -------------------------------------------------------------------------------------- refusals


def test_unknown_keys_are_all_reported(blip2_state):
    lavis = hf_to_lavis(blip2_state)
    bad = {"Qformer.bert.encoder.layer.0.attention.selff.query.weight": torch.ones(1),
           "mystery_head.weight": torch.ones(1)}
    with pytest.raises(VpgtransError) as err:
        lavis_to_hf({**lavis, **bad})
    assert all(name in str(err.value) for name in bad) and "\n" not in str(err.value)

    hf_bad = {"qformer.encoder.layer.0.attention.attention.qeury.weight": torch.ones(1),
              "vision_model.encoder.layers.0.extra.weight": torch.ones(1)}
    with pytest.raises(VpgtransError) as err:
        hf_to_lavis({**blip2_state, **hf_bad}, include_vision=True)
    assert all(name in str(err.value) for name in hf_bad)


def test_two_projections_collide(blip2_state):
    lavis = hf_to_lavis(blip2_state)
    lavis["llama_proj.weight"] = lavis["opt_proj.weight"]
    with pytest.raises(VpgtransError, match="opt_proj.weight and llama_proj.weight both map to language_projection"):
        lavis_to_hf(lavis)


def test_bad_projection_prefix(blip2_state):
    with pytest.raises(VpgtransError, match="vicuna_proj"):
        hf_to_lavis(blip2_state, projection_prefix="vicuna_proj")


def test_nonzero_key_bias_is_refused(blip2_state):
    state = dict(blip2_state)
    name = "vision_model.encoder.layers.1.self_attn.qkv.bias"
    state[name] = torch.ones_like(state[name])
    with pytest.raises(VpgtransError, match=f"{name}: key bias is nonzero"):
        hf_to_lavis(state, include_vision=True)
    hf_to_lavis(state)  # the ViT is not exported: nothing to refuse


def test_qv_bias_pair_and_shapes_checked(blip2_state):
    lavis = hf_to_lavis(blip2_state, include_vision=True)
    lonely = dict(lavis)
    del lonely["visual_encoder.blocks.0.attn.v_bias"]
    with pytest.raises(VpgtransError, match="blocks.0.attn has q_bias but no v_bias"):
        lavis_to_hf(lonely)
    short = dict(lavis)
    short["visual_encoder.blocks.1.attn.q_bias"] = torch.ones(8)
    short["visual_encoder.blocks.1.attn.v_bias"] = torch.ones(8)
    with pytest.raises(VpgtransError, match="qkv.weight has 96 rows"):
        lavis_to_hf(short)


def test_pth_without_state_dict(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"optimizer": {"lr": 0.1}, "epoch": 3}, path)
    with pytest.raises(VpgtransError, match=r"odd\.pth: no state dict \('model' key\)"):
        load_pth(path)
    torch.save([torch.ones(1)], path)
    with pytest.raises(VpgtransError, match="no state dict"):
        load_pth(path)


def test_flat_state_dict_is_accepted(tmp_path):
    path = tmp_path / "flat.pth"
    torch.save({"query_tokens": torch.ones(1, 2, 3)}, path)
    assert list(load_pth(path)) == ["query_tokens"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_pth_named(damage, tmp_path):
    good = tmp_path / "good.pth"
    save_pth({"query_tokens": torch.ones(1, 2, 3)}, good)
    data = good.read_bytes()
    path = tmp_path / "bad.pth"
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a checkpoint", "empty": b""}[damage])
    with pytest.raises(VpgtransError, match=r"bad\.pth: unreadable checkpoint"):
        load_pth(path)
    with pytest.raises(VpgtransError, match="no such file"):
        load_pth(tmp_path / "missing.pth")


class _TouchPayload:
    """Unpickling this creates a file — the stand-in for arbitrary code in a malicious checkpoint."""

    def __init__(self, target: pathlib.Path, via_shell: bool):
        self.target, self.via_shell = target, via_shell

    def __reduce__(self):
        if self.via_shell:
            return os.system, (f"touch {shlex.quote(str(self.target))}",)
        return pathlib.Path.touch, (self.target,)


@pytest.mark.parametrize("via_shell", [False, True])
def test_planted_payload_is_refused_and_not_run(via_shell, tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"query_tokens": torch.ones(1)}, "config": _TouchPayload(target, via_shell)}, path)
    with pytest.raises(VpgtransError) as err:
        load_pth(path)
    message = str(err.value)
    assert "refused to unpickle" in message and "\n" not in message
    assert "evil.pth" in message and "never executes pickled code" in message
    assert not target.exists()

    # the plant is live: an unsafe load does run it
    if not via_shell:
        torch.load(path, weights_only=False)
        assert target.exists()


def test_save_pth_refuses_non_json_config(tmp_path):
    with pytest.raises(VpgtransError, match="config is not plain JSON-like"):
        save_pth({"a": torch.ones(1)}, tmp_path / "x.pth", config={"path": pathlib.Path("/x")})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ property: key sets

_WB = ("weight", "bias")
_QFORMER_LAYER = [f"{attn}.attention.{p}.{wb}" for attn in ("attention", "crossattention")
                  for p in ("query", "key", "value") for wb in _WB] + \
                 [f"{attn}.output.{s}.{wb}" for attn in ("attention", "crossattention")
                  for s in ("dense", "LayerNorm") for wb in _WB] + \
                 [f"intermediate_query.dense.{wb}" for wb in _WB] + \
                 [f"output_query.{s}.{wb}" for s in ("dense", "LayerNorm") for wb in _WB]
_TEXT_LAYER = [f"intermediate.dense.{wb}" for wb in _WB] + [f"output.{s}.{wb}" for s in ("dense", "LayerNorm")
                                                             for wb in _WB]
_VISION_LAYER = ["self_attn.qkv.weight", "self_attn.qkv.bias"] + [f"self_attn.projection.{wb}" for wb in _WB] + \
                [f"{m}.{wb}" for m in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2") for wb in _WB]
_TOP = ["query_tokens", "vision_model.embeddings.class_embedding", "vision_model.embeddings.position_embedding"] + \
       [f"{m}.{wb}" for m in ("vision_model.post_layernorm", "language_projection",
                              "vision_model.embeddings.patch_embedding") for wb in _WB]
_BLIP2_TOP = [f"qformer.layernorm.{wb}" for wb in _WB]
_INSTRUCT_TOP = ["qformer.embeddings.word_embeddings.weight", "qformer.embeddings.position_embeddings.weight"] + \
                [f"qformer.embeddings.layernorm.{wb}" for wb in _WB]


@st.composite
def hf_vpg_states(draw):
    """(instruct?, a random subset of valid HF VPG / projector / ViT keys over random layer indices)."""
    instruct = draw(st.booleans())
    layers = draw(st.sets(st.integers(0, 60), max_size=4))
    names = _TOP + (_INSTRUCT_TOP if instruct else _BLIP2_TOP)
    for n in layers:
        names += [f"qformer.encoder.layer.{n}.{k}" for k in _QFORMER_LAYER + (_TEXT_LAYER if instruct else [])]
        names += [f"vision_model.encoder.layers.{n}.{k}" for k in _VISION_LAYER]
    chosen = draw(st.sets(st.sampled_from(names), min_size=1))
    state = {}
    for i, name in enumerate(sorted(chosen)):
        if name.endswith("qkv.bias"):
            state[name] = torch.tensor([i, 2.0, 0, 0, 3, 4])  # (3D,) with D = 2, k part zero
        elif name.endswith("qkv.weight"):
            state[name] = torch.full((6, 2), float(i))
        else:
            state[name] = torch.full((3,), float(i))
    return instruct, state


def _insert_segment(name: str, position: int, word: str) -> str:
    parts = name.split(".")
    position %= len(parts) + 1
    return ".".join(parts[:position] + [word] + parts[position:])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hf_vpg_states(), st.integers(0, 20), st.integers(0, 999), st.data())
def test_key_maps_invert_and_report_invalid_keys(drawn, position, tag, data):
    instruct, state = drawn
    lavis = hf_to_lavis(state, projection_prefix=data.draw(st.sampled_from(PROJECTION_PREFIXES)), include_vision=True)
    back, dropped = lavis_to_hf(lavis, keep_qformer_embeddings=instruct)
    assert dropped == []
    _assert_same(back, state)

    # one corrupted name (an extra path segment) is always reported by name, in either direction
    bad_hf = _insert_segment(data.draw(st.sampled_from(sorted(state))), position, f"zz{tag}")
    with pytest.raises(VpgtransError) as err:
        hf_to_lavis({**state, bad_hf: torch.ones(1)}, include_vision=True)
    assert bad_hf in str(err.value)

    bad_lavis = _insert_segment(data.draw(st.sampled_from(sorted(lavis))), position, f"zz{tag}")
    with pytest.raises(VpgtransError) as err:
        lavis_to_hf({**lavis, bad_lavis: torch.ones(1)}, keep_qformer_embeddings=instruct)
    assert bad_lavis in str(err.value)
