"""export: a bundle -> a standalone HF BLIP-2 directory (loaded with plain transformers) or a LAVIS .pth."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from vpgtrans.bundle import CONNECTOR_FILE, MANIFEST, VPG_FILE, file_sha256, load_tensors
from vpgtrans.errors import VpgtransError
from vpgtrans.export import EXPORT_INFO, export_bundle
from vpgtrans.model.vlm import IMAGE_TOKEN_ID
from vpgtrans.prompting import prompt_ids

HF_FILES = {"config.json", "generation_config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
            "tokenizer_config.json", EXPORT_INFO}
QUESTION = "what color is the circle?"


@pytest.fixture(scope="module")
def hf_export(inherited, tmp_path_factory):
    return export_bundle(inherited, tmp_path_factory.mktemp("export") / "blip2-llama")


@pytest.fixture(scope="module")
def ours(inherited):
    import vpgtrans

    return vpgtrans.load_model(inherited).eval()


def _image():
    image = Image.new("RGB", (40, 30), (0, 0, 0))
    image.paste((220, 30, 30), (8, 6, 30, 24))
    return image


def _compare(ours, export_dir, task: str, text: str, question: str | None, decoder_input_ids=None):
    """Logits of the bundle's model (template ids) and of the export (HF processor) on one image."""
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(export_dir)
    theirs = Blip2ForConditionalGeneration.from_pretrained(export_dir).eval()
    ids = prompt_ids(ours.tokenizer, ours.template, task, ours.num_image_tokens, question, ours.is_encoder_decoder)
    pixel_values = ours.image_processor(images=[_image()], return_tensors="pt")["pixel_values"]
    inputs = processor(images=_image(), text=text, return_tensors="pt")
    image_token_id = theirs.config.image_token_index
    assert inputs["input_ids"][0].tolist() == [image_token_id if i == IMAGE_TOKEN_ID else i for i in ids]
    assert torch.equal(inputs["pixel_values"], pixel_values)
    extra = {} if decoder_input_ids is None else {"decoder_input_ids": decoder_input_ids}
    with torch.no_grad():
        expected = ours(torch.tensor([ids]), pixel_values=pixel_values, **extra).logits  # (1, T, V)
        got = theirs(**inputs, **extra).logits  # (1, T, V + 1): one more row, for <image>
    assert got.shape[-1] == expected.shape[-1] + 1
    return theirs, inputs, expected, got[..., : expected.shape[-1]]


