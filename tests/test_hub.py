"""The export's model card, and --push-to-hub against a Hub mocked only at the HTTP boundary (no network)."""

from __future__ import annotations

import base64
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from test_cli import _ok, _run, _user_error
from vpgtrans.config import TrainConfig
from vpgtrans.stages.train import warmup_projector


@pytest.fixture(scope="module")
def trained(inherited, tiny, tmp_path_factory):
    return warmup_projector(inherited, tiny["caption"], tmp_path_factory.mktemp("hub") / "warmup",
                            TrainConfig.warmup(max_steps=2, batch_size=4), eval_data=tiny["caption"])


class FakeHub:
    """Answers huggingface_hub's HTTP calls as the Hub does for a small upload: create the repo, say every
    file goes inline ("regular"), accept the commit. Records each request and the committed files."""

    def __init__(self, status: int = 200):
        self.status, self.requests, self.files, self.auth = status, [], {}, {}

    def __call__(self, request):
        import httpx2

        self.requests.append((request.method, request.url.path))
        self.auth[request.url.path] = request.headers.get("authorization")
        if self.status != 200:
            return httpx2.Response(self.status, json={"error": "Invalid credentials in Authorization header"})
        if request.url.path == "/api/repos/create":
            return httpx2.Response(200, json={"url": "https://huggingface.co/me/blip2-x", "name": "me/blip2-x"})
        if request.url.path == "/api/validate-yaml":  # the client checks a README's front matter first
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if "/preupload/" in request.url.path:
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular",
                                                          "shouldIgnore": False} for f in files]})
        if "/commit/" in request.url.path:
            for line in request.content.decode().splitlines():
                entry = json.loads(line)
                if entry["key"] == "file":
                    self.files[entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
            return httpx2.Response(200, json={"commitUrl": "https://huggingface.co/me/blip2-x/commit/abc",
                                              "commitOid": "a" * 40})
        return httpx2.Response(404, json={"error": "not found"})


@pytest.fixture
def fake_hub(monkeypatch):
    pytest.importorskip("huggingface_hub", minversion="2.0")  # whose HTTP client is httpx2 (mocked here)
    httpx2 = pytest.importorskip("httpx2")
    from huggingface_hub import constants, set_client_factory
    from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the tests' offline switch, lifted for the mock only
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    hubs = []

    def install(status: int = 200) -> FakeHub:
        hub = FakeHub(status)
        set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub),  # the real hooks, a fake Hub
                                                 event_hooks={"request": [hf_request_event_hook]}))
        hubs.append(hub)
        return hub

    yield install
    set_client_factory(default_client_factory)


def test_hf_export_has_a_model_card_the_hub_reads(trained, tiny, tmp_path):
    from huggingface_hub import ModelCard

    out = _ok(_run(CliRunner(), "export", trained, "--out", tmp_path / "hf"))
    card = ModelCard.load(tmp_path / "hf" / "README.md")
    assert card.data.pipeline_tag == "image-to-text" and "vpgtrans" in card.data.tags
    assert card.data.library_name == "transformers"
    assert sorted(card.data.base_model) == sorted([tiny["source"].name, tiny["llama"].name])  # the ViT is the source's
    assert card.data.datasets == [tiny["caption"].name]
    assert "**warmup**: trains connector; lr 0.0005 constant; 2 steps of 4 samples" in card.text
    assert "**inherit**" in card.text and "held-out cosine" in card.text
    assert "cider" in card.text and "Blip2ForConditionalGeneration.from_pretrained" in card.text
    assert "not stated in its card" in card.text and card.data.license == "other"
    assert out.stdout.strip().endswith(str(tmp_path / "hf"))


