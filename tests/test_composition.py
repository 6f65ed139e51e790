"""The composition every connector plugs into: a visual kind, an adapter inside the LLM, a connector and a
recipe registered from this file alone run inherit -> transfer -> eval -> export -> load_model; text-only
logits stay bit-identical to the untouched LLM; format-1 bundles still load and export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from test_cli import _user_error
from vpgtrans import load_model
from vpgtrans.cli import app
from vpgtrans.model.adapters import ADAPTERS, AdapterLayer
from vpgtrans.model.connectors import CONNECTORS, Connector
from vpgtrans.model.visual import VISUAL_KINDS
from vpgtrans.model.vlm import IMAGE_TOKEN_ID
from vpgtrans.recipes import RECIPES, Stage


class LayerCLS(nn.Module):
    """A toy visual kind: the [CLS] token of every ViT layer (embeddings included), one Linear each into
    the LLM width -> (B, L + 1, D_llm)."""

    parts = ("cls_proj",)
    uses_converter = False
    all_hidden_states = True

    def __init__(self, section: dict, vision_config: dict, llm_width: int):
        super().__init__()
        self.layers = vision_config["num_hidden_layers"] + 1
        self.cls_proj = Projection(vision_config["hidden_size"], llm_width)

    @property
    def num_tokens(self) -> int:
        return self.layers

    @staticmethod
    def problems(section: dict) -> list[str]:
        return [] if set(section) == {"type"} else [f"model.visual has unknown keys {sorted(set(section) - {'type'})}"]

    @classmethod
    def inherit(cls, source, llm_width: int, converter, seed: int, options: dict):
        assert not options
        module = Projection(source.vision_config["hidden_size"], llm_width)
        module.init_fresh(seed)
        return {"type": "layer-cls"}, {"cls_proj": module.state_dict()}, {"layer_cls": "fresh"}

    def forward(self, features) -> torch.Tensor:
        cls = torch.stack([features.cls(i) for i in range(self.layers)], dim=1)  # (B, L+1, D_vit)
        return self.cls_proj(cls.to(self.cls_proj.linear.weight.dtype))  # (B, L+1, D_llm)


class Projection(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)

    def init_fresh(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(self.linear.weight.shape, generator=generator) * 0.05)
            self.linear.bias.zero_()

    def forward(self, x):
        return self.linear(x)


class LowRank(nn.Module):
    def __init__(self, d_in: int, d_out: int, rank: int):
        super().__init__()
        self.down = nn.Linear(d_in, rank, bias=False)
        self.up = nn.Linear(rank, d_out, bias=False)
        self.init_fresh(0)

    def init_fresh(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.down.weight.copy_(torch.randn(self.down.weight.shape, generator=generator) * 0.1)
            self.up.weight.zero_()  # starts as the identity on the LLM's output

    def forward(self, x):
        return self.up(self.down(x))


class MaskedLowRank(AdapterLayer):
    """A toy masked adapter: ``v_proj(x) + m * up(down(x))`` with ``m = 1`` on visual positions."""

    @staticmethod
    def problems(entry: dict) -> list[str]:
        return [] if isinstance(entry.get("rank"), int) and entry["rank"] > 0 else ["toy-lora rank must be > 0"]

    @staticmethod
    def targets(llm, entry: dict) -> list[str]:
        return [name for name, _ in llm.named_modules() if name.endswith("self_attn.v_proj")]

    @classmethod
    def wrap(cls, base_layer, entry, part, context):
        return cls(base_layer, LowRank(base_layer.in_features, base_layer.out_features, entry["rank"]), part, context)

    def forward(self, x):
        mask = self.context.visual_mask(x)
        if mask is None:
            return self.base_layer(x)
        return self.base_layer(x) + mask.unsqueeze(-1).to(x.dtype) * self.adapter(x)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(VISUAL_KINDS, "layer-cls", LayerCLS)
    monkeypatch.setitem(ADAPTERS, "toy-lora", MaskedLowRank)
    monkeypatch.setitem(RECIPES, "toy", [Stage("align", {"trainable": ["cls_proj"], "lr": 3e-3, "min_lr": None}),
                                         Stage("tune", {"trainable": ["cls_proj", "toy-lora"], "lr": 3e-3,
                                                        "min_lr": 1e-3}, data="finetune_data")])
    monkeypatch.setitem(CONNECTORS, "toy", Connector("layer-cls", ({"type": "toy-lora", "rank": 2},), recipe="toy"))


def _text_logits_equal(bundle: Path, llm_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 7, 12, 30, 5, 9], [1, 4, 4, 8, 21, 2]])
    ours = load_model(bundle, device="cpu")
    theirs = AutoModelForCausalLM.from_pretrained(llm_path).eval()
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_a_kind_and_an_adapter_from_this_file_run_every_command(toy, tiny, tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(app, ["transfer", "--source", str(tiny["source"]), "--target-llm", str(tiny["llama"]),
                                 "--data", str(tiny["caption"]), "--out", str(out), "--connector", "toy",
                                 "--max-steps", "3", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "transfer.json").read_text())
    assert list(summary["stages"]) == ["inherit", "align", "tune"] and summary["recipe"] == "toy"
    inherited, final = out / "inherit", out / "tune"
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["model"]["visual"] == {"type": "layer-cls"}
    assert manifest["model"]["adapters"] == [{"type": "toy-lora", "rank": 2}]
    assert set(manifest["files"]) == {"cls_proj.safetensors", "toy-lora.safetensors"}
    assert manifest["metrics"]["train"]["llm_trainable"] == 2 * (40 * 2 + 2 * 40)  # two layers' adapters, no base weight
    # The adapter started at zero and trained only in the stage that names it.
    start = load_file(str(inherited / "toy-lora.safetensors"))
    after_align = load_file(str(out / "align" / "toy-lora.safetensors"))
    trained = load_file(str(final / "toy-lora.safetensors"))
    ups = [k for k in start if k.endswith("up.weight")]
    assert sorted(start) == sorted(trained) and len(ups) == 2 and ups[0].startswith("model.layers.0.self_attn.v_proj.")
    assert all(torch.equal(start[k], after_align[k]) for k in start) and not start[ups[0]].any()
    assert all(trained[k].abs().sum() > 0 for k in ups)

    # Text-only logits: bit-identical to the untouched LLM at init and after training.
    _text_logits_equal(inherited, tiny["llama"])
    _text_logits_equal(final, tiny["llama"])

    # On an image, the adapter changes the computation at the visual positions and what follows them.
    model = load_model(final, device="cpu")
    ids = torch.tensor([[IMAGE_TOKEN_ID] * model.num_image_tokens + [1, 7, 12]])
    assert model.num_image_tokens == 3  # the kind declares N: CLS of the embeddings + 2 ViT layers
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_adapter = model(input_ids=ids, pixel_values=pixels).logits
        for module in model.llm.modules():
            if isinstance(module, MaskedLowRank):
                module.adapter.up.weight.zero_()
        without = model(input_ids=ids, pixel_values=pixels).logits
    assert not torch.allclose(with_adapter[0, :3], without[0, :3])

    # Generation with the KV cache (prefill sees the mask, decode steps are text) equals a greedy loop
    # over the whole sequence without a cache.
    model = load_model(final, device="cpu")
    with torch.no_grad():
        generated = model.generate(ids, pixels, torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                   min_new_tokens=4, pad_token_id=0)
        sequence = ids
        for _ in range(4):
            logits = model(input_ids=sequence, pixel_values=pixels).logits
            sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert generated[0].tolist() == sequence[0, ids.shape[1]:].tolist()
    with torch.no_grad():  # beams: generate repeats the batch, the context repeats the mask with it
        beams = model.generate(ids.repeat(2, 1), pixels.repeat(2, 1, 1, 1), torch.ones(2, ids.shape[1], dtype=torch.long),
                               max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    assert beams.shape[0] == 2 and torch.equal(beams[0], beams[1])

    # eval, then the adapter export, which loads with vpgtrans.load_model and computes the same.
    scores = tmp_path / "scores.json"
    result = runner.invoke(app, ["eval", str(final), "--data", str(tiny["caption"]), "--max-samples", "4",
                                 "--out", str(scores)])
    assert result.exit_code == 0, result.output
    assert set(json.loads(scores.read_text())["scores"]) >= {"cider", "bleu4"}
    exported = tmp_path / "export"
    result = runner.invoke(app, ["export", str(final), "--format", "adapter", "--out", str(exported)])
    assert result.exit_code == 0, result.output
    config = json.loads((exported / "adapter_config.json").read_text())
    assert config["base_models"]["llm"]["path"] == str(Path(tiny["llama"]).resolve())
    assert config["base_models"]["llm"]["fingerprint"] == manifest["references"]["llm"]["fingerprint"]
    assert config["parts"] == {"cls_proj": "cls_proj.safetensors", "toy-lora": "toy-lora.safetensors"}
    assert "vpgtrans.load_model(" in (exported / "README.md").read_text()
    reloaded, original = load_model(exported, device="cpu"), load_model(final, device="cpu")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, pixel_values=pixels).logits,
                           original(input_ids=ids, pixel_values=pixels).logits)
    # hf / lavis have no place for this composition: one line, exit 2, nothing written.
    for fmt, target in (("hf", tmp_path / "hf"), ("lavis", tmp_path / "x.pth")):
        _user_error(runner.invoke(app, ["export", str(final), "--format", fmt, "--out", str(target)]),
                    f"cannot be exported as {fmt}", "layer-cls", "--format adapter")
        assert not target.exists()


def test_unknown_parts_kinds_and_adapters_are_one_line_errors(toy, tiny, inherited, tmp_path):
    from vpgtrans.config import TrainConfig
    from vpgtrans.errors import VpgtransError
    from vpgtrans.stages.train import run_stage

    with pytest.raises(VpgtransError, match="'cls_proj' are not parts of this model .it has vpg, connector"):
        run_stage(inherited, tiny["caption"], tmp_path / "x", TrainConfig(trainable=["cls_proj"], max_steps=1), "x")
    assert not (tmp_path / "x").exists()
    bad = tmp_path / "bad"
    shutil.copytree(inherited, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["model"]["adapters"] = [{"type": "toy-lora", "rank": 0}, {"type": "nope"}]
    manifest["model"]["visual"]["type"] = "unknown-kind"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(VpgtransError) as info:
        load_model(bad)
    message = str(info.value)
    assert "\n" not in message
    for fragment in ("model.visual.type should be one of qformer", "toy-lora rank must be > 0",
                     "model.adapters[1].type should be one of"):
        assert fragment in message


def test_format1_bundle_still_loads_trains_and_exports(tiny, tmp_path):
    """A bundle written before this composition (format 1, committed fixture, see tests/fixtures/README.md)."""
    from transformers import Blip2ForConditionalGeneration

    from vpgtrans.bundle import validate_bundle
    from vpgtrans.config import TrainConfig
    from vpgtrans.export import export_bundle
    from vpgtrans.stages.train import finetune

    fixtures = Path(__file__).parent / "fixtures"
    bundle = tmp_path / "format1"
    shutil.copytree(fixtures / "format1_bundle", bundle)
    text = (bundle / "manifest.json").read_text().replace("{root}", str(Path(tiny["root"]).resolve()))
    (bundle / "manifest.json").write_text(text)
    manifest = validate_bundle(bundle)
    assert manifest["format_version"] == 1 and "vpg" in manifest["model"]
    expected = load_file(str(fixtures / "format1_expected.safetensors"))
    model = load_model(bundle, device="cpu")
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"], pixel_values=expected["pixel_values"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
    # Exports as before: the HF BLIP-2 holds the bundle's projector.
    hf = export_bundle(bundle, tmp_path / "hf", format="hf")
    blip2 = Blip2ForConditionalGeneration.from_pretrained(hf)
    assert torch.equal(blip2.language_projection.weight, load_file(str(bundle / "connector.safetensors"))["proj.weight"])
    # A stage reads it and writes a format-2 bundle of the same model.
    out = finetune(bundle, tiny["caption"], tmp_path / "ft", TrainConfig.finetune(max_steps=1, batch_size=4))
    upgraded = validate_bundle(out)
    assert upgraded["format_version"] == 2
    assert upgraded["model"]["visual"] == {"type": "qformer", "vpg": manifest["model"]["vpg"],
                                           "connector": manifest["model"]["connector"]}


def test_adapter_options_override_the_connector_defaults(toy, tiny, tmp_path):
    from vpgtrans.config import InheritConfig
    from vpgtrans.errors import VpgtransError
    from vpgtrans.stages.inherit import inherit

    out = inherit(tiny["source"], tiny["llama"], tmp_path / "r4",
                  InheritConfig(connector="toy", adapter_options={"toy-lora": {"rank": 4}}))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["adapters"] == [{"type": "toy-lora", "rank": 4}]
    assert load_file(str(out / "toy-lora.safetensors"))["model.layers.0.self_attn.v_proj.down.weight"].shape == (4, 40)
    for options, expected in (({"nope": {"rank": 2}}, "no 'nope' adapter"), ({"toy-lora": {"rank": 0}}, "rank must be > 0")):
        with pytest.raises(VpgtransError, match=expected):
            inherit(tiny["source"], tiny["llama"], tmp_path / "bad", InheritConfig(connector="toy", adapter_options=options))
        assert not (tmp_path / "bad").exists()
    with pytest.raises(VpgtransError, match="qformer visual kind takes no options"):
        inherit(tiny["source"], tiny["llama"], tmp_path / "bad", InheritConfig(visual_options={"pool": 2}))