def test_hf_export_writes_a_standalone_blip2(hf_export, inherited):
    assert HF_FILES <= {p.name for p in hf_export.iterdir()}
    assert not [p for p in hf_export.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    info = json.loads((hf_export / EXPORT_INFO).read_text())
    assert info["bundle"]["path"] == str(inherited.resolve())
    assert info["bundle"]["manifest_sha256"] == file_sha256(inherited / MANIFEST)
    assert info["vpgtrans_version"] and info["warnings"] == []
    assert info["processor_prompts"] == {"caption": "", "vqa": "Question: {question} Answer:"}
    config = json.loads((hf_export / "config.json").read_text())
    assert config["architectures"] == ["Blip2ForConditionalGeneration"]
    assert config["text_config"]["model_type"] == "llama" and config["num_query_tokens"] == 4
    # BLIP-2 OPT stops on "\n": the LLaMA tokenizer's "\n" token joins EOS, the <image> token is never emitted.
    generation = json.loads((hf_export / "generation_config.json").read_text())
    newline = json.loads((hf_export / "tokenizer.json").read_text())["model"]["vocab"]["\n"]
    assert newline in generation["eos_token_id"] and config["text_config"]["eos_token_id"] == generation["eos_token_id"]
    assert generation["suppress_tokens"] == [config["image_token_index"]]


@pytest.mark.parametrize("task,text,question", [("caption", "", None),
                                                ("vqa", f"Question: {QUESTION} Answer:", QUESTION)])
def test_hf_export_matches_the_bundle(hf_export, ours, task, text, question):
    theirs, inputs, expected, got = _compare(ours, hf_export, task, text, question)
    text_positions = inputs["input_ids"][0] != theirs.config.image_token_index
    assert text_positions.sum() >= 1
    torch.testing.assert_close(got[0, text_positions], expected[0, text_positions], atol=1e-4, rtol=0)
    generated = theirs.generate(**inputs, max_new_tokens=4, min_new_tokens=4)
    assert generated.dtype == torch.long and generated.shape == (1, inputs["input_ids"].shape[1] + 4)
    assert (generated[0, inputs["input_ids"].shape[1]:] != theirs.config.image_token_index).all()


def test_hf_export_of_a_t5_target(tiny, tmp_path):
    from vpgtrans import load_model
    from vpgtrans.stages.inherit import inherit

    bundle = inherit(tiny["source"], tiny["t5"], tmp_path / "t5-bundle")
    out = export_bundle(bundle, tmp_path / "blip2-t5")
    ours = load_model(bundle).eval()
    decoder_input_ids = torch.tensor([[ours.llm.config.decoder_start_token_id, 5, 7]])
    theirs, inputs, expected, got = _compare(ours, out, "vqa", f"Question: {QUESTION} Short answer:", QUESTION,
                                             decoder_input_ids)
    assert not theirs.config.use_decoder_only_language_model
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    generated = theirs.generate(**inputs, max_new_tokens=3)
    assert generated.dtype == torch.long and generated.shape[0] == 1


def test_lavis_export_round_trips(inherited, tmp_path):
    from vpgtrans.formats.lavis import lavis_to_hf, load_pth

    out = export_bundle(inherited, tmp_path / "vl-llama.pth", format="lavis")
    raw = torch.load(out, map_location="cpu", weights_only=True)
    assert raw["iters"] == 0 and set(raw["model"]) >= {"llama_proj.weight", "ln_vision.weight", "query_tokens"}
    assert json.loads(json.dumps(raw["config"]))["model"] == json.loads((inherited / MANIFEST).read_text())["model"]
    hf_state, _dropped = lavis_to_hf(load_pth(out))
    vpg, connector = load_tensors(inherited, VPG_FILE), load_tensors(inherited, CONNECTOR_FILE)
    expected = {("vision_model.post_layernorm." + k[len("ln_vision."):]) if k.startswith("ln_vision.") else k: v
                for k, v in vpg.items()}
    expected.update({"language_projection." + k[len("proj."):]: v for k, v in connector.items()})
    assert set(hf_state) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(hf_state[name], tensor), name


def test_existing_output_is_refused_and_left_alone(inherited, tmp_path):
    out_dir = tmp_path / "taken"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    with pytest.raises(VpgtransError, match="already exists"):
        export_bundle(inherited, out_dir)
    assert [p.name for p in out_dir.iterdir()] == ["keep.txt"] and (out_dir / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]

    out_file = tmp_path / "taken.pth"
    out_file.write_bytes(b"not mine to replace")
    with pytest.raises(VpgtransError, match="already exists"):
        export_bundle(inherited, out_file, format="lavis")
    assert out_file.read_bytes() == b"not mine to replace"
    export_bundle(inherited, out_file, format="lavis", force=True)
    assert "model" in torch.load(out_file, map_location="cpu", weights_only=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken", "taken.pth"]


@pytest.mark.parametrize("format,out_name", [("hf", "out"), ("lavis", "out.pth")])
def test_broken_bundle_names_the_missing_file(inherited, tmp_path, format, out_name):
    broken = tmp_path / "broken"
    shutil.copytree(inherited, broken)
    (broken / VPG_FILE).unlink()
    with pytest.raises(VpgtransError, match=VPG_FILE):
        export_bundle(broken, tmp_path / out_name, format=format)
    assert not (tmp_path / out_name).exists()


def test_bad_requests_are_refused(inherited, tmp_path):
    with pytest.raises(VpgtransError, match="unknown export format"):
        export_bundle(inherited, tmp_path / "out", format="onnx")
    with pytest.raises(VpgtransError, match=r"\.pth"):
        export_bundle(inherited, tmp_path / "out.bin", format="lavis")
    instruct = tmp_path / "instruct"
    shutil.copytree(inherited, instruct)
    manifest = json.loads((instruct / MANIFEST).read_text())
    manifest["model"]["visual"]["vpg"]["kind"] = "instructblip"
    (instruct / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(VpgtransError, match="--format lavis"):
        export_bundle(instruct, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["instruct"]
