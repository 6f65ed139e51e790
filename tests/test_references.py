"""Hub ids through a locally built Hugging Face cache (no network), and bundles that move between machines."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from test_cli import _ok, _run, _user_error
from vpgtrans import load_model
from vpgtrans.bundle import read_manifest, validate_bundle
from vpgtrans.errors import VpgtransError
from vpgtrans.references import resolve_model
from vpgtrans.stages.inherit import inherit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path, tiny, monkeypatch):
    """An HF cache holding the tiny LLaMA as ``me/tiny-llama`` at one commit (``main`` points at it), laid
    out as huggingface_hub writes it; the Hub itself stays unreachable (offline)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    repo = cache / "models--me--tiny-llama"
    shutil.copytree(tiny["llama"], repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo / "snapshots" / COMMIT


def test_a_hub_id_resolves_through_the_cache_and_is_recorded(hf_cache, tiny, tmp_path):
    for name in ("me/tiny-llama", f"me/tiny-llama@{COMMIT}", "me/tiny-llama@main"):
        path, hub = resolve_model(name)
        assert path == hf_cache and hub == {"repo_id": "me/tiny-llama", "revision": COMMIT}
    bundle = inherit(tiny["source"], "me/tiny-llama", tmp_path / "inherit")
    llm = read_manifest(bundle)["references"]["llm"]
    assert (llm["repo_id"], llm["revision"], llm["path"]) == ("me/tiny-llama", COMMIT, str(hf_cache))
    # Elsewhere the absolute and relative paths are gone: the cache entry for that commit is found.
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["references"]["llm"].update(path="/elsewhere/llama", relative_path="../nowhere")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert validate_bundle(bundle)["references"]["llm"]["path"] == str(hf_cache)
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert load_model(bundle, device="cpu")(input_ids=ids).logits.shape[-1] == manifest["model"]["llm"]["vocab_size"]


def test_hub_ids_that_cannot_be_resolved_are_one_line(hf_cache, tiny, tmp_path):
    with pytest.raises(VpgtransError, match="me/other: not a local path, and not in the Hugging Face cache .*"
                                            "HF_HUB_OFFLINE is set"):
        resolve_model("me/other")
    with pytest.raises(VpgtransError, match="not in the Hugging Face cache"):
        resolve_model("me/tiny-llama@v9")
    with pytest.raises(VpgtransError, match="--revision applies to Hub ids"):
        resolve_model(tiny["llama"], revision="main")
    runner = CliRunner()
    _user_error(_run(runner, "inherit", "--source", tiny["source"], "--target-llm", "me/absent", "--out",
                     tmp_path / "x"), "me/absent: not a local path")
    assert not (tmp_path / "x").exists()
    result = _ok(_run(runner, "inherit", "--source", tiny["source"], "--target-llm", "me/tiny-llama", "--out",
                      tmp_path / "ok"))
    assert "bundle written to" in result.stdout


def test_a_bundle_moved_with_its_models_still_loads(tiny, tmp_path):
    old = tmp_path / "workstation"
    for name in ("source", "llama"):
        shutil.copytree(tiny[name], old / "models" / name)
    bundle = inherit(old / "models" / "source", old / "models" / "llama", old / "runs" / "inherit")
    assert read_manifest(bundle)["references"]["llm"]["relative_path"] == "../../models/llama"
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        before = load_model(bundle, device="cpu")(input_ids=ids).logits
    new = tmp_path / "cluster"
    old.rename(new)  # the absolute paths in the manifest are gone now
    moved = new / "runs" / "inherit"
    references = validate_bundle(moved)["references"]
    assert references["llm"]["path"] == str((new / "models" / "llama").resolve())
    assert references["vision"]["path"] == references["source"]["path"] == str((new / "models" / "source").resolve())
    with torch.no_grad():
        assert torch.equal(load_model(moved, device="cpu")(input_ids=ids).logits, before)


def test_an_adapter_export_moved_with_the_models_loads(tiny, tmp_path):
    from vpgtrans.export import export_bundle

    root = tmp_path / "a"
    for name in ("source", "llama"):
        shutil.copytree(tiny[name], root / "models" / name)
    bundle = inherit(root / "models" / "source", root / "models" / "llama", root / "runs" / "inherit")
    export_bundle(bundle, root / "share" / "export", format="adapter")
    assert read_manifest(root / "share" / "export")["references"]["llm"]["relative_path"] == "../../models/llama"
    root.rename(tmp_path / "b")
    moved = tmp_path / "b" / "share" / "export"
    assert validate_bundle(moved)["references"]["llm"]["path"] == str((tmp_path / "b" / "models" / "llama").resolve())