def test_the_llm_licence_is_read_from_its_card(trained, tiny, tmp_path):
    from huggingface_hub import ModelCard

    from vpgtrans.bundle import read_manifest
    from vpgtrans.hub import model_card

    manifest = read_manifest(trained)
    llm = tmp_path / "llama"
    shutil.copytree(tiny["llama"], llm)
    (llm / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    source = tmp_path / "source"
    shutil.copytree(tiny["source"], source)
    (source / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    for role, path in (("llm", llm), ("source", source), ("vision", source)):
        manifest["references"][role]["path"] = str(path)
    card = model_card(trained, manifest, "hf", "(usage)")
    assert card.data.license == "apache-2.0"
    assert ModelCard(str(card)).data.license == "apache-2.0"  # round-trips through the text the Hub reads


def test_push_to_hub_uploads_exactly_the_export(trained, tmp_path, fake_hub):
    hub = fake_hub()
    result = _ok(_run(CliRunner(), "export", trained, "--format", "adapter", "--out", tmp_path / "a",
                      "--push-to-hub", "me/blip2-x"))
    written = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    assert hub.files == written and "README.md" in written and "adapter_config.json" in written
    assert ("POST", "/api/repos/create") in hub.requests
    assert hub.auth["/api/repos/create"] == hub.auth["/api/models/me/blip2-x/commit/main"] == "Bearer hf_test_token"
    assert "https://huggingface.co/me/blip2-x/commit/abc" in result.stdout


def test_push_to_hub_failures_are_one_line_and_keep_the_export(trained, tmp_path, fake_hub, monkeypatch):
    fake_hub(status=401)
    _user_error(_run(CliRunner(), "export", trained, "--format", "adapter", "--out", tmp_path / "a",
                     "--push-to-hub", "me/blip2-x"), "--push-to-hub me/blip2-x: the Hub refused the upload",
                "the export is written at")
    assert (tmp_path / "a" / "adapter_config.json").is_file()
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _user_error(_run(CliRunner(), "export", trained, "--format", "adapter", "--out", tmp_path / "b",
                     "--push-to-hub", "me/blip2-x"), "HF_HUB_OFFLINE is set")
    assert (tmp_path / "b" / "adapter_config.json").is_file()


def test_export_dtype_is_what_transformers_loads(trained, tmp_path):
    from transformers import Blip2ForConditionalGeneration

    plain = Blip2ForConditionalGeneration.from_pretrained(_ok(_run(CliRunner(), "export", trained, "--out",
                                                                   tmp_path / "fp32")) and tmp_path / "fp32")
    assert plain.language_model.dtype == torch.float32  # the tiny LLM is stored in fp32
    _ok(_run(CliRunner(), "export", trained, "--out", tmp_path / "bf16", "--dtype", "bf16"))
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    half = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "bf16")  # dtype="auto": the config's
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(half.language_projection.weight.float(), plain.language_projection.weight,
                               rtol=1e-2, atol=1e-3)
    _user_error(_run(CliRunner(), "export", trained, "--format", "lavis", "--out", tmp_path / "x.pth", "--dtype",
                     "bf16"), "--dtype applies to --format hf")


def test_an_export_loads_in_its_llms_dtype_by_default(trained, tiny, tmp_path):
    """A bf16 LLM stays bf16 on disk and config.json names bfloat16, so from_pretrained (dtype="auto") does not
    load a 7B export in fp32 because the first parameter (the trained fp32 query tokens) is fp32."""
    from transformers import AutoModelForCausalLM, Blip2ForConditionalGeneration

    from vpgtrans.export import export_bundle

    llm = tmp_path / "llama-bf16"
    AutoModelForCausalLM.from_pretrained(tiny["llama"], dtype=torch.bfloat16).save_pretrained(llm)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny["llama"] / name).is_file():
            shutil.copy(tiny["llama"] / name, llm / name)
    bundle = tmp_path / "bundle"
    shutil.copytree(trained, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["references"]["llm"] = {"path": str(llm)}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    out = export_bundle(bundle, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    blip2 = Blip2ForConditionalGeneration.from_pretrained(out)
    assert blip2.language_model.dtype == torch.bfloat16 and blip2.query_tokens.dtype == torch.bfloat16
