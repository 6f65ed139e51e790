"""The bundle directory: exact files, save -> load round trip, validation, atomic writes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from vpgtrans.bundle import (CONNECTOR_FILE, CONVERTER_FILE, MANIFEST, VPG_FILE, file_sha256, load_model,
                             read_manifest, validate_bundle, write_bundle)
from vpgtrans.config import InheritConfig, PromptTemplate, to_dict
from vpgtrans.converter import merge_projector
from vpgtrans.errors import VpgtransError
from vpgtrans.stages.inherit import inherit


def _files(path):
    return {p.name for p in path.iterdir()}


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


@pytest.fixture(scope="module")
def source_state(tiny):
    return load_file(str(tiny["source"] / "model.safetensors"))


def test_inherit_writes_exactly_the_bundle_files(inherited):
    assert _files(inherited) == {MANIFEST, VPG_FILE, CONNECTOR_FILE, CONVERTER_FILE}
    manifest = validate_bundle(inherited)
    assert manifest["stage"] == "inherit" and manifest["parent"] is None
    assert set(manifest["files"]) == {VPG_FILE, CONNECTOR_FILE, CONVERTER_FILE}
    for name, digest in manifest["files"].items():
        assert file_sha256(inherited / name) == digest
    assert manifest["model"]["llm"]["model_type"] == "llama"
    assert manifest["format_version"] == 2 and manifest["model"]["adapters"] == []
    assert manifest["model"]["visual"]["type"] == "qformer"
    assert manifest["model"]["visual"]["connector"] == {"type": "linear", "in_dim": 64, "out_dim": 40}
    assert manifest["template"] == to_dict(PromptTemplate())
    assert manifest["config"]["inherit"] == to_dict(InheritConfig())
    stats = manifest["metrics"]["converter"]
    assert stats["pairs"] > 0 and -1 <= stats["heldout_cosine"] <= 1 and stats["source_dim"] == 48


def test_inherit_without_converter_writes_no_converter(tiny, tmp_path, source_state):
    out = inherit(tiny["source"], tiny["llama"], tmp_path / "b", InheritConfig(converter="none"))
    assert _files(out) == {MANIFEST, VPG_FILE, CONNECTOR_FILE}
    manifest = validate_bundle(out)
    assert "converter" not in manifest["metrics"]
    connector = load_file(str(out / CONNECTOR_FILE))
    assert connector["proj.weight"].shape == (40, 64)
    assert connector["proj.weight"].abs().sum() > 0 and torch.all(connector["proj.bias"] == 0)
    assert torch.equal(load_file(str(out / VPG_FILE))["query_tokens"], source_state["query_tokens"])


def test_load_model_round_trip(inherited, tiny, source_state):
    model = load_model(inherited)
    vpg = model.visual.vpg.state_dict()
    expected = {k: v for k, v in source_state.items() if k == "query_tokens" or k.startswith("qformer.")}
    expected["ln_vision.weight"] = source_state["vision_model.post_layernorm.weight"]
    expected["ln_vision.bias"] = source_state["vision_model.post_layernorm.bias"]
    assert set(vpg) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(vpg[name], tensor), name
    vision = model.vision.state_dict()
    for name, tensor in source_state.items():
        if name.startswith("vision_model.") and "post_layernorm" not in name:
            assert torch.equal(vision[name[len("vision_model."):]], tensor), name
    converter = load_file(str(inherited / CONVERTER_FILE))
    assert converter["weight"].shape == (40, 48) and converter["bias"].shape == (40,)
    proj_w, proj_b = merge_projector(converter["weight"], converter["bias"], source_state["language_projection.weight"],
                                     source_state["language_projection.bias"])
    assert torch.equal(model.visual.connector.proj.weight, proj_w)
    assert torch.equal(model.visual.connector.proj.bias, proj_b)
    llama = load_file(str(tiny["llama"] / "model.safetensors"))
    llm = model.llm.state_dict()
    for name, tensor in llama.items():
        assert torch.equal(llm[name], tensor), name


def _copy(bundle, tmp_path):
    return shutil.copytree(bundle, tmp_path / "copy")


def test_validate_bundle_names_every_problem(inherited, tmp_path):
    bundle = _copy(inherited, tmp_path)
    (bundle / CONNECTOR_FILE).unlink()
    with open(bundle / VPG_FILE, "r+b") as fh:
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(VpgtransError) as err:
        validate_bundle(bundle)
    message = str(err.value)
    assert f"missing {CONNECTOR_FILE}" in message
    assert f"{VPG_FILE} does not match its manifest hash" in message
    assert "\n" not in message
    with pytest.raises(VpgtransError, match="invalid bundle"):
        load_model(bundle)


def test_validate_bundle_reports_missing_references(inherited, tmp_path):
    bundle = _copy(inherited, tmp_path)
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["references"]["llm"]["path"] = str(tmp_path / "gone-llm")
    manifest["references"]["vision"]["path"] = str(tmp_path / "gone-vit")
    for role in ("llm", "vision"):  # not beside the bundle either (see test_references.py for that case)
        manifest["references"][role]["relative_path"] = "../gone"
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(VpgtransError) as err:
        validate_bundle(bundle)
    assert "gone-llm" in str(err.value) and "gone-vit" in str(err.value)
    assert validate_bundle(bundle, check_references=False)["stage"] == "inherit"


@pytest.mark.parametrize("content, expected", [
    ("{not json", "not valid JSON"),
    (json.dumps({"format": "something-else"}), "not a vpgtrans bundle manifest"),
    (json.dumps(["a", "list"]), "not a vpgtrans bundle manifest"),
    (json.dumps({"format": "vpgtrans-bundle", "format_version": 1}), "manifest lacks"),
])
def test_bad_manifest_is_a_user_error(inherited, tmp_path, content, expected):
    bundle = _copy(inherited, tmp_path)
    (bundle / MANIFEST).write_text(content)
    for check in (read_manifest, validate_bundle, load_model):
        with pytest.raises(VpgtransError, match=expected):
            check(bundle)


@pytest.mark.parametrize("edit, expected", [
    ({"format_version": "1"}, "format_version should be int"),
    ({"files": ["vpg.safetensors"]}, "files should be dict"),
    ({"references": None, "model": 3}, "model should be dict; references should be dict"),
    ({"files": {"../outside.safetensors": "00"}}, "not a plain file name"),
    ({"references": {"llm": {"path": ""}, "vision": {}}}, "referenced vision not found: None"),
])
def test_hand_edited_manifest_is_a_one_line_user_error(inherited, tmp_path, edit, expected):
    bundle = _copy(inherited, tmp_path)
    manifest = json.loads((bundle / MANIFEST).read_text())
    (bundle / MANIFEST).write_text(json.dumps({**manifest, **edit}))
    with pytest.raises(VpgtransError) as err:
        validate_bundle(bundle)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_newer_format_and_missing_manifest(inherited, tmp_path):
    bundle = _copy(inherited, tmp_path)
    manifest = json.loads((bundle / MANIFEST).read_text())
    (bundle / MANIFEST).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(VpgtransError, match="upgrade vpgtrans"):
        read_manifest(bundle)
    (bundle / MANIFEST).unlink()
    with pytest.raises(VpgtransError, match="no manifest.json"):
        read_manifest(bundle)
    with pytest.raises(VpgtransError, match="not found"):
        read_manifest(tmp_path / "nowhere")


def _write(out, force=False, value=1.0):
    return write_bundle(out, stage="inherit", tensors={VPG_FILE: {"x": torch.full((2,), value)},
                                                       CONNECTOR_FILE: {"proj.weight": torch.ones(2, 2)}},
                        model={}, references={}, template={}, config={}, force=force)


def test_existing_out_dir_is_refused_unless_forced(tmp_path):
    out = tmp_path / "bundle"
    _write(out)
    (out / "stale.txt").write_text("left in the old bundle")
    with pytest.raises(VpgtransError, match="already exists"):
        _write(out, value=2.0)
    assert _files(out) == {MANIFEST, VPG_FILE, CONNECTOR_FILE, "stale.txt"}
    assert _write(out, force=True, value=2.0) == out
    assert _files(out) == {MANIFEST, VPG_FILE, CONNECTOR_FILE}
    assert torch.equal(load_file(str(out / VPG_FILE))["x"], torch.full((2,), 2.0))
    assert _siblings(out) == ["bundle"]  # no temporary or old directory left behind
    assert validate_bundle(out, check_references=False, check_model=False)["stage"] == "inherit"


def test_force_never_replaces_a_directory_vpgtrans_did_not_write(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(VpgtransError, match="already exists" if not force else "is not a vpgtrans output"):
            _write(out, force=force)
    assert _files(out) == {"keep.txt"} and (out / "keep.txt").read_text() == "mine"
    assert _siblings(out) == ["mine"]
    (out / "keep.txt").unlink()
    _write(out, force=True)  # an empty directory may be filled
    assert _files(out) == {MANIFEST, VPG_FILE, CONNECTOR_FILE}


def test_inherit_refuses_existing_out_and_force_replaces(tiny, tmp_path):
    out = tmp_path / "b"
    inherit(tiny["source"], tiny["llama"], out, InheritConfig(converter="none"))
    (out / "old.txt").write_text("old")
    with pytest.raises(VpgtransError, match="already exists"):
        inherit(tiny["source"], tiny["llama"], out)
    assert "old.txt" in _files(out)
    inherit(tiny["source"], tiny["llama"], out, force=True)
    assert _files(out) == {MANIFEST, VPG_FILE, CONNECTOR_FILE, CONVERTER_FILE}
    assert _siblings(out) == ["b"]


def test_nothing_half_written_when_saving_fails(tmp_path, monkeypatch):
    import safetensors.torch

    calls = []

    def failing_save(state, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the first file is written, the second fails
            raise OSError("disk full")
        return original(state, path, metadata=metadata)

    original = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    out = tmp_path / "new"
    with pytest.raises(OSError, match="disk full"):
        _write(out)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its temporary directory

    # With --force over an existing bundle, a failure leaves the old bundle intact.
    monkeypatch.setattr(safetensors.torch, "save_file", original)
    _write(out, value=1.0)
    before = {name: file_sha256(out / name) for name in _files(out)}
    calls.clear()
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        _write(out, force=True, value=2.0)
    assert {name: file_sha256(out / name) for name in _files(out)} == before
    assert _siblings(out) == ["new"]


def test_fingerprint_check_detects_a_changed_llm(tiny, tmp_path):
    llm = shutil.copytree(tiny["llama"], tmp_path / "llm")
    bundle = inherit(tiny["source"], llm, tmp_path / "b", InheritConfig(converter="none"))
    assert read_manifest(bundle)["references"]["llm"]["fingerprint"].startswith("sha256:")
    load_model(bundle, check_fingerprints=True)
    config = json.loads((llm / "config.json").read_text())
    (llm / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    with pytest.raises(VpgtransError, match="referenced llm .* changed since the bundle was made"):
        load_model(bundle, check_fingerprints=True)
    load_model(bundle)  # the check is opt-in
